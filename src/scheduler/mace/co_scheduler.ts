/**
 * Iteration-level co-scheduling of serving and DPO fine-tuning, for every policy (policy.ts).
 * Pure TypeScript: the simulator and the live engine both drive it the same way:
 *
 *   it = scheduler.schedule(now)          // a serving step and/or one fine-tuning slice
 *   ... run it (simulated, or on the GPU) ...
 *   scheduler.complete(it, outcome, now)  // tokens, finished requests, losses, measured time
 *
 * The serving side's mechanics (KV blocks, admission, chunking, preemption, pruning) stay in
 * BatchScheduler; this class decides what each iteration holds. Requests, feedback, tokens and
 * training are recorded in a MetricsRecorder under ../shared/DESIGN.md's metric names.
 */
import type { StepResult } from "../../engine/step.ts";
import { planDpoSlices, type TrainingSlice } from "../../engine/training/slice_plan.ts";
import type { BatchScheduler, ScheduledStep, StepPick } from "../batch_scheduler.ts";
import {
  type CostModel,
  type FinetuneShape,
  finetuneShape,
  shapeOfPlan,
  type StepShape,
} from "../cost_model.ts";
import type { MetricsRecorder } from "../metrics.ts";
import type { GenerationRequest, RequestState } from "../request.ts";
import { type FeedbackItem, FinetuneQueue, type QueuedPair } from "./finetune_queue.ts";
import { bestFitPack, type Capacity, FIT_EPSILON, type PackTask } from "./packing.ts";
import type { PolicyOptions } from "./policy.ts";
import { SchedulerInvariantError } from "../errors.ts";

export interface CoSchedulerOptions<T> {
  policy: PolicyOptions;
  batch: BatchScheduler;
  cost: CostModel;
  numLayers: number;
  /** Bytes an iteration's memory capacity is a share (τ_mem) of: KV pool + training activations. */
  memoryBytes: number;
  metrics?: MetricsRecorder;
  /**
   * Whether the executor holds a pair's reference log-probs (then its step needs no reference
   * slices). Default: the pair's reference slices ran and it has not retired since (the
   * simulator). The live engine asks its trainer, whose cache is the truth.
   */
  referenceCached?: (item: FeedbackItem<T>) => boolean;
}

/** One fine-tuning slice of the DPO step in progress. */
export interface FinetuneWork<T> {
  slice: TrainingSlice;
  /** The step's pairs; slice.pair indexes them. */
  pairs: QueuedPair<T>[];
  /** The first slice of a new step: the executor starts the step over `pairs`. */
  startsStep: boolean;
  shape: FinetuneShape;
}

export interface Iteration<T> {
  id: number;
  step: ScheduledStep | null;
  finetune: FinetuneWork<T> | null;
  shape: StepShape;
  predictedMs: number;
  /** δ_ft forced the slice in. */
  forcedFinetune: boolean;
  /** mace: the earliest TBT deadline among the iteration's decodes (absolute ms), if any. */
  deadlineMs: number | null;
  /** mace: predicted time of what had to go in (decodes, a δ_ft-forced slice), ms. */
  mandatoryMs: number;
}

export interface IterationOutcome {
  /** The serving step's result (null without one). */
  result: StepResult | null;
  /** Measured wall time of the iteration, ms. */
  ms: number;
  /** After an optimizer slice: each pair's DPO loss in the step (omitted: unknown, as in the simulator). */
  losses?: readonly number[];
}

export interface IterationEffects<T> {
  finished: RequestState[];
  /** The pairs of a DPO step that just ended (its optimizer slice ran). */
  trained: QueuedPair<T>[];
  /** Those of them that left the queue for good (their cached reference can go). */
  retired: QueuedPair<T>[];
  /** Time to publish a new adapter version (every publishEvery optimizer steps). */
  publish: boolean;
}

interface DpoStep<T> {
  pairs: QueuedPair<T>[];
  slices: TrainingSlice[];
  next: number;
}

