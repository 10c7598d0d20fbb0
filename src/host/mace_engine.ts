/**
 * The engine as its callers see it (the Engine interface of src/host/engine_api.ts): the model
 * runner, the DPO fine-tuner and the CoScheduler, driven by one loop that runs an iteration at a
 * time (a serving step and/or one fine-tuning slice, as the policy decides):
 *
 *   it = scheduler.schedule(now); run it on the GPU (runIteration); scheduler.complete(it, ...)
 *
 * Feedback pairs train a LoRA adapter continuously; every `publishEvery` optimizer steps the
 * adapter is published as a new version ("<adapterName>@N") and requests submitted afterwards
 * without an explicit adapter run on it (requests keep the version they started with).
 *
 * One iteration is in flight at a time: the cost model learns from each iteration's measured
 * time, which pipelining would blur (the serving-only ServingEngine pipelines instead).
 */
import { createGpuContext, type GpuContext } from "../engine/gpu/context.ts";
import { openModelWithTokenizer } from "../engine/load.ts";
import { ModelRunner } from "../engine/runner/model_runner.ts";
import { GREEDY, type SamplingParams } from "../engine/step.ts";
import { EngineClosedError, InvalidRequestError } from "../engine/errors.ts";
import {
  LORA_TARGETS,
  type LoraConfig,
  type LoraTarget,
  type LoraWeights,
} from "../engine/lora/lora.ts";
import { DpoTrainer, type TrainingPair } from "../engine/training/dpo_trainer.ts";
import type { BatchScheduler } from "../scheduler/batch_scheduler.ts";
import { CostModel } from "../scheduler/cost_model.ts";
import { MetricsRecorder } from "../scheduler/metrics.ts";
import type { RequestState } from "../scheduler/request.ts";
import { CoScheduler, type Iteration } from "../scheduler/mace/co_scheduler.ts";
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
import { runIteration } from "./iteration.ts";
import { pruneOverBudget } from "../scheduler/engine_loop.ts";
import { schedulerForRunner } from "./runner_scheduler.ts";

interface LiveRequest {
  requestId: string;
  state: RequestState;
  adapterId?: string;
  resolve: (result: GenerateResult) => void;
  reject: (error: unknown) => void;
}

export class MaceEngine implements Engine {
  private readonly live = new Map<number, LiveRequest>();
  private readonly byRequestId = new Map<string, number>();
  private nextSeqId = 0;
  private nextPairId = 0;
  private running = false;
  private closed = false;
  private wake: (() => void) | null = null;
  private loopDone: Promise<void> = Promise.resolve();
  private publishedAdapter: string | null = null;

  private constructor(
    private readonly ctx: GpuContext,
    private readonly runner: ModelRunner,
    private readonly trainer: DpoTrainer,
    private readonly batch: BatchScheduler,
    private readonly scheduler: CoScheduler<TrainingPair>,
    private readonly cost: CostModel,
    private readonly metricsRecorder: MetricsRecorder,
    private readonly versions: AdapterVersions,
    private readonly policy: PolicyOptions,
    private readonly engineInfo: EngineInfo,
    private readonly adapterName: string,
    private readonly startMs: number,
  ) {}

