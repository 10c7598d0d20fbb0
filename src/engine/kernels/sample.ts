/**
 * Token sampling on the GPU: logits f32 [rows, vocab] + per-row SamplingParams ->
 * tokens u32 [rows]. Only token ids leave the GPU. Rules and algorithm: see
 * src/shaders/sample.wgsl; CPU reference: tests/reference/sampling.ts.
 */
import code from "../../shaders/sample.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { InvalidRequestError } from "../errors.ts";
import type { SamplingParams } from "../step.ts";

/** One row of the sampling kernel: a sequence's sampling parameters and its draw counter. */
export interface SamplingRow extends SamplingParams {
  /** u32 draw counter (e.g. the number of tokens generated so far). */
  counter: number;
}

/** Bytes of one WGSL SamplingParams (8 four-byte members). */
export const SAMPLING_PARAMS_BYTES = 32;

function checkU32(name: string, value: number, row: number): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new InvalidRequestError(
      `sampling row ${row}: ${name} must be an integer in [0, 2^32), got ${value}`,
    );
  }
}

/**
 * Packs per-row sampling parameters into the storage layout of sample.wgsl
 * (32 bytes per row). temperature <= 0 means greedy; topK 0 means no limit;
 * topP in (0, 1], where 1 (or more) means no limit.
 */
export function packSamplingParams(rows: readonly SamplingRow[]): Uint8Array {
  const bytes = new Uint8Array(rows.length * SAMPLING_PARAMS_BYTES);
  const view = new DataView(bytes.buffer);
  rows.forEach((row, s) => {
    if (!Number.isFinite(row.temperature)) {
      throw new InvalidRequestError(
        `sampling row ${s}: temperature must be finite, got ${row.temperature}`,
      );
    }
    if (!(row.topP > 0)) {
      throw new InvalidRequestError(
        `sampling row ${s}: topP must be > 0 (1 disables it), got ${row.topP}`,
      );
    }
    checkU32("topK", row.topK, s);
    checkU32("seed", row.seed, s);
    checkU32("counter", row.counter, s);
    const at = s * SAMPLING_PARAMS_BYTES;
    view.setFloat32(at, row.temperature, true);
    view.setUint32(at + 4, row.topK, true);
    view.setFloat32(at + 8, Math.min(row.topP, 1), true);
    view.setUint32(at + 12, row.seed, true);
    view.setUint32(at + 16, row.counter, true);
  });
  return bytes;
}

/** Most threads per row the shader's workgroup arrays hold (MAX_WG in sample.wgsl). */
export const MAX_SAMPLER_THREADS = 128;

export class Sampler {
  private readonly kernel: Kernel;
  /** Threads per row (one workgroup per row). */
  readonly threads: number;

  /**
   * `threads` defaults to 8 on CPU-emulated adapters (one SIMD group: barriers
   * and per-thread bookkeeping cost more than they parallelise) and to
   * MAX_SAMPLER_THREADS on real GPUs.
   */
  constructor(ctx: GpuContext, readonly vocabSize: number, options: { threads?: number } = {}) {
    this.threads = options.threads ?? (ctx.isSoftware ? 8 : MAX_SAMPLER_THREADS);
    if (!Number.isInteger(this.threads) || this.threads < 1 || this.threads > MAX_SAMPLER_THREADS) {
      throw new RangeError(
        `Sampler: threads must be in [1, ${MAX_SAMPLER_THREADS}], got ${this.threads}`,
      );
    }
    if (!Number.isInteger(vocabSize) || vocabSize < 1 || vocabSize >= 2 ** 24) {
      throw new RangeError(`Sampler: vocabSize must be in [1, 2^24), got ${vocabSize}`);
    }
    this.kernel = Kernel.get(ctx, {
      name: "sample",
      code,
      bindings: ["uniform", "read", "read", "storage"],
      constants: { V: vocabSize, WG: this.threads },
    });
  }

  /**
   * params: uniform { rows: u32 }; logits f32 [rows, vocabSize];
   * samplingParams: packSamplingParams(...) [rows]; tokens u32 [rows].
   */
  bind(
    params: BindingResource,
    logits: BindingResource,
    samplingParams: BindingResource,
    tokens: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, logits, samplingParams, tokens]);
  }

  /** One workgroup per row; `rows` is the value written to params.rows. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    this.kernel.dispatch(pass, group, rows);
  }
}