export class CoScheduler<T> {
  readonly policy: PolicyOptions;
  readonly queue: FinetuneQueue<T>;
  optimizerSteps = 0;
  /** Longest a slice waited (from the last slice, or from fine-tuning getting work) before it ran, ms. */
  maxFinetuneWaitMs = 0;
  private readonly batch: BatchScheduler;
  private readonly cost: CostModel;
  private readonly metrics?: MetricsRecorder;
  private dpo: DpoStep<T> | null = null;
  /** Pair ids whose reference log-probs were computed (the trainer caches them). */
  private readonly referenceDone = new Set<number>();
  /** periodic / synchronous: pairs of the running retraining job not yet in a step. */
  private job: QueuedPair<T>[] | null = null;
  private nextPeriodAt: number;
  /** When fine-tuning last ran a slice, or when it got work after being idle. */
  private finetuneClock = 0;
  private nextIterationId = 0;
  private readonly requestTokens = new Map<RequestState, number>();

  constructor(private readonly options: CoSchedulerOptions<T>, startMs = 0) {
    this.policy = options.policy;
    this.batch = options.batch;
    this.cost = options.cost;
    this.metrics = options.metrics;
    this.queue = new FinetuneQueue<T>(this.policy.retrainAboveLoss, this.policy.maxTrainings);
    this.nextPeriodAt = startMs + this.policy.periodMs;
  }

  /** Queues a request (InvalidRequestError if it can never run). */
  addRequest(request: GenerationRequest, now: number): RequestState {
    const state = this.batch.add(request, now);
    this.requestTokens.set(state, 0);
    this.metrics?.arrived(now, request.id);
    return state;
  }

  /** Ends a queued or running request; null if no live request has the id. */
  cancel(id: number, now: number): RequestState | null {
    const req = this.batch.cancel(id, now);
    if (!req) return null;
    this.requestTokens.delete(req);
    this.metrics?.cancelled(now, id);
    return req;
  }

  /** Feedback pairs arrive for fine-tuning (ignored for training by inference-only, still counted). */
  addFeedback(items: readonly FeedbackItem<T>[], now: number): void {
    if (!this.hasFinetuneWork()) this.finetuneClock = now;
    for (const item of items) this.queue.add(item, now);
    this.metrics?.feedback(now, items.map((i) => i.id));
  }

  /** True while a request is live or (for a training policy) fine-tuning has work it may start now. */
  hasWork(now: number): boolean {
    return this.batch.hasWork() || this.finetuneRunnable(now);
  }

  /** When idle: the next time work appears by itself (a retraining period), else null. */
  nextWakeAt(): number | null {
    const periodic = this.policy.name === "periodic" || this.policy.name === "synchronous";
    return periodic && this.queue.eligible().length > 0 ? this.nextPeriodAt : null;
  }

  /** The next iteration, or null when there is nothing to run now. */
  schedule(now: number): Iteration<T> | null {
    let step: ScheduledStep | null = null;
    let finetune: FinetuneWork<T> | null = null;
    let forced = false;
    let deadlineMs: number | null = null;
    let mandatoryMs = 0;
    switch (this.policy.name) {
      case "inference-only":
        step = this.batch.schedule();
        break;
      case "fcfs":
        step = this.batch.schedule();
        finetune = this.takeSlice(now, false);
        break;
      case "periodic":
        this.startJobIfDue(now);
        step = this.batch.schedule();
        if (this.job) finetune = this.takeSlice(now, false);
        break;
      case "synchronous":
        this.startJobIfDue(now);
        if (this.job) finetune = this.takeSlice(now, false);
        // Serving pauses until the job's last step completes, even while its optimizer slice is
        // still in flight.
        if (!finetune && this.dpo === null) step = this.batch.schedule();
        break;
      case "mace":
        ({ step, finetune, forced, deadlineMs, mandatoryMs } = this.planMace(now));
        break;
    }
    if (!step && !finetune) return null;
    if (finetune) {
      this.maxFinetuneWaitMs = Math.max(this.maxFinetuneWaitMs, now - this.finetuneClock);
    }
    const shape = shapeOfPlan(step?.plan ?? null, finetune?.shape);
    return {
      id: this.nextIterationId++,
      step,
      finetune,
      shape,
      predictedMs: this.cost.predictMs(shape),
      forcedFinetune: forced,
      deadlineMs,
      mandatoryMs,
    };
  }

