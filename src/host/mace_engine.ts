/**
 * The engine as its callers see it (the Engine interface of ./engine_api.ts): the model runner,
 * the DPO fine-tuner and the CoScheduler, driven by the one engine loop (./engine_loop.ts):
 * iterations of a serving step and/or one fine-tuning slice, as the policy decides, pipelined
 * (the next is submitted before the last one's results are read).
 *
 * Feedback pairs train a LoRA adapter continuously; every `publishEvery` optimizer steps the
 * adapter is published as a new version ("<adapterName>@N") and requests submitted afterwards
 * without an explicit adapter run on it (requests keep the version they started with). Under the
 * inference-only policy there is no fine-tuner at all: serving alone (`mace generate`, `bench`).
 *
 * Callbacks: an `onToken` that throws is the caller's problem. The engine catches it, the token
 * still counts, the request goes on and its result has every token (one rule for every caller;
 * the worker client reports such an error once the request has ended).
 */
import { createGpuContext, type GpuContext } from "../engine/gpu/context.ts";
import { SpanTimer } from "../engine/gpu/span_timer.ts";
import { openModelWithTokenizer } from "../engine/load.ts";
import type { ModelSource } from "../engine/model/source.ts";
import { ModelRunner } from "../engine/runner/model_runner.ts";
import { GREEDY, type SamplingParams } from "../engine/step.ts";
import { EngineClosedError, InvalidRequestError } from "../engine/errors.ts";
import { type LoraConfig, type LoraWeights, parseLoraTargets } from "../engine/lora/lora.ts";
import { DpoTrainer, type TrainingPair } from "../engine/training/dpo_trainer.ts";
import type { BatchScheduler, ScheduledStep } from "../scheduler/batch_scheduler.ts";
import type { BlockManager } from "../scheduler/block_manager.ts";
import { CostModel } from "../scheduler/cost_model.ts";
import { MetricsRecorder } from "../scheduler/metrics.ts";
import type { RequestState } from "../scheduler/request.ts";
import {
  CoScheduler,
  type Iteration,
  type IterationEffects,
} from "../scheduler/mace/co_scheduler.ts";
import { type PolicyOptions, policyOptions } from "../scheduler/mace/policy.ts";
import { DEFAULT_PROFILE, loadProfile } from "../scheduler/profiles.ts";
import type {
  AdapterInfo,
  Engine,
  EngineInfo,
  EngineMetrics,
  EngineOptions,
  FeedbackPair,
  FeedbackReceipt,
  GenerateRequest,
  GenerateResult,
} from "./engine_api.ts";
import { AdapterVersions } from "./adapter_versions.ts";
import { BUNDLED_MODEL } from "./defaults.ts";
import { EngineLoop } from "./engine_loop.ts";
import { GpuIterationExecutor } from "./gpu_executor.ts";
import { schedulerForRunner } from "./runner_scheduler.ts";

/** Longest prompt + response the fine-tuner trains on (tokens). */
const TRAIN_MAX_LENGTH = 256;

interface LiveRequest {
  requestId: string;
  state: RequestState;
  adapterId?: string;
  resolve: (result: GenerateResult) => void;
  reject: (error: unknown) => void;
}

/** What the engine is built from, besides its options. */
interface Parts {
  ctx: GpuContext;
  /** The engine destroys the context on close only when it made it. */
  ownsContext: boolean;
  source: ModelSource;
  modelName: string;
}

export class MaceEngine implements Engine {
  private readonly live = new Map<number, LiveRequest>();
  private readonly byRequestId = new Map<string, number>();
  private nextSeqId = 0;
  private nextPairId = 0;
  private closed = false;
  private publishedAdapter: string | null = null;
  private readonly loop: EngineLoop<TrainingPair>;
  private readonly timer: SpanTimer | null;
  /** In-process observers (benchmarks): called with each serving step after it completed. */
  onStep: ((step: ScheduledStep) => void) | null = null;

  private constructor(
    private readonly parts: Parts,
    /** The GPU side of serving: weights, KV pool, adapters (benchmarks read its capacity). */
    readonly runner: ModelRunner,
    private readonly trainer: DpoTrainer | null,
    /** The KV block manager (its stats: blocks used, cached, free; prefix hits). */
    readonly blockManager: BlockManager,
    private readonly batch: BatchScheduler,
    private readonly scheduler: CoScheduler<TrainingPair>,
    private readonly cost: CostModel,
    private readonly metricsRecorder: MetricsRecorder,
    private readonly versions: AdapterVersions,
    private readonly policy: PolicyOptions,
    private readonly engineInfo: EngineInfo,
    private readonly adapterName: string,
    private readonly startMs: number,
    pipelineDepth: number,
  ) {
    this.timer = SpanTimer.create(parts.ctx);
    const executor = new GpuIterationExecutor(
      runner,
      trainer,
      batch,
      policy.layersPerSlice,
      this.timer,
    );
    this.loop = new EngineLoop(scheduler, batch, executor, {
      completed: (it, effects, now) => this.completed(it, effects, now),
      failed: (error) => this.fail(error),
      idleExit: () => this.live.size === 0,
    }, { depth: pipelineDepth });
  }

