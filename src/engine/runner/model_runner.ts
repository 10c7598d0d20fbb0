/**
 * ModelRunner: owns a model's GPU state (weights, paged KV pool, activations,
 * kernels, bind groups) and executes StepPlans: one batched forward pass over
 * every token of the step, sampling on the GPU, and a readback of the sampled
 * token ids only.
 *
 * Per step the CPU does: pack the plan (one writeBuffer of index data, one of
 * uniforms), record one compute pass, submit once, map the sampled ids. Steps
 * can be pipelined (see execute).
 */
import type { GpuContext } from "../gpu/context.ts";
import { createStorage, createUniform, packUniform, readF32 } from "../gpu/buffers.ts";
import type { ModelConfig } from "../model/config.ts";
import type { ModelSource } from "../model/source.ts";
import { type GpuWeights, uploadWeights, type WeightDtype } from "../model/gpu_weights.ts";
import {
  GpuMemoryError,
  InvalidRequestError,
  LoraAdapterError,
  UnknownAdapterError,
} from "../errors.ts";
import { type BlockCopy, GREEDY, type KvEdit, type StepPlan, type StepResult } from "../step.ts";
import { KvCompact } from "../kernels/kv_compact.ts";
import { ReadbackPacer } from "../gpu/readback_pacer.ts";
import {
  packStep,
  type StepCapacity,
  type StepCounts,
  type StepLayout,
  stepLayout,
} from "./step_data.ts";
import { UniformArena } from "./uniform_arena.ts";
import { buildForward, type Forward } from "./forward.ts";
import { PREFILL_TILE_Q } from "../kernels/attention.ts";
import {
  AdapterPool,
  type AdapterPoolOptions,
  DEFAULT_ADAPTER_POOL,
} from "../lora/adapter_pool.ts";
import type { LoraWeights } from "../lora/lora.ts";

export interface RunnerOptions {
  weightDtype?: WeightDtype;
  /** Tokens per step (the prefill chunk budget). */
  maxTokens?: number;
  /** Sequences per step. */
  maxSeqs?: number;
  /** Longest sequence (prompt + generation) in tokens. */
  maxContext?: number;
  blockSize?: number;
  /**
   * KV pool size in blocks; default: from kvMemoryBytes, else maxSeqs sequences of maxContext
   * tokens.
   */
  kvBlocks?: number;
  /** Memory budget of the KV pool (all layers, K and V), in bytes. */
  kvMemoryBytes?: number;
  /**
   * Keep LoRA adapters resident and serve them (SequenceWork.adapterId). Absent: no adapter pool
   * (no memory, no cost). Fields left out take DEFAULT_ADAPTER_POOL's: 4 adapters, rank <= 16,
   * all seven projections (fine for small models; name fewer targets for large ones).
   */
  lora?: Partial<AdapterPoolOptions>;
}

export interface MemoryReport {
  weightBytes: number;
  kvBytes: number;
  kvBlocks: number;
  /** Tokens the KV pool holds (kvBlocks * blockSize). */
  kvTokens: number;
  kvBytesPerToken: number;
  activationBytes: number;
  /** The LoRA adapter pool (0 without one). */
  loraBytes: number;
}