  /** Accounts a finished iteration (in the order scheduled). */
  complete(it: Iteration<T>, outcome: IterationOutcome, now: number): IterationEffects<T> {
    const effects: IterationEffects<T> = { finished: [], trained: [], retired: [], publish: false };
    this.cost.observe(it.shape, outcome.ms);
    this.metrics?.gpuBusy(Math.max(0, now - outcome.ms), now);
    if (it.step) {
      if (!outcome.result) {
        throw new Error(`iteration ${it.id} ran a serving step but has no result`);
      }
      effects.finished = this.batch.update(it.step, outcome.result, now);
      for (const { request } of it.step.entries) this.recordTokens(request, now);
      for (const req of effects.finished) {
        this.recordTokens(req, now);
        this.requestTokens.delete(req);
        this.metrics?.finished(now, req.id, {
          promptTokens: req.request.prompt.length,
          outputTokens: req.output.length,
        });
      }
    }
    const ft = it.finetune;
    if (ft) {
      this.finetuneClock = now;
      const dpo = this.dpo!;
      if (ft.slice.kind === "reference") this.referenceDone.add(ft.pairs[ft.slice.pair].item.id);
      if (ft.slice.kind === "optimizer") {
        const losses = outcome.losses;
        effects.retired = this.queue.trained(
          dpo.pairs,
          losses ?? dpo.pairs.map((p) => p.loss),
          now,
        );
        for (const p of effects.retired) this.referenceDone.delete(p.item.id);
        this.metrics?.trained(
          now,
          dpo.pairs.map((p, i) => ({ id: p.item.id, dpoLoss: losses?.[i] ?? null })),
        );
        this.optimizerSteps++;
        effects.trained = dpo.pairs;
        effects.publish = this.optimizerSteps % this.policy.publishEvery === 0;
        this.dpo = null;
        if (this.job && this.job.length === 0) this.job = null;
      }
    }
    return effects;
  }

  /**
   * Checks the queues (tests and the simulator call it after every iteration): every live request
   * is waiting or running, never both, and a running one holds KV blocks for its reserved slots;
   * exactly the pairs of the step in progress are marked in a step; the job holds none of them.
   */
  checkInvariants(): void {
    const fail = (what: string) => {
      throw new SchedulerInvariantError(what);
    };
    const waiting = new Set(this.batch.waitingRequests);
    const bm = this.batch.options.blockManager;
    for (const req of this.batch.runningRequests) {
      if (waiting.has(req)) fail(`request ${req.id} is both waiting and running`);
      if (req.finished) fail(`request ${req.id} finished but still running`);
      if (bm.blockTable(req.id).length * bm.blockSize < req.reservedSlots) {
        fail(`request ${req.id} reserved ${req.reservedSlots} slots but holds fewer`);
      }
      if (req.numScheduled > req.length) fail(`request ${req.id} scheduled past its length`);
    }
    for (const req of waiting) {
      if (req.finished) fail(`request ${req.id} finished but still waiting`);
    }
    const inStep = new Set(this.dpo?.pairs ?? []);
    for (const p of this.queue.eligible()) {
      if (inStep.has(p)) fail(`pair ${p.item.id} is in the step and eligible`);
    }
    for (const p of inStep) if (!p.inStep) fail(`pair ${p.item.id} of the step is not marked`);
    for (const p of this.job ?? []) {
      if (p.inStep) fail(`pair ${p.item.id} is both in the job and in a step`);
    }
    if (this.queue.untrained < 0 || this.queue.untrained > this.queue.size + inStep.size) {
      fail(`untrained count ${this.queue.untrained} is out of range`);
    }
  }

  // -------------------------------------------------------------------------------------------
  // Fine-tuning work

  private trains(): boolean {
    return this.policy.name !== "inference-only";
  }

