/** Buffer helpers: storage/uniform creation, uploads and readbacks. */
import type { GpuContext } from "./context.ts";
import { GpuMemoryError } from "../errors.ts";

const STORAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** Round up to a multiple of 4 bytes (and at least 4): WebGPU copy granularity. */
export function alignTo(bytes: number, alignment = 4): number {
  return Math.max(alignment, Math.ceil(bytes / alignment) * alignment);
}

export function createStorage(ctx: GpuContext, bytes: number, label: string): GPUBuffer {
  const size = alignTo(bytes);
  if (size > ctx.limits.maxBufferSize) {
    throw new GpuMemoryError(
      `buffer "${label}" needs ${size} bytes, over this device's maxBufferSize ` +
        `${ctx.limits.maxBufferSize}; split the tensor or use a smaller model/batch`,
    );
  }
  return ctx.device.createBuffer({ size, usage: STORAGE, label });
}

/** A storage buffer holding `data` (any typed array; padded to 4 bytes). */
export function uploadStorage(
  ctx: GpuContext,
  data: ArrayBufferView,
  label: string,
): GPUBuffer {
  const buffer = createStorage(ctx, data.byteLength, label);
  writeBuffer(ctx, buffer, 0, data);
  return buffer;
}

/** queue.writeBuffer that accepts byte lengths that are not multiples of 4. */
export function writeBuffer(
  ctx: GpuContext,
  buffer: GPUBuffer,
  offset: number,
  data: ArrayBufferView,
): void {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (bytes.byteLength === 0) return; // Deno's wgpu panics on empty writes
  if (bytes.byteLength % 4 === 0) {
    ctx.device.queue.writeBuffer(buffer, offset, bytes);
  } else {
    const padded = new Uint8Array(alignTo(bytes.byteLength));
    padded.set(bytes);
    ctx.device.queue.writeBuffer(buffer, offset, padded);
  }
}

export function createUniform(ctx: GpuContext, data: ArrayBufferView, label: string): GPUBuffer {
  const buffer = ctx.device.createBuffer({
    size: alignTo(data.byteLength, 16),
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    label,
  });
  writeBuffer(ctx, buffer, 0, data);
  return buffer;
}

/** Copies `bytes` from `buffer` at `offset` to the CPU (slow path: tests, one-off reads). */
export async function readBuffer(
  ctx: GpuContext,
  buffer: GPUBuffer,
  bytes = buffer.size,
  offset = 0,
): Promise<ArrayBuffer> {
  const size = alignTo(bytes);
  const staging = ctx.device.createBuffer({
    size,
    usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    label: "readback",
  });
  const encoder = ctx.device.createCommandEncoder();
  encoder.copyBufferToBuffer(buffer, offset, staging, 0, size);
  ctx.device.queue.submit([encoder.finish()]);
  await staging.mapAsync(GPUMapMode.READ);
  const copy = staging.getMappedRange().slice(0, bytes);
  staging.unmap();
  staging.destroy();
  ctx.throwIfFailed();
  return copy;
}

export async function readF32(ctx: GpuContext, buffer: GPUBuffer, count: number, offset = 0) {
  return new Float32Array(await readBuffer(ctx, buffer, count * 4, offset * 4));
}

export async function readU32(ctx: GpuContext, buffer: GPUBuffer, count: number, offset = 0) {
  return new Uint32Array(await readBuffer(ctx, buffer, count * 4, offset * 4));
}

/**
 * Packs a uniform struct of 4-byte scalars, in declaration order, padded to 16 bytes.
 * Each field is [kind, value]; WGSL side: a struct of u32/i32/f32 members only.
 */
export function packUniform(fields: readonly (readonly ["u32" | "i32" | "f32", number])[]) {
  const buffer = new ArrayBuffer(alignTo(fields.length * 4, 16));
  const view = new DataView(buffer);
  fields.forEach(([kind, value], i) => {
    if (kind === "u32") view.setUint32(i * 4, value, true);
    else if (kind === "i32") view.setInt32(i * 4, value, true);
    else view.setFloat32(i * 4, value, true);
  });
  return new Uint8Array(buffer);
}
