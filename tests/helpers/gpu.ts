/**
 * The GPU context for tests: one per test process, backend from MACE_BACKEND
 * (wgpu | dawn | auto; default wgpu). scripts/test.sh runs the GPU tests once
 * per backend.
 */
import {
  type BackendName,
  createGpuContext,
  type GpuContext,
} from "../../src/engine/gpu/context.ts";

let shared: Promise<GpuContext> | null = null;

export function testBackend(): BackendName {
  return (Deno.env.get("MACE_BACKEND") ?? "wgpu") as BackendName;
}

export function testContext(): Promise<GpuContext> {
  if (!shared) shared = createGpuContext({ backend: testBackend() });
  return shared;
}

/** Deno.test options for GPU tests: the device outlives single tests, so skip leak checks. */
export const gpuTest = { sanitizeResources: false, sanitizeOps: false } as const;