  /** Opens the model (default: the bundled one) and a GPU of `options.backend`, then starts. */
  static async create(options: EngineOptions = {}): Promise<MaceEngine> {
    const modelPath = options.model ?? BUNDLED_MODEL;
    const { source } = await openModelWithTokenizer(modelPath, options.tokenizer);
    const ctx = await createGpuContext({ backend: options.backend ?? "auto" });
    const modelName = modelPath.replace(/\/+$/, "").split("/").pop() ?? modelPath;
    try {
      return await MaceEngine.build({ ctx, ownsContext: true, source, modelName }, options);
    } catch (error) {
      ctx.destroy();
      throw error;
    }
  }

  /**
   * An engine on a GPU context and model the caller already has (the CLI, tests). The context
   * stays the caller's: close() leaves it open. `options.model`, `tokenizer` and `backend` are
   * ignored.
   */
  static open(
    ctx: GpuContext,
    source: ModelSource,
    options: EngineOptions = {},
    modelName = "model",
  ): Promise<MaceEngine> {
    return MaceEngine.build({ ctx, ownsContext: false, source, modelName }, options);
  }

  private static async build(parts: Parts, options: EngineOptions): Promise<MaceEngine> {
    const { ctx, source } = parts;
    const ft = options.finetune ?? {};
    const serving = options.serving ?? {};
    const policy = policyOptions(options.policy ?? "mace", {
      ttftSloMs: options.ttftSloMs,
      tbtSloMs: options.tbtSloMs,
      pairsPerStep: ft.pairsPerStep,
      publishEvery: ft.publishEvery,
      kvBudget: serving.kvBudget,
      prefixSharing: serving.prefixCaching,
    });
    const lora: LoraConfig = {
      rank: ft.rank ?? 8,
      alpha: ft.alpha ?? 16,
      targets: parseLoraTargets(ft.targets ?? ["q", "v"]),
      dropout: 0,
    };
    const servedTargets = parseLoraTargets([...lora.targets, ...(serving.adapterTargets ?? [])]);
    const pipelineDepth = serving.pipelineDepth ?? defaultPipelineDepth(ctx);
    if (!Number.isInteger(pipelineDepth) || pipelineDepth < 1) {
      throw new InvalidRequestError(`pipeline depth must be an integer >= 1, got ${pipelineDepth}`);
    }
    const profile = await loadProfile(options.profile ?? DEFAULT_PROFILE);
    const runner = await ModelRunner.create(ctx, source, {
      maxContext: options.maxContext,
      maxSeqs: serving.maxSeqs,
      maxTokens: serving.maxTokensPerStep,
      kvBlocks: serving.kvBlocks,
      weightDtype: serving.weights,
      lora: {
        maxAdapters: serving.maxAdapters ?? 4,
        maxRank: Math.max(serving.adapterRank ?? 16, lora.rank),
        targets: servedTargets,
      },
    });
    try {
      await runner.warmUp();
      const { capacity } = runner;
      const maxContext = capacity.maxBlocksPerSeq * capacity.blockSize;
      // Inference-only never trains: no fine-tuner, no training memory.
      const trainer = policy.name === "inference-only" ? null : new DpoTrainer(
        ctx,
        source.config,
        runner.weights,
        lora,
        {
          learningRate: ft.learningRate ?? 5e-4,
          beta: ft.beta ?? 0.1,
          maxPairsPerStep: policy.pairsPerStep,
          maxLength: Math.min(TRAIN_MAX_LENGTH, maxContext),
        },
      );
      trainer?.initialize(ft.seed ?? 0);
      const { blockManager, batch } = schedulerForRunner(runner, {
        prefixCaching: policy.prefixSharing,
        kvBudget: policy.kvBudget,
      });
      const startMs = performance.now();
      const metrics = new MetricsRecorder(startMs);
      const cost = new CostModel(profile);
      const scheduler = new CoScheduler<TrainingPair>({
        policy,
        batch,
        cost,
        numLayers: source.config.numLayers,
        memoryBytes: runner.memory.kvBytes + (trainer?.memory.activationBytes ?? 0),
        metrics,
        referenceCached: (item) => trainer?.hasReference(item.payload) ?? false,
      }, startMs);
      const eosIds = [...(source.generationConfig?.eosTokenIds ?? source.config.eosTokenIds)];
      const info: EngineInfo = {
        model: parts.modelName,
        backend: ctx.backend,
        device: ctx.adapterDescription,
        policy: policy.name,
        maxContext,
        vocabSize: source.config.vocabSize,
        eosIds,
      };
      return new MaceEngine(
        parts,
        runner,
        trainer,
        blockManager,
        batch,
        scheduler,
        cost,
        metrics,
        new AdapterVersions(runner, blockManager),
        policy,
        info,
        ft.adapterName ?? "mace",
        startMs,
        pipelineDepth,
      );
    } catch (error) {
      runner.destroy();
      throw error;
    }
  }

