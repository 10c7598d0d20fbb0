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
import type { BlockManager } from "../scheduler/block_manager.ts";
import { EngineLoop, type EngineLoopOptions } from "../scheduler/engine_loop.ts";
import type { RequestOutput } from "../scheduler/request.ts";
import type { PruningPolicy } from "../scheduler/kv_pruning.ts";
import type { LoraWeights } from "../engine/lora/lora.ts";
import { AdapterVersions } from "./adapter_versions.ts";
import { schedulerForRunner } from "./runner_scheduler.ts";

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

export class ServingEngine {
  private nextRequestId = 0;
  private readonly versions: AdapterVersions;

  private constructor(
    readonly runner: ModelRunner,
    readonly blockManager: BlockManager,
    readonly loop: EngineLoop,
    private readonly eosIds: readonly number[],
  ) {
    this.versions = new AdapterVersions(runner, blockManager);
  }

  static async create(
    ctx: GpuContext,
    source: ModelSource,
    options: ServingOptions = {},
  ): Promise<ServingEngine> {
    const runner = await ModelRunner.create(ctx, source, options);
    await runner.warmUp();
    const { blockManager, batch: scheduler } = schedulerForRunner(runner, {
      prefixCaching: options.prefixCaching ?? true,
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
    return this.versions.publish(name, weights);
  }

  /** Resident adapter versions ("name@N"): the newest of each name plus older ones still in use. */
  get adapters(): string[] {
    return this.versions.list().map((v) => v.id);
  }

  /**
   * Generates from `prompt` (token ids, BOS included) alongside every other request.
   * Rejects with UnknownAdapterError when options.adapter names no published adapter.
   */
  generate(prompt: readonly number[], options: SubmitOptions): Promise<RequestOutput> {
    let adapterId: string | undefined;
    if (options.adapter !== undefined) {
      try {
        adapterId = this.versions.resolve(options.adapter);
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
      this.versions.acquire(id);
      // Registered before the caller's handlers, so a superseded version is gone when they run.
      const release = () => this.versions.release(id);
      output.then(release, release);
    }
    return output;
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
