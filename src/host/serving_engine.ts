/**
 * The serving engine: a ModelRunner (GPU state, kernels) driven by the
 * continuous-batching scheduler over the paged KV cache. This is the one place
 * that wires src/engine to src/scheduler; the CLI, the HTTP service and the
 * browser worker all use it.
 */
import type { GpuContext } from "../engine/gpu/context.ts";
import type { ModelSource } from "../engine/model/source.ts";
import { ModelRunner, type RunnerOptions } from "../engine/runner/model_runner.ts";
import type { SamplingParams } from "../engine/step.ts";
import { BlockManager } from "../scheduler/block_manager.ts";
import { BatchScheduler } from "../scheduler/batch_scheduler.ts";
import { EngineLoop, type EngineLoopOptions } from "../scheduler/engine_loop.ts";
import type { RequestOutput } from "../scheduler/request.ts";
import type { PruningPolicy } from "../scheduler/kv_pruning.ts";
import type { LoraWeights } from "../engine/lora/lora.ts";
import { InvalidRequestError, UnknownAdapterError } from "../engine/errors.ts";

export interface ServingOptions extends RunnerOptions, EngineLoopOptions {
  /** Share KV blocks between requests with a common prefix (default on). */
  prefixCaching?: boolean;
  /** KV entries a request keeps before pruning (default 0: never prune, exact). */
  kvBudget?: number;
  pruning?: PruningPolicy;
}

export interface SubmitOptions {
  maxTokens: number;
  sampling: SamplingParams;
  /** Default: the model's EOS ids. */
  eosIds?: readonly number[];
  onToken?: (id: number) => void;
  /** KV budget of this request (default: the engine's). */
  kvBudget?: number;
  /**
   * Run on a published LoRA adapter: a name (its newest version when submitted) or a versioned
   * id from publishAdapter ("name@2"). The request keeps that version to its end.
   */
  adapter?: string;
}

/** A published adapter version, resident in the runner while it is the newest or in use. */
interface AdapterVersion {
  name: string;
  /** Requests submitted on it and not settled yet. */
  users: number;
}

export class ServingEngine {
  private nextRequestId = 0;
  /** Adapter name -> its newest version number. */
  private readonly newestVersion = new Map<string, number>();
  /** Resident versioned ids ("name@N"). */
  private readonly versions = new Map<string, AdapterVersion>();

  private constructor(
    readonly runner: ModelRunner,
    readonly blockManager: BlockManager,
    readonly loop: EngineLoop,
    private readonly eosIds: readonly number[],
  ) {}

  static async create(
    ctx: GpuContext,
    source: ModelSource,
    options: ServingOptions = {},
  ): Promise<ServingEngine> {
    const runner = await ModelRunner.create(ctx, source, options);
    await runner.warmUp();
    const { capacity } = runner;
    const blockManager = new BlockManager({
      numBlocks: runner.kvBlocks,
      blockSize: capacity.blockSize,
      enablePrefixCaching: options.prefixCaching ?? true,
    });
    const scheduler = new BatchScheduler({
      blockManager,
      maxTokensPerStep: capacity.maxTokens,
      maxSeqsPerStep: capacity.maxSeqs,
      maxContext: capacity.maxBlocksPerSeq * capacity.blockSize,
      kvBudget: options.kvBudget,
      pruning: options.pruning,
    });
    const loop = new EngineLoop(runner, scheduler, {
      ...options,
      pipelineDepth: options.pipelineDepth ?? defaultPipelineDepth(ctx),
    });
    const eosIds = source.generationConfig?.eosTokenIds ?? source.config.eosTokenIds;
    return new ServingEngine(runner, blockManager, loop, eosIds);
  }

  /**
   * Publishes a new version of the LoRA adapter `name` and returns its versioned id ("name@N",
   * N = 1, 2, ...). Requests submitted later by name get it; requests already running keep the
   * version they started with. Older versions no request uses are freed now, the others when
   * their last request ends. Needs an engine created with the lora option (LoraAdapterError);
   * AdapterPoolFullError when every slot holds a version in use.
   */
  publishAdapter(name: string, weights: LoraWeights): string {
    if (typeof name !== "string" || name.length === 0 || name.includes("@")) {
      throw new InvalidRequestError(`adapter name "${name}" must be non-empty and without "@"`);
    }
    // Validate before freeing anything, so a rejected adapter leaves the published ones in place.
    this.runner.adapterPool?.validate(weights);
    for (const [id, version] of this.versions) {
      if (version.name === name && version.users === 0) this.unload(id);
    }
    const id = `${name}@${(this.newestVersion.get(name) ?? 0) + 1}`;
    this.runner.loadAdapter(id, weights);
    this.newestVersion.set(name, (this.newestVersion.get(name) ?? 0) + 1);
    this.versions.set(id, { name, users: 0 });
    return id;
  }

  /** Resident adapter versions ("name@N"): the newest of each name plus older ones still in use. */
  get adapters(): string[] {
    return [...this.versions.keys()];
  }

  /**
   * Generates from `prompt` (token ids, BOS included) alongside every other request.
   * Rejects with UnknownAdapterError when options.adapter names no published adapter.
   */
  generate(prompt: readonly number[], options: SubmitOptions): Promise<RequestOutput> {
    let adapterId: string | undefined;
    if (options.adapter !== undefined) {
      try {
        adapterId = this.resolveAdapter(options.adapter);
      } catch (error) {
        return Promise.reject(error);
      }
    }
    const output = this.loop.submit({
      id: this.nextRequestId++,
      prompt,
      maxTokens: options.maxTokens,
      sampling: options.sampling,
      eosIds: options.eosIds ?? this.eosIds,
      onToken: options.onToken,
      kvBudget: options.kvBudget,
      adapterId,
    });
    if (adapterId !== undefined) {
      const id = adapterId;
      this.versions.get(id)!.users++;
      // Registered before the caller's handlers, so a superseded version is gone when they run.
      const release = () => this.release(id);
      output.then(release, release);
    }
    return output;
  }

  /** The versioned id a request on `adapter` (a name or a resident versioned id) runs on. */
  private resolveAdapter(adapter: string): string {
    if (this.versions.has(adapter)) return adapter;
    const newest = this.newestVersion.get(adapter);
    if (newest !== undefined) return `${adapter}@${newest}`;
    throw new UnknownAdapterError(adapter, [...this.newestVersion.keys(), ...this.versions.keys()]);
  }

  private release(id: string): void {
    const version = this.versions.get(id)!;
    version.users--;
    const newest = `${version.name}@${this.newestVersion.get(version.name)}`;
    if (version.users === 0 && id !== newest) this.unload(id);
  }

  /** Frees a version's adapter slot and the prefix-cache blocks computed with it. */
  private unload(id: string): void {
    this.runner.unloadAdapter(id);
    this.blockManager.dropAdapter(id);
    this.versions.delete(id);
  }

  destroy(): void {
    this.runner.destroy();
  }
}

/**
 * Steps in flight by default. Deno's wgpu resolves GPU readbacks on a ~11 ms poll, so three
 * steps in flight keep the GPU busy. Dawn's Node bindings instead spin the JS thread on
 * setImmediate while anything is pending; on a CPU-emulated adapter (SwiftShader) that spin
 * takes a core from the emulated GPU, so there one step at a time is faster.
 */
function defaultPipelineDepth(ctx: GpuContext): number {
  if (ctx.backend === "dawn") return ctx.isSoftware ? 1 : 2;
  return 3;
}