  static async create(options: EngineOptions = {}): Promise<MaceEngine> {
    const ft = options.finetune ?? {};
    const policy = policyOptions(options.policy ?? "mace", {
      ttftSloMs: options.ttftSloMs,
      tbtSloMs: options.tbtSloMs,
      pairsPerStep: ft.pairsPerStep,
      publishEvery: ft.publishEvery,
    });
    const lora: LoraConfig = {
      rank: ft.rank ?? 8,
      alpha: ft.alpha ?? 16,
      targets: parseTargets(ft.targets ?? ["q", "v"]),
      dropout: 0,
    };
    const profile = await loadProfile(options.profile ?? DEFAULT_PROFILE);
    const modelPath = options.model ?? BUNDLED_MODEL;
    const { source } = await openModelWithTokenizer(modelPath, options.tokenizer);
    const ctx = await createGpuContext({ backend: options.backend ?? "auto" });
    try {
      const runner = await ModelRunner.create(ctx, source, {
        maxContext: options.maxContext,
        lora: { maxAdapters: 4, maxRank: Math.max(16, lora.rank), targets: lora.targets },
      });
      await runner.warmUp();
      const trainer = new DpoTrainer(ctx, source.config, runner.weights, lora, {
        learningRate: ft.learningRate ?? 5e-4,
        beta: ft.beta ?? 0.1,
        maxPairsPerStep: policy.pairsPerStep,
        maxLength: Math.min(256, runner.capacity.maxBlocksPerSeq * runner.capacity.blockSize),
      });
      trainer.initialize(ft.seed ?? 0);
      const { capacity } = runner;
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
        memoryBytes: runner.memory.kvBytes + trainer.memory.activationBytes,
        metrics,
        referenceCached: (item) => trainer.hasReference(item.payload),
      }, startMs);
      const eosIds = [...(source.generationConfig?.eosTokenIds ?? source.config.eosTokenIds)];
      const info: EngineInfo = {
        model: modelPath.replace(/\/+$/, "").split("/").pop() ?? modelPath,
        backend: ctx.backend,
        device: ctx.adapterDescription,
        policy: policy.name,
        maxContext: capacity.maxBlocksPerSeq * capacity.blockSize,
        vocabSize: source.config.vocabSize,
        eosIds,
      };
      return new MaceEngine(
        ctx,
        runner,
        trainer,
        batch,
        scheduler,
        cost,
        metrics,
        new AdapterVersions(runner, blockManager),
        policy,
        info,
        ft.adapterName ?? "mace",
        startMs,
      );
    } catch (error) {
      ctx.destroy();
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
      // A failing callback must not stop the engine: the token still counts and the request goes on.
      onToken: onToken && ((token) => {
        try {
          onToken(token);
        } catch { /* the caller's problem; its result still has every token */ }
      }),
      adapterId,
    }, now);
    if (adapterId !== undefined) this.versions.acquire(adapterId);
    const result = new Promise<GenerateResult>((resolve, reject) => {
      this.live.set(seqId, { requestId, state, adapterId, resolve, reject });
    });
    this.byRequestId.set(requestId, seqId);
    this.kick();
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
      const maxLength = this.trainer.options.maxLength;
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
            `pair ${i}: prompt + response is ${longest} tokens, over the fine-tuner's max length ${maxLength}; ` +
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
      this.kick();
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
      publishedAdapter: this.publishedAdapter,
    });
  }

  /** Cancels every live request, waits for the iteration in flight, frees the GPU. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const now = performance.now();
    for (const seqId of [...this.live.keys()]) {
      this.scheduler.cancel(seqId, now);
      this.settle(seqId, now, true);
    }
    this.wake?.();
    await this.loopDone;
    this.trainer.destroy();
    this.runner.destroy();
    this.ctx.destroy();
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

  /** Starts the loop, or wakes it from idle. */
  private kick(): void {
    if (this.running) {
      this.wake?.();
      return;
    }
    this.running = true;
    this.loopDone = this.loop().finally(() => (this.running = false));
  }

  private async loop(): Promise<void> {
    // Start after the current task, so requests submitted together share the first iteration.
    await Promise.resolve();
    while (!this.closed) {
      try {
        const it = this.scheduler.schedule(performance.now());
        if (!it) {
          if (!(await this.idle())) return;
          continue;
        }
        await this.execute(it);
        await pruneOverBudget(this.batch, this.runner);
      } catch (error) {
        this.fail(error);
        return;
      }
    }
  }

  /** Waits for new work or the next retraining period; false when there is none to wait for. */
  private async idle(): Promise<boolean> {
    const now = performance.now();
    if (this.scheduler.hasWork(now)) {
      throw new Error("the scheduler has work but scheduled nothing with no iteration in flight");
    }
    const wakeAt = this.scheduler.nextWakeAt();
    if (wakeAt === null && this.live.size === 0) return false;
    await new Promise<void>((resolve) => {
      const timer = wakeAt === null ? undefined : setTimeout(resolve, Math.max(0, wakeAt - now));
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.wake = null;
    return !this.closed;
  }

  private async execute(it: Iteration<TrainingPair>): Promise<void> {
    const ft = it.finetune;
    // The trainer checks and loads the step's pairs; its slices are the scheduler's (same planner).
    if (ft?.startsStep) {
      this.trainer.planStep(ft.pairs.map((p) => p.item.payload), this.policy.layersPerSlice);
    }
    const timing = await runIteration(this.runner, this.trainer, {
      plan: it.step?.plan ?? null,
      slice: ft?.slice ?? null,
    });
    const losses = ft?.slice.kind === "optimizer"
      ? (await this.trainer.readStepStats()).perPair.map((p) => p.loss)
      : undefined;
    const now = performance.now();
    const effects = this.scheduler.complete(
      it,
      { result: timing.step, ms: timing.ms, losses },
      now,
    );
    for (const req of effects.finished) this.settle(req.id, now, false);
    // Pairs that will not be trained again give back their cached reference log-probs.
    this.trainer.forgetReferences(effects.retired.map((p) => p.item.payload));
    if (effects.publish) {
      this.publishedAdapter = this.versions.publish(
        this.adapterName,
        await this.trainer.params.read(),
      );
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

  /** A failed iteration leaves the GPU state unknown: every live request fails with the error. */
  private fail(error: unknown): void {
    // With no request to reject, a failure would otherwise go unseen (fine-tuning alone was running).
    if (this.live.size === 0) console.error("mace engine: an iteration failed:", error);
    this.batch.abortAll();
    for (const [seqId, live] of this.live) {
      this.live.delete(seqId);
      this.byRequestId.delete(live.requestId);
      live.reject(error);
    }
  }
}

function parseTargets(targets: readonly string[]): LoraTarget[] {
  for (const t of targets) {
    if (!(LORA_TARGETS as readonly string[]).includes(t)) {
      throw new InvalidRequestError(
        `unknown LoRA target "${t}"; use some of ${LORA_TARGETS.join(", ")}`,
      );
    }
  }
  return LORA_TARGETS.filter((t) => targets.includes(t));
}