export class ModelRunner {
  private readonly stepBytes: ArrayBuffer;
  /** Counts of the last executed step: the GPU's step data and uniforms hold this step. */
  lastCounts: StepCounts | null = null;
  /** Readback buffers for the sampled ids: one per step in flight, reused. */
  private readonly readbacks: GPUBuffer[] = [];
  private readonly freeReadbacks: GPUBuffer[] = [];
  /** seqId -> sample row, for the sequences that sampled in the last submitted step. */
  private previousSampleRows = new Map<number, number>();
  /** Sleeps through most of each step before awaiting it on Dawn with a CPU-emulated adapter. */
  private readonly pacer: ReadbackPacer;
  /** KV slot moves for pruning; made on first use. */
  private compactor: ReturnType<ModelRunner["createCompactor"]> | null = null;
  /** One block of every KV pool, for the block copies of KV edits (pruning); made on first use. */
  private blockStaging: GPUBuffer | null = null;
  /** Loaded adapter id -> its slot in the adapter pool. */
  private readonly adapterSlots = new Map<string, number>();

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
    /** Resident LoRA adapters; null when created without options.lora. */
    readonly adapterPool: AdapterPool | null,
  ) {
    this.stepBytes = new ArrayBuffer(layout.totalBytes);
    this.pacer = new ReadbackPacer(ctx.backend === "dawn" && ctx.isSoftware);
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
    const kvBytesPerBlock = config.numKvHeads * blockSize * config.headDim * 4;
    const kvBlocks = options.kvBlocks ??
      (options.kvMemoryBytes !== undefined
        ? Math.floor(options.kvMemoryBytes / (2 * config.numLayers * kvBytesPerBlock))
        : capacity.maxSeqs * capacity.maxBlocksPerSeq);
    if (!Number.isInteger(kvBlocks) || kvBlocks < capacity.maxBlocksPerSeq) {
      throw new GpuMemoryError(
        `KV pool of ${kvBlocks} blocks cannot hold one sequence of ${maxContext} tokens ` +
          `(${capacity.maxBlocksPerSeq} blocks of ${blockSize}); raise the KV memory budget or ` +
          `lower the context length`,
      );
    }
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
    const lora = options.lora
      ? new AdapterPool(ctx, config, { ...DEFAULT_ADAPTER_POOL, ...options.lora })
      : null;
    const forward = buildForward({
      ctx,
      config,
      capacity,
      weights,
      kvBlocks,
      layout,
      stepBuffer,
      uniforms,
      lora,
    });
    const kvBytes = 2 * config.numLayers * kvBlocks * kvBytesPerBlock;
    const memory: MemoryReport = {
      weightBytes: weights.bytes,
      kvBytes,
      kvBlocks,
      kvTokens: kvBlocks * blockSize,
      kvBytesPerToken: kvBytes / (kvBlocks * blockSize),
      activationBytes: forward.activationBytes + layout.totalBytes,
      loraBytes: lora?.bytes ?? 0,
    };
    return new ModelRunner(
      ctx,
      config,
      capacity,
      weights,
      kvBlocks,
      layout,
      stepBuffer,
      uniforms,
      forward,
      memory,
      lora,
    );
  }

  /**
   * Makes an adapter resident under `id`; steps then serve sequences whose adapterId is `id`.
   * Throws LoraAdapterError (no pool, id taken, adapter does not fit) or AdapterPoolFullError.
   */
  loadAdapter(id: string, weights: LoraWeights): void {
    if (!this.adapterPool) {
      throw new LoraAdapterError(
        `adapter "${id}": this engine has no adapter pool; create it with the lora option`,
      );
    }
    if (this.adapterSlots.has(id)) {
      throw new LoraAdapterError(
        `adapter "${id}" is already loaded; unload it first or use another id`,
      );
    }
    this.adapterSlots.set(id, this.adapterPool.load(weights));
  }

  /**
   * Frees an adapter's slot. Steps already submitted still read it correctly (later uploads are
   * queued after them); sequences must not name it in later steps.
   */
  unloadAdapter(id: string): void {
    const slot = this.adapterSlots.get(id);
    if (slot === undefined) throw new UnknownAdapterError(id, this.adapters);
    this.adapterPool!.free(slot);
    this.adapterSlots.delete(id);
  }

  /** Ids of the loaded adapters, in load order. */
  get adapters(): string[] {
    return [...this.adapterSlots.keys()];
  }

  /**
   * Runs one step; resolves with the sampled token of every sequence that asked for one.
   * Steps may be pipelined: call execute again before the previous promise settles and the
   * GPU runs them back to back, in call order (everything up to the submit happens
   * synchronously in this call). With FEEDBACK_TOKEN inputs a decode step needs no result of
   * the step before it, which hides the readback latency (about 11 ms per await on Deno's
   * wgpu, whatever the work).
   */
  execute(plan: StepPlan): Promise<StepResult> {
    const { counts, sampleOrder, newMassSlots } = packStep(
      plan,
      this.capacity,
      this.layout,
      this.config.vocabSize,
      this.stepBytes,
      this.previousSampleRows,
      this.adapterSlots,
    );
    this.previousSampleRows = new Map(
      sampleOrder.map((planIndex, row) => [plan.sequences[planIndex].seqId, row]),
    );
    const device = this.ctx.device;
    // Queue writes are ordered with submits: steps still running keep their own data.
    device.queue.writeBuffer(this.stepBuffer, 0, this.stepBytes);
    const ids = this.layout.tokenIds;
    device.queue.writeBuffer(
      this.forward.tokenIds,
      0,
      this.stepBytes,
      ids.offset,
      Math.max(4, counts.tokens * 4),
    );
    this.uniforms.write(counts);
    this.lastCounts = counts;
    const encoder = device.createCommandEncoder();
    // A slot's mass starts from zero when its token is written (blocks are reused).
    for (const [first, count] of contiguousRuns(newMassSlots)) {
      encoder.clearBuffer(this.forward.mass, first * 4, count * 4);
    }
    const pass = encoder.beginComputePass();
    this.forward.encode(pass, counts);
    pass.end();
    const readback = this.freeReadbacks.pop() ?? this.createReadback();
    const bytes = counts.sampledSeqs * 4;
    if (bytes > 0) encoder.copyBufferToBuffer(this.forward.sampled, 0, readback, 0, bytes);
    const start = performance.now();
    device.queue.submit([encoder.finish()]);
    return this.collect(plan, sampleOrder, readback, bytes, start, counts.tokens);
  }

  private async collect(
    plan: StepPlan,
    sampleOrder: number[],
    readback: GPUBuffer,
    bytes: number,
    start: number,
    tokens: number,
  ): Promise<StepResult> {
    const sampled = new Array<number>(plan.sequences.length).fill(-1);
    try {
      await this.pacer.beforeWait(tokens, start);
      if (bytes > 0) {
        await readback.mapAsync(GPUMapMode.READ, 0, bytes);
        const ids = new Uint32Array(readback.getMappedRange(0, bytes));
        sampleOrder.forEach((planIndex, row) => (sampled[planIndex] = ids[row]));
        readback.unmap();
      } else {
        await this.ctx.device.queue.onSubmittedWorkDone();
      }
    } finally {
      this.freeReadbacks.push(readback);
    }
    this.ctx.throwIfFailed();
    const gpuMs = performance.now() - start;
    this.pacer.record(tokens, gpuMs);
    return { sampled, gpuMs };
  }

  /**
   * The attention mass of every physical KV slot (f32 [kvBlocks * blockSize]), after all
   * submitted steps.
   */
  readMass(): Promise<Float32Array> {
    return readF32(this.ctx, this.forward.mass, this.kvBlocks * this.capacity.blockSize);
  }

  /**
   * Submits a KV edit (block copies, then slot moves in every layer and in the attention mass);
   * steps executed later see its result. Resolves when the GPU has done it.
   */
  async applyKvEdit(edit: KvEdit): Promise<void> {
    const moves = edit.moves;
    const encoder = this.ctx.device.createCommandEncoder();
    for (const copy of edit.copies) this.encodeBlockCopy(encoder, copy);
    const slots = this.kvBlocks * this.capacity.blockSize;
    for (const [src, dst] of moves) {
      if (![src, dst].every((x) => Number.isInteger(x) && x >= 0 && x < slots)) {
        throw new InvalidRequestError(
          `KV move ${src} -> ${dst}: slot outside the pool of ${slots}`,
        );
      }
    }
    if (moves.length > 0) {
      this.compactor ??= this.createCompactor();
      const { kernel, params, movesBuffer } = this.compactor;
      if (moves.length > kernel.maxMoves) {
        throw new InvalidRequestError(
          `KV edit of ${moves.length} moves; at most ${kernel.maxMoves}`,
        );
      }
      this.ctx.device.queue.writeBuffer(params, 0, packUniform([["u32", moves.length]]));
      this.ctx.device.queue.writeBuffer(movesBuffer, 0, Uint32Array.from(moves.flat()));
      const pass = encoder.beginComputePass();
      for (const groups of this.compactor.groups) kernel.encode(pass, groups, moves.length);
      pass.end();
    }
    this.ctx.device.queue.submit([encoder.finish()]);
    await this.ctx.device.queue.onSubmittedWorkDone();
    this.ctx.throwIfFailed();
  }

  /** KV compaction kernels for every layer and the mass, sized for one sequence's whole context. */
  private createCompactor() {
    const { blockSize, maxBlocksPerSeq } = this.capacity;
    const maxMoves = maxBlocksPerSeq * blockSize;
    const kernel = new KvCompact(this.ctx, {
      numKvHeads: this.config.numKvHeads,
      headDim: this.config.headDim,
      blockSize,
    }, { maxMoves });
    const params = createUniform(this.ctx, packUniform([["u32", 0]]), "kv_compact params");
    const movesBuffer = createStorage(this.ctx, maxMoves * 8, "kv_compact moves");
    const { kCaches, vCaches, mass } = this.forward;
    const groups = [
      ...kCaches.map((k, l) => kernel.bind(params, movesBuffer, k, vCaches[l])),
      kernel.bindMass(params, movesBuffer, mass),
    ];
    return { kernel, params, movesBuffer, groups };
  }

  /**
   * Runs a two-token prefill and a decode on KV block 0 (whose contents are then garbage, as for
   * any block before its sequence writes it), so that drivers that compile pipelines on first
   * use do it now rather than in the first request.
   */
  async warmUp(): Promise<void> {
    const work = (tokens: number[], startPosition: number) => ({
      seqId: -1,
      tokens,
      startPosition,
      blockTable: [0],
      sample: true,
      sampling: GREEDY,
    });
    await this.execute({ sequences: [work([0, 0].slice(0, this.capacity.maxTokens), 0)] });
    await this.execute({ sequences: [work([0], 1)] });
    this.previousSampleRows.clear();
  }

  /**
   * Copies one KV block (all layers, K and V: [Hkv, BS, hd] f32 each, contiguous) through a
   * staging buffer, since WebGPU copies never have the same source and destination buffer.
   */
  private encodeBlockCopy(encoder: GPUCommandEncoder, { src, dst }: BlockCopy): void {
    for (const id of [src, dst]) {
      if (!Number.isInteger(id) || id < 0 || id >= this.kvBlocks) {
        throw new InvalidRequestError(
          `block copy ${src} -> ${dst}: block ${id} is outside the pool of ${this.kvBlocks}`,
        );
      }
    }
    const bytes = this.forward.kvBlockBytes;
    this.blockStaging ??= this.ctx.device.createBuffer({
      label: "kv block copy staging",
      size: bytes * this.forward.kvCaches.length,
      usage: GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST,
    });
    this.forward.kvCaches.forEach((cache, i) =>
      encoder.copyBufferToBuffer(cache, src * bytes, this.blockStaging!, i * bytes, bytes)
    );
    this.forward.kvCaches.forEach((cache, i) =>
      encoder.copyBufferToBuffer(this.blockStaging!, i * bytes, cache, dst * bytes, bytes)
    );
  }

  private createReadback(): GPUBuffer {
    const buffer = this.ctx.device.createBuffer({
      label: "sampled readback",
      size: this.capacity.maxSeqs * 4,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
    });
    this.readbacks.push(buffer);
    return buffer;
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
    for (const buffer of this.readbacks) buffer.destroy();
    this.blockStaging?.destroy();
    this.adapterPool?.destroy();
    if (this.compactor) {
      this.compactor.kernel.destroy();
      this.compactor.params.destroy();
      this.compactor.movesBuffer.destroy();
    }
  }
}

/** [first, count] runs of consecutive values in ascending-within-run order. */
function contiguousRuns(values: readonly number[]): [number, number][] {
  const runs: [number, number][] = [];
  for (const v of values) {
    const last = runs.at(-1);
    if (last && last[0] + last[1] === v) last[1]++;
    else runs.push([v, 1]);
  }
  return runs;
}