  private hasFinetuneWork(): boolean {
    return this.dpo !== null || this.queue.eligible().length > 0;
  }

  /** Fine-tuning can run a slice now under the policy. */
  private finetuneRunnable(now: number): boolean {
    if (!this.trains()) return false;
    // Every slice of the step issued: the next step waits until the optimizer slice completes
    // (a pipelined loop schedules before the iterations in flight complete), since its losses
    // set the pairs' priorities and its parameters are what the next step trains on.
    if (this.dpo) return this.dpo.next < this.dpo.slices.length;
    if (this.policy.name === "periodic" || this.policy.name === "synchronous") {
      return (this.job?.length ?? 0) > 0 ||
        (now >= this.nextPeriodAt && this.queue.eligible().length > 0);
    }
    return this.queue.eligible().length > 0;
  }

  /** periodic / synchronous: at a period boundary the buffered pairs become one job. */
  private startJobIfDue(now: number): void {
    if (now < this.nextPeriodAt) return;
    while (this.nextPeriodAt <= now) this.nextPeriodAt += this.policy.periodMs;
    if (this.job) return;
    const buffered = this.queue.eligible();
    if (buffered.length > 0) this.job = buffered;
  }

  /** The next slice without committing to it (starts a step when none runs). */
  private peekSlice(now: number, byPriority: boolean): FinetuneWork<T> | null {
    if (!this.dpo) {
      const among = this.job ?? this.queue.eligible();
      if (among.length === 0) return null;
      const pairs = this.queue.take(this.policy.pairsPerStep, now, {
        gamma: this.policy.gamma,
        agingPerS: this.policy.agingPerS,
        byPriority,
      }, among);
      if (this.job) this.job = this.job.filter((p) => !pairs.includes(p));
      const cached = pairs.map((p) =>
        this.options.referenceCached
          ? this.options.referenceCached(p.item)
          : this.referenceDone.has(p.item.id)
      );
      this.dpo = {
        pairs,
        slices: planDpoSlices(cached, this.options.numLayers, this.policy.layersPerSlice),
        next: 0,
      };
    }
    const dpo = this.dpo;
    const slice = dpo.slices[dpo.next];
    const pairTokens = slice.kind === "optimizer" ? 0 : dpo.pairs[slice.pair].item.tokens;
    return {
      slice,
      pairs: dpo.pairs,
      startsStep: dpo.next === 0,
      shape: finetuneShape(slice, pairTokens, this.options.numLayers),
    };
  }

  private takeSlice(now: number, byPriority: boolean): FinetuneWork<T> | null {
    if (!this.finetuneRunnable(now)) return null;
    const work = this.peekSlice(now, byPriority);
    if (work) this.dpo!.next++;
    return work;
  }

  // -------------------------------------------------------------------------------------------
  // MACE

