/**
 * GPU context: one adapter + device, chosen by backend, with the features and
 * limits the engine adapts to. Three hosts share this code:
 *  - "wgpu":    Deno's built-in WebGPU (navigator.gpu in Deno),
 *  - "dawn":    Dawn through the `webgpu` npm package (Node-API, loads in Deno and Node),
 *  - "browser": the page's or worker's navigator.gpu.
 * "auto" prefers a hardware adapter and falls back to a software one with a warning.
 */
import { GpuError, WebGPUNotAvailableError } from "../errors.ts";

export type BackendName = "auto" | "wgpu" | "dawn" | "browser";

export interface GpuFeatures {
  shaderF16: boolean;
  subgroups: boolean;
  timestampQuery: boolean;
}

export interface GpuContext {
  readonly device: GPUDevice;
  readonly backend: Exclude<BackendName, "auto">;
  readonly adapterDescription: string;
  readonly isSoftware: boolean;
  readonly features: GpuFeatures;
  readonly limits: {
    maxStorageBufferBindingSize: number;
    maxBufferSize: number;
    maxComputeWorkgroupStorageSize: number;
    maxStorageBuffersPerShaderStage: number;
    maxComputeWorkgroupsPerDimension: number;
    minUniformBufferOffsetAlignment: number;
    minStorageBufferOffsetAlignment: number;
  };
  /** Throws the first uncaptured GPU error seen so far (validation, OOM), if any. */
  throwIfFailed(): void;
  destroy(): void;
}

const SOFTWARE_PATTERN = /llvmpipe|lavapipe|swiftshader|software|warp/i;
const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";

function describe(adapter: GPUAdapter): string {
  const info = adapter.info;
  const parts = [info?.description, info?.vendor, info?.architecture, info?.device]
    .filter((s) => typeof s === "string" && s.length > 0);
  return parts.join(" / ") || "unknown adapter";
}

function isSoftwareAdapter(adapter: GPUAdapter): boolean {
  const info = adapter.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
  return info?.isFallbackAdapter === true || SOFTWARE_PATTERN.test(describe(adapter));
}

async function wgpuAdapter(): Promise<GPUAdapter | null> {
  const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
  if (!gpu) return null;
  return await gpu.requestAdapter({ powerPreference: "high-performance" });
}

let dawnGpu: GPU | null = null;
async function dawnAdapter(): Promise<GPUAdapter | null> {
  if (!dawnGpu) {
    const mod = await import("webgpu");
    // Under Node the WebGPU constants (GPUBufferUsage, ...) are not global yet.
    for (const [name, value] of Object.entries(mod.globals)) {
      if (!(name in globalThis)) (globalThis as Record<string, unknown>)[name] = value;
    }
    dawnGpu = mod.create([]) as unknown as GPU;
  }
  return await dawnGpu.requestAdapter({ powerPreference: "high-performance" });
}

const INSTALL_HINT =
  "On Debian run `bash scripts/setup.sh` as root (installs mesa-vulkan-drivers " +
  "and chromium, which provide the lavapipe and SwiftShader software Vulkan drivers), " +
  "or install your GPU's Vulkan driver.";

async function pickAdapter(
  backend: BackendName,
): Promise<{ adapter: GPUAdapter; backend: Exclude<BackendName, "auto"> }> {
  if (backend === "wgpu" || backend === "browser") {
    const adapter = await wgpuAdapter();
    if (!adapter) {
      throw new WebGPUNotAvailableError(
        `navigator.gpu gave no adapter for backend "${backend}". ${INSTALL_HINT}`,
      );
    }
    return { adapter, backend: isDeno ? "wgpu" : "browser" };
  }
  if (backend === "dawn") {
    let adapter: GPUAdapter | null;
    try {
      adapter = await dawnAdapter();
    } catch (e) {
      throw new WebGPUNotAvailableError(
        `the "webgpu" package (Dawn) failed to load: ${(e as Error).message}. Run \`npm ci\`.`,
      );
    }
    if (!adapter) {
      throw new WebGPUNotAvailableError(
        `Dawn found no Vulkan adapter. ${INSTALL_HINT} For SwiftShader set ` +
          "VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json.",
      );
    }
    return { adapter, backend: "dawn" };
  }
  // auto: hardware first (wgpu, then Dawn), else the first software adapter.
  const candidates: { adapter: GPUAdapter; backend: Exclude<BackendName, "auto"> }[] = [];
  const fromWgpu = await wgpuAdapter().catch(() => null);
  if (fromWgpu) candidates.push({ adapter: fromWgpu, backend: isDeno ? "wgpu" : "browser" });
  if (isDeno && (!fromWgpu || isSoftwareAdapter(fromWgpu))) {
    const fromDawn = await dawnAdapter().catch(() => null);
    if (fromDawn) candidates.push({ adapter: fromDawn, backend: "dawn" });
  }
  const hardware = candidates.find((c) => !isSoftwareAdapter(c.adapter));
  if (hardware) return hardware;
  if (candidates.length === 0) {
    throw new WebGPUNotAvailableError(`no WebGPU adapter found. ${INSTALL_HINT}`);
  }
  console.warn(
    `mace: no hardware GPU found; using software adapter ${describe(candidates[0].adapter)} (slow)`,
  );
  return candidates[0];
}

export async function createGpuContext(
  options: { backend?: BackendName } = {},
): Promise<GpuContext> {
  const { adapter, backend } = await pickAdapter(options.backend ?? "auto");
  const wanted: GPUFeatureName[] = ["shader-f16", "timestamp-query", "subgroups" as GPUFeatureName];
  const requiredFeatures = wanted.filter((f) => adapter.features.has(f));
  const a = adapter.limits;
  const device = await adapter.requestDevice({
    requiredFeatures,
    requiredLimits: {
      maxStorageBufferBindingSize: a.maxStorageBufferBindingSize,
      maxBufferSize: a.maxBufferSize,
      maxComputeWorkgroupStorageSize: a.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: a.maxStorageBuffersPerShaderStage,
      maxComputeInvocationsPerWorkgroup: a.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: a.maxComputeWorkgroupSizeX,
    },
  });
  let firstError: string | null = null;
  device.addEventListener("uncapturederror", (event) => {
    const message = (event as GPUUncapturedErrorEvent).error.message;
    if (firstError === null) firstError = message;
    console.error(`mace: GPU error: ${message}`);
  });
  const d = device.limits;
  return {
    device,
    backend,
    adapterDescription: describe(adapter),
    isSoftware: isSoftwareAdapter(adapter),
    features: {
      shaderF16: device.features.has("shader-f16"),
      subgroups: device.features.has("subgroups" as GPUFeatureName),
      timestampQuery: device.features.has("timestamp-query"),
    },
    limits: {
      maxStorageBufferBindingSize: d.maxStorageBufferBindingSize,
      maxBufferSize: d.maxBufferSize,
      maxComputeWorkgroupStorageSize: d.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: d.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupsPerDimension: d.maxComputeWorkgroupsPerDimension,
      minUniformBufferOffsetAlignment: d.minUniformBufferOffsetAlignment,
      minStorageBufferOffsetAlignment: d.minStorageBufferOffsetAlignment,
    },
    throwIfFailed() {
      if (firstError !== null) throw new GpuError(firstError);
    },
    destroy() {
      device.destroy();
    },
  };
}
