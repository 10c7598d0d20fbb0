/** Shared helpers for the model-loading tests (temp folders, raw safetensors, error checks). */
import assert from "node:assert/strict";
import { ModelFormatError } from "../../src/engine/errors.ts";

/** Runs fn with a fresh temp folder, removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "mace-model-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** A safetensors file from a header object (written verbatim) and a data section. */
export function rawSafetensors(
  header: unknown,
  data: Uint8Array,
  headerLenOverride?: number,
): Uint8Array {
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.byteLength + data.byteLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLenOverride ?? json.byteLength), true);
  out.set(json, 8);
  out.set(data, 8 + json.byteLength);
  return out;
}

/**
 * Asserts that `promise` rejects with a ModelFormatError for `file` (and `tensor`), message
 * matching `pattern`.
 */
export async function assertModelError(
  promise: Promise<unknown>,
  expected: { file: string | RegExp; tensor?: string; pattern: RegExp },
): Promise<ModelFormatError> {
  let error: unknown;
  try {
    await promise;
  } catch (e) {
    error = e;
  }
  assert.ok(error instanceof ModelFormatError, `expected ModelFormatError, got ${error}`);
  if (typeof expected.file === "string") assert.equal(error.file, expected.file, error.message);
  else assert.match(error.file, expected.file, error.message);
  assert.equal(error.tensor, expected.tensor, error.message);
  assert.match(error.message, expected.pattern);
  return error;
}

/** Collects a model source's stream into a map, asserting each name comes once. */
export async function collect(
  tensors: AsyncIterable<{ name: string; shape: number[]; data: Float32Array }>,
): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for await (const t of tensors) {
    assert.ok(!out.has(t.name), `tensor ${t.name} streamed twice`);
    assert.equal(
      t.data.length,
      t.shape.reduce((a, b) => a * b, 1),
      `${t.name}: data length vs shape`,
    );
    out.set(t.name, { shape: t.shape, data: t.data });
  }
  return out;
}
