/**
 * All per-step uniforms of a forward pass in one buffer of 256-byte slots
 * (minUniformBufferOffsetAlignment), rewritten with a single writeBuffer per
 * step. Bind groups point at fixed slots, so they are built once.
 */
import type { GpuContext } from "../gpu/context.ts";
import { packUniform } from "../gpu/buffers.ts";

export type UniformFields = readonly (readonly ["u32" | "i32" | "f32", number])[];

const SLOT_BYTES = 256;

export class UniformArena<Counts> {
  private readonly slots: ((counts: Counts) => UniformFields)[] = [];
  private readonly buffer: GPUBuffer;
  private readonly staging: Uint8Array;

  constructor(private readonly ctx: GpuContext, readonly capacity: number) {
    this.buffer = ctx.device.createBuffer({
      label: "step uniforms",
      size: capacity * SLOT_BYTES,
      usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
    });
    this.staging = new Uint8Array(this.buffer.size);
  }

  /** Reserves a slot whose contents `fields(counts)` computes each step. */
  slot(
    fields: (counts: Counts) => UniformFields,
  ): { buffer: GPUBuffer; offset: number; size: number } {
    if (this.slots.length === this.capacity) {
      throw new Error(`UniformArena: more than ${this.capacity} uniform slots`);
    }
    const index = this.slots.push(fields) - 1;
    return { buffer: this.buffer, offset: index * SLOT_BYTES, size: SLOT_BYTES };
  }

  /** Writes only the slots in use, in one writeBuffer. */
  write(counts: Counts): void {
    this.slots.forEach((fields, i) =>
      this.staging.set(packUniform(fields(counts)), i * SLOT_BYTES)
    );
    this.ctx.device.queue.writeBuffer(
      this.buffer,
      0,
      this.staging,
      0,
      this.slots.length * SLOT_BYTES,
    );
  }

  destroy(): void {
    this.buffer.destroy();
  }
}