  private planMace(now: number): {
    step: ScheduledStep | null;
    finetune: FinetuneWork<T> | null;
    forced: boolean;
    deadlineMs: number | null;
    mandatoryMs: number;
  } {
    const p = this.policy;
    const bm = this.batch.options.blockManager;
    const blockBytes = this.cost.kvBytes(1);
    const B = bm.blockSize;
    const running = this.batch.runningRequests;
    const picks: StepPick[] = [];
    let shape: StepShape = { prefillTokens: 0, decodeSeqs: 0, attentionPairs: 0 };
    let tokensLeft = this.batch.options.maxTokensPerStep;
    let seqsLeft = this.batch.options.maxSeqsPerStep;
    let memUsed = bm.stats().used * blockBytes;
    const newBlocks = (req: RequestState, end: number) =>
      Math.max(0, Math.ceil((end - req.evicted) / B) - Math.ceil(req.reservedSlots / B));

    // 1. Every running decode goes in first: its TBT deadline is what the iteration must meet.
    let deadline = Infinity;
    for (const req of running) {
      if (req.length - req.numScheduled !== 1 || req.samplesIssued >= req.request.maxTokens) {
        continue;
      }
      if (seqsLeft === 0) break;
      picks.push({ request: req, maxTokens: 1 });
      seqsLeft--;
      tokensLeft--;
      memUsed += newBlocks(req, req.numScheduled + 1) * blockBytes;
      shape = addChunk(shape, req.numScheduled - req.evicted, 1, true);
      if (req.lastTokenAt >= 0) deadline = Math.min(deadline, req.lastTokenAt + p.tbtSloMs);
    }
    // Without a running decode no TBT deadline binds: the budget is the TTFT slack of the most
    // urgent prompt (at least one TBT SLO, so a late prompt still gets a full chunk).
    let ttftSlack = Infinity;
    for (const req of [...running, ...this.batch.waitingRequests]) {
      if (req.firstTokenAt < 0) {
        ttftSlack = Math.min(ttftSlack, req.submittedAt + p.ttftSloMs - now);
      }
    }
    const budgetMs = p.latencyMargin *
      (Number.isFinite(deadline)
        ? deadline - now
        : Math.max(p.tbtSloMs, Number.isFinite(ttftSlack) ? ttftSlack : 0));
    const memCap = p.tauMem * this.options.memoryBytes;

    // 2. δ_ft: fine-tuning that has waited too long goes in regardless of fit.
    let finetune: FinetuneWork<T> | null = null;
    let forced = false;
    if (this.finetuneRunnable(now) && now - this.finetuneClock >= p.deltaFtMs) {
      finetune = this.takeSlice(now, p.gamma > 0);
      forced = finetune !== null;
      if (finetune) {
        shape = { ...shape, finetune: finetune.shape };
        memUsed += this.cost.finetuneBytes(finetune.shape);
      }
    }

    const mandatoryMs = this.cost.predictMs(shape);

    // 3. Best-fit packing of prefill chunks and (unless forced already) the next slice.
    const prefills = [
      ...running.filter((r) => r.length - r.numScheduled > 1 && r.numScheduled < knownLength(r)),
      ...this.batch.waitingRequests,
    ];
    const prefillTasks: PackTask<{ request: RequestState; tokens: number }>[] = [];
    const marginal = (next: StepShape) => this.cost.predictMs(next) - this.cost.predictMs(shape);
    for (const req of prefills) {
      const waited = (now - req.submittedAt) / 1000;
      const slack = req.submittedAt + p.ttftSloMs - now;
      const urgency = Math.min(2, Math.max(0, 1 - slack / p.ttftSloMs));
      const admitted = req.reservedSlots > 0 || req.numScheduled > 0;
      prefillTasks.push({
        priority: p.basePriority.prefill + p.agingPerS * waited + p.urgencyWeight * urgency,
        fit: (left: Capacity) => {
          if (seqsLeft === 0 || tokensLeft === 0) return null;
          const start = req.numScheduled;
          const remaining = knownLength(req) - start;
          const slot = start - req.evicted;
          // Admission reserves blocks for every known token at once.
          const memFor = (n: number) =>
            (admitted ? newBlocks(req, start + n) : Math.ceil(knownLength(req) / B)) * blockBytes;
          const timeFor = (n: number) => marginal(addChunk(shape, slot, n, false));
          let n = largestFitting(
            Math.min(remaining, tokensLeft),
            (k) => timeFor(k) <= left.timeMs + FIT_EPSILON,
          );
          if (memFor(n) > left.memBytes) n = 0;
          if (n === 0 || (n < p.minChunkTokens && n < remaining)) return null;
          return { value: { request: req, tokens: n }, memBytes: memFor(n), timeMs: timeFor(n) };
        },
      });
    }
    const tasks: PackTask<
      { request: RequestState; tokens: number } | { slice: FinetuneWork<T> }
    >[] = [
      ...prefillTasks,
    ];
    if (!finetune && this.finetuneRunnable(now)) {
      const next = this.peekSlice(now, p.gamma > 0);
      if (next) {
        const meanLoss = next.pairs.reduce((s, q) => s + q.loss, 0) / next.pairs.length;
        const waited = now - this.finetuneClock;
        // Fine-tuning's share of a serving iteration's slack grows with its wait (SLO urgency, as
        // for prefills): just served, it runs only on an otherwise idle GPU and leaves the
        // requests' latency alone; nearing δ_ft it may take all the slack; at δ_ft it is forced.
        const share = Math.min(1, waited / p.deltaFtMs) ** 2;
        tasks.push({
          priority: p.basePriority.finetune + p.agingPerS * waited / 1000 + p.gamma * meanLoss,
          fit: (left) => {
            const timeMs = marginal({ ...shape, finetune: next.shape });
            const serving = picks.length > 0 || prefills.length > 0;
            const reserved = serving ? (1 - share) * capacity.timeMs : 0;
            if (timeMs > left.timeMs - reserved + FIT_EPSILON) return null;
            return {
              value: { slice: next },
              memBytes: this.cost.finetuneBytes(next.shape),
              timeMs,
            };
          },
        });
      }
    }
    const capacity: Capacity = {
      memBytes: Math.max(0, memCap - memUsed),
      timeMs: Math.max(0, budgetMs - this.cost.predictMs(shape)),
    };
    const placed = bestFitPack(tasks, capacity, {
      lambdaMem: p.lambdaMem,
      lambdaTime: p.lambdaTime,
      window: p.window,
      place: (value) => {
        if ("slice" in value) {
          finetune = value.slice;
          this.dpo!.next++;
          shape = { ...shape, finetune: value.slice.shape };
        } else {
          picks.push({ request: value.request, maxTokens: value.tokens });
          shape = addChunk(
            shape,
            value.request.numScheduled - value.request.evicted,
            value.tokens,
            false,
          );
          seqsLeft--;
          tokensLeft -= value.tokens;
        }
      },
    });
    // Progress guarantee: with nothing else to run and no prefill fitting the budget, the first
    // prefill in priority order runs a minimal chunk even if the model predicts it over budget.
    if (placed.length === 0 && picks.length === 0 && !finetune && prefillTasks.length > 0) {
      const head = [...prefillTasks].sort((a, b) => b.priority - a.priority)[0];
      const chunk = head.fit({ memBytes: Infinity, timeMs: Infinity });
      if (chunk) {
        picks.push({
          request: chunk.value.request,
          maxTokens: Math.min(chunk.value.tokens, p.minChunkTokens),
        });
      }
    }
    // Likewise an idle GPU runs the next slice even if it is longer than the budget.
    if (placed.length === 0 && picks.length === 0 && !finetune && prefillTasks.length === 0) {
      finetune = this.takeSlice(now, p.gamma > 0);
    }
    const step = picks.length > 0 ? this.batch.schedule(picks) : null;
    return {
      step,
      finetune,
      forced,
      deadlineMs: Number.isFinite(deadline) ? deadline : null,
      mandatoryMs,
    };
  }

  /** Records the tokens a request produced since last seen. */
  private recordTokens(req: RequestState, now: number): void {
    const seen = this.requestTokens.get(req);
    if (seen === undefined) return;
    for (let i = seen; i < req.output.length; i++) this.metrics?.token(now, req.id);
    this.requestTokens.set(req, req.output.length);
  }
}

/** Tokens of the request the CPU knows: prompt + generated. */
function knownLength(req: RequestState): number {
  return req.request.prompt.length + req.output.length;
}

/** The shape with one more sequence computing `n` tokens whose first KV slot is `slot`. */
function addChunk(shape: StepShape, slot: number, n: number, decode: boolean): StepShape {
  return {
    ...shape,
    prefillTokens: shape.prefillTokens + (decode ? 0 : n),
    decodeSeqs: shape.decodeSeqs + (decode ? 1 : 0),
    attentionPairs: shape.attentionPairs + n * (slot + 1) + (n * (n - 1)) / 2,
  };
}

/** The largest n in [0, max] with ok(n), for ok monotone (true then false). */
function largestFitting(max: number, ok: (n: number) => boolean): number {
  let lo = 0, hi = max;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (ok(mid)) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}
