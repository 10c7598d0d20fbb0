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
}

export class ServingEngine {
  private nextRequestId = 0;

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

  /** Generates from `prompt` (token ids, BOS included) alongside every other request. */
  generate(prompt: readonly number[], options: SubmitOptions): Promise<RequestOutput> {
    return this.loop.submit({
      id: this.nextRequestId++,
      prompt,
      maxTokens: options.maxTokens,
      sampling: options.sampling,
      eosIds: options.eosIds ?? this.eosIds,
      onToken: options.onToken,
      kvBudget: options.kvBudget,
    });
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