  info(): Promise<EngineInfo> {
    return Promise.resolve(structuredClone(this.engineInfo));
  }

  generate(request: GenerateRequest, onToken?: (token: number) => void): Promise<GenerateResult> {
    try {
      return this.submit(request, onToken);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  private submit(
    request: GenerateRequest,
    onToken?: (token: number) => void,
  ): Promise<GenerateResult> {
    if (this.closed) throw new EngineClosedError("the engine is closed; create a new one");
    if (typeof request !== "object" || request === null) {
      throw new InvalidRequestError("request must be an object");
    }
    this.checkTokens(request.prompt, "prompt");
    const requestId = request.requestId ?? `req-${this.nextSeqId}`;
    if (typeof requestId !== "string" || requestId.length === 0) {
      throw new InvalidRequestError("requestId must be a non-empty string");
    }
    if (this.byRequestId.has(requestId)) {
      throw new InvalidRequestError(`request id "${requestId}" is already in use`);
    }
    const sampling: SamplingParams = { ...GREEDY, ...request.sampling };
    // Without an explicit adapter a request runs on the newest adapter the fine-tuner published.
    const adapter = request.adapter ?? this.versions.newest(this.adapterName) ?? undefined;
    const adapterId = adapter === undefined ? undefined : this.versions.resolve(adapter);
    const seqId = this.nextSeqId++;
    const now = performance.now();
    const state = this.scheduler.addRequest({
      id: seqId,
      prompt: request.prompt,
      maxTokens: request.maxTokens,
      sampling,
      eosIds: request.ignoreEos ? [] : this.engineInfo.eosIds,
      // A failing callback must not stop the engine: the token still counts and the request
      // goes on.
      onToken: onToken && ((token) => {
        try {
          onToken(token);
        } catch { /* the caller's problem; its result still has every token */ }
      }),
      adapterId,
      kvBudget: request.kvBudget,
    }, now);
    if (adapterId !== undefined) this.versions.acquire(adapterId);
    const result = new Promise<GenerateResult>((resolve, reject) => {
      this.live.set(seqId, { requestId, state, adapterId, resolve, reject });
    });
    this.byRequestId.set(requestId, seqId);
    this.loop.kick();
    return result;
  }

  cancel(requestId: string): Promise<boolean> {
    const seqId = this.byRequestId.get(requestId);
    if (seqId === undefined) return Promise.resolve(false);
    const now = performance.now();
    const req = this.scheduler.cancel(seqId, now);
    if (!req) return Promise.resolve(false);
    this.settle(seqId, now, true);
    return Promise.resolve(true);
  }

  submitFeedback(pairs: FeedbackPair[]): Promise<FeedbackReceipt> {
    try {
      if (this.closed) throw new EngineClosedError("the engine is closed; create a new one");
      if (!Array.isArray(pairs) || pairs.length === 0) {
        throw new InvalidRequestError(
          "feedback must be a non-empty array of {prompt, chosen, rejected} pairs",
        );
      }
      const maxLength = this.trainMaxLength;
      const items = pairs.map((pair, i) => {
        if (typeof pair !== "object" || pair === null) {
          throw new InvalidRequestError(`pair ${i}: not an object`);
        }
        this.checkTokens(pair.prompt, `pair ${i}: prompt`);
        this.checkTokens(pair.chosen, `pair ${i}: chosen`);
        this.checkTokens(pair.rejected, `pair ${i}: rejected`);
        const longest = pair.prompt.length + Math.max(pair.chosen.length, pair.rejected.length);
        if (longest > maxLength) {
          throw new InvalidRequestError(
            `pair ${i}: prompt + response is ${longest} tokens, ` +
              `over the fine-tuner's max length ${maxLength}; ` +
              `shorten the prompt or the responses`,
          );
        }
        const payload: TrainingPair = {
          prompt: [...pair.prompt],
          chosen: [...pair.chosen],
          rejected: [...pair.rejected],
        };
        const tokens = 2 * pair.prompt.length + pair.chosen.length + pair.rejected.length;
        return { id: this.nextPairId++, tokens, payload };
      });
      this.scheduler.addFeedback(items, performance.now());
      this.loop.kick();
      return Promise.resolve({ accepted: items.length, untrained: this.scheduler.queue.untrained });
    } catch (error) {
      return Promise.reject(error);
    }
  }

  adapters(): Promise<AdapterInfo[]> {
    return Promise.resolve(
      this.versions.list().map(({ id, name, version, users, newest }) => ({
        id,
        name,
        version,
        users,
        newest,
      })),
    );
  }

  publishAdapter(name: string, weights: LoraWeights): Promise<string> {
    try {
      return Promise.resolve(this.versions.publish(name, weights));
    } catch (error) {
      return Promise.reject(error);
    }
  }

  metrics(slo: { ttftMs?: number; tbtMs?: number } = {}): Promise<EngineMetrics> {
    const now = performance.now();
    return Promise.resolve({
      summary: this.metricsRecorder.summary({
        ttftSloMs: slo.ttftMs ?? this.policy.ttftSloMs,
        tbtSloMs: slo.tbtMs ?? this.policy.tbtSloMs,
        wallMs: Math.max(0, now - this.startMs),
      }),
      prediction: this.cost.error,
      optimizerSteps: this.scheduler.optimizerSteps,
      finetuneSlices: this.scheduler.finetuneSlices,
      publishedAdapter: this.publishedAdapter,
    });
  }

  /** Cancels every live request, waits for the iterations in flight, frees the GPU. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const now = performance.now();
    for (const seqId of [...this.live.keys()]) {
      this.scheduler.cancel(seqId, now);
      this.settle(seqId, now, true);
    }
    await this.loop.close();
    this.timer?.destroy();
    this.trainer?.destroy();
    this.runner.destroy();
    if (this.parts.ownsContext) this.parts.ctx.destroy();
  }

  // -------------------------------------------------------------------------------------------

  private checkTokens(tokens: unknown, what: string): asserts tokens is number[] {
    const vocab = this.engineInfo.vocabSize;
    if (!Array.isArray(tokens) || tokens.length === 0) {
      throw new InvalidRequestError(`${what} must be a non-empty array of token ids`);
    }
    const bad = tokens.findIndex((t) => !Number.isInteger(t) || t < 0 || t >= vocab);
    if (bad >= 0) {
      throw new InvalidRequestError(
        `${what}: token ${bad} is ${tokens[bad]}, not an id in [0, ${vocab})`,
      );
    }
  }

  /** The fine-tuner's longest prompt + response (what feedback pairs may be). */
  private get trainMaxLength(): number {
    return Math.min(TRAIN_MAX_LENGTH, this.engineInfo.maxContext);
  }

  /** After each iteration: settle finished requests, drop retired references, publish. */
  private async completed(
    it: Iteration<TrainingPair>,
    effects: IterationEffects<TrainingPair>,
    now: number,
  ): Promise<void> {
    if (it.step) this.onStep?.(it.step);
    for (const req of effects.finished) this.settle(req.id, now, false);
    // Pairs that will not be trained again give back their cached reference log-probs.
    this.trainer?.forgetReferences(effects.retired.map((p) => p.item.payload));
    if (effects.publish && this.trainer) {
      // No later slice is in flight: the next DPO step starts only after this one completed.
      const weights = await this.trainer.params.read();
      this.publishedAdapter = this.versions.publish(this.adapterName, weights);
    }
  }

  private settle(seqId: number, now: number, cancelled: boolean): void {
    const live = this.live.get(seqId);
    if (!live) return;
    this.live.delete(seqId);
    this.byRequestId.delete(live.requestId);
    if (live.adapterId !== undefined) this.versions.release(live.adapterId);
    live.resolve({
      ...live.state.result(now),
      requestId: live.requestId,
      cancelled,
      adapterId: live.adapterId,
    });
  }

  /**
   * A failed iteration leaves the GPU state unknown: every live request fails with the error, the
   * KV state is reset, and the DPO step in progress is abandoned (its pairs wait again).
   */
  private fail(error: unknown): void {
    // With no request to reject, a failure would otherwise go unseen (fine-tuning alone
    // was running).
    if (this.live.size === 0) console.error("mace engine: an iteration failed:", error);
    this.batch.abortAll();
    this.scheduler.abortFinetuneStep();
    this.trainer?.abandonStep();
    for (const [seqId, live] of this.live) {
      this.live.delete(seqId);
      this.byRequestId.delete(live.requestId);
      if (live.adapterId !== undefined) this.versions.release(live.adapterId);
      live.reject(error);
    }
  }
}

/**
 * Iterations in flight by default. Deno's wgpu resolves readbacks on a ~11 ms poll, so three in
 * flight keep the GPU busy; Dawn resolves them as they complete, and two suffice.
 */
function defaultPipelineDepth(ctx: GpuContext): number {
  return ctx.backend === "dawn" ? 2 : 3;
}
