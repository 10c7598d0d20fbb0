/**
 * ModelRunner: owns a model's GPU state (weights, paged KV pool, activations,
 * kernels, bind groups) and executes StepPlans: one batched forward pass over
 * every token of the step, sampling on the GPU, and a readback of the sampled
 * token ids only.
 *
 * Per step the CPU does: pack the plan (one writeBuffer of index data, one of
 * uniforms), record one compute pass, submit once, map the sampled ids.
 */
import type { GpuContext } from "../gpu/context.ts";
import { createStorage, readF32 } from "../gpu/buffers.ts";
import type { ModelConfig } from "../model/config.ts";
import type { ModelSource } from "../model/source.ts";
import { type GpuWeights, uploadWeights, type WeightDtype } from "../model/gpu_weights.ts";
import { GpuMemoryError } from "../errors.ts";
import type { StepPlan, StepResult } from "../step.ts";
import { packStep, type StepCapacity, type StepCounts, stepLayout, type StepLayout } from "./step_data.ts";
import { UniformArena } from "./uniform_arena.ts";
import { buildForward, type Forward } from "./forward.ts";
import { PREFILL_TILE_Q } from "../kernels/attention.ts";

export interface RunnerOptions {
  weightDtype?: WeightDtype;
  /** Tokens per step (the prefill chunk budget). */
  maxTokens?: number;
  /** Sequences per step. */
  maxSeqs?: number;
  /** Longest sequence (prompt + generation) in tokens. */
  maxContext?: number;
  blockSize?: number;
  /** KV pool size in blocks; default: maxSeqs sequences of maxContext tokens. */
  kvBlocks?: number;
}

export interface MemoryReport {
  weightBytes: number;
  kvBytes: number;
  kvBlocks: number;
  kvBytesPerToken: number;
  activationBytes: number;
}

export class ModelRunner {
  private readonly stepBytes: ArrayBuffer;
  /** Counts of the last executed step: the GPU's step data and uniforms hold this step. */
  lastCounts: StepCounts | null = null;
  private readonly readback: GPUBuffer;

  private constructor(
    readonly ctx: GpuContext,
    readonly config: ModelConfig,
    readonly capacity: StepCapacity,
    readonly weights: GpuWeights,
    readonly kvBlocks: number,
    private readonly layout: StepLayout,
    private readonly stepBuffer: GPUBuffer,
    private readonly uniforms: UniformArena<StepCounts>,
    /** The recorded forward pass (read by the benchmark's per-kernel timing). */
    readonly forward: Forward,
    readonly memory: MemoryReport,
  ) {
    this.stepBytes = new ArrayBuffer(layout.totalBytes);
    this.readback = ctx.device.createBuffer({
      label: "sampled readback",
      size: capacity.maxSeqs * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
  }

  static async create(ctx: GpuContext, source: ModelSource, options: RunnerOptions = {}) {
    const config = source.config;
    const blockSize = options.blockSize ?? 16;
    const maxContext = Math.min(options.maxContext ?? 2048, config.maxPositionEmbeddings);
    const capacity: StepCapacity = {
      maxTokens: options.maxTokens ?? 512,
      maxSeqs: options.maxSeqs ?? 16,
      maxBlocksPerSeq: Math.ceil(maxContext / blockSize),
      blockSize,
      tileQ: PREFILL_TILE_Q,
    };
    const kvBlocks = options.kvBlocks ?? capacity.maxSeqs * capacity.maxBlocksPerSeq;
    const kvBytesPerBlock = config.numKvHeads * blockSize * config.headDim * 4;
    if (kvBlocks * kvBytesPerBlock > ctx.limits.maxStorageBufferBindingSize) {
      throw new GpuMemoryError(
        `KV pool of ${kvBlocks} blocks (${kvBlocks * kvBytesPerBlock} bytes per layer and K/V) ` +
          `exceeds maxStorageBufferBindingSize ${ctx.limits.maxStorageBufferBindingSize}; ` +
          `lower --max-context or the number of sequences`,
      );
    }

    const weights = await uploadWeights(ctx, source, options.weightDtype ?? "f32");
    const layout = stepLayout(capacity);
    const stepBuffer = createStorage(ctx, layout.totalBytes, "step data");
    const uniforms = new UniformArena<StepCounts>(ctx, 64);
    const forward = buildForward({
      ctx, config, capacity, weights, kvBlocks, layout, stepBuffer, uniforms,
    });
    const kvBytes = 2 * config.numLayers * kvBlocks * kvBytesPerBlock;
    const memory: MemoryReport = {
      weightBytes: weights.bytes,
      kvBytes,
      kvBlocks,
      kvBytesPerToken: kvBytes / (kvBlocks * blockSize),
      activationBytes: forward.activationBytes + layout.totalBytes,
    };
    return new ModelRunner(
      ctx, config, capacity, weights, kvBlocks, layout, stepBuffer, uniforms, forward, memory,
    );
  }

  /** Runs one step; resolves with the sampled token of every sequence that asked for one. */
  async execute(plan: StepPlan): Promise<StepResult> {
    const { counts, sampleOrder } = packStep(
      plan, this.capacity, this.layout, this.config.vocabSize, this.stepBytes,
    );
    const device = this.ctx.device;
    device.queue.writeBuffer(this.stepBuffer, 0, this.stepBytes);
    this.uniforms.write(counts);
    this.lastCounts = counts;
    const encoder = device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    this.forward.encode(pass, counts);
    pass.end();
    if (counts.sampledSeqs > 0) {
      encoder.copyBufferToBuffer(this.forward.sampled, 0, this.readback, 0, counts.sampledSeqs * 4);
    }
    const start = performance.now();
    device.queue.submit([encoder.finish()]);
    const sampled = new Array<number>(plan.sequences.length).fill(-1);
    if (counts.sampledSeqs > 0) {
      await this.readback.mapAsync(GPUMapMode.READ, 0, counts.sampledSeqs * 4);
      const ids = new Uint32Array(this.readback.getMappedRange(0, counts.sampledSeqs * 4));
      sampleOrder.forEach((planIndex, row) => (sampled[planIndex] = ids[row]));
      this.readback.unmap();
    } else {
      await device.queue.onSubmittedWorkDone();
    }
    this.ctx.throwIfFailed();
    return { sampled, gpuMs: performance.now() - start };
  }

  /**
   * The logits [rows, V] of the last step's sampling sequences, in plan order.
   * A slow readback for tests and analysis; generation never reads logits.
   */
  readLogits(rows: number): Promise<Float32Array> {
    return readF32(this.ctx, this.forward.logits, rows * this.config.vocabSize);
  }

  destroy(): void {
    this.forward.destroy();
    this.uniforms.destroy();
    this.stepBuffer.destroy();
    this.readback.destroy();
  }
}
