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
 * training are recorded in a MetricsRecorder under the metric names of docs/ARCHITECTURE.md.
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
  /**
   * After an optimizer slice: each pair's DPO loss in the step (omitted: unknown, as in the
   * simulator).
   */
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

/** What planMace decides for one iteration. */
interface MaceDecision<T> {
  step: ScheduledStep | null;
  finetune: FinetuneWork<T> | null;
  forced: boolean;
  deadlineMs: number | null;
  mandatoryMs: number;
}

/** The MACE iteration being planned: planMace's steps fill it in order. */
interface MacePlan<T> {
  /** Requests of the serving step, in order, each with its most tokens. */
  picks: StepPick[];
  /** Shape of what is in so far (for the cost model). */
  shape: StepShape;
  /** Tokens and sequences the serving step can still take. */
  tokensLeft: number;
  seqsLeft: number;
  /** KV pool bytes in use, plus the decodes' new blocks and a forced slice's activations. */
  memUsed: number;
  /**
   * KV blocks the step can still get (free, or cached and evictable): a prompt is admitted only
   * if all its blocks fit, since admission never preempts.
   */
  kvBlocksLeft: number;
  finetune: FinetuneWork<T> | null;
}

/** A prefill chunk packing may place: `tokens` more tokens of `request`'s prompt. */
interface PrefillChunk {
  request: RequestState;
  tokens: number;
  /** New KV blocks it takes. */
  blocks: number;
}

type MacePlacement<T> = PrefillChunk | { slice: FinetuneWork<T> };

interface DpoStep<T> {
  pairs: QueuedPair<T>[];
  slices: TrainingSlice[];
  next: number;
}

export class CoScheduler<T> {
  readonly policy: PolicyOptions;
  readonly queue: FinetuneQueue<T>;
  optimizerSteps = 0;
  /** DPO slices completed (every kind). */
  finetuneSlices = 0;
  /**
   * Longest a slice waited (from the last slice, or from fine-tuning getting work) before it ran,
   * ms.
   */
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

  /**
   * Feedback pairs arrive for fine-tuning (ignored for training by inference-only, still counted).
   */
  addFeedback(items: readonly FeedbackItem<T>[], now: number): void {
    if (!this.hasFinetuneWork()) this.finetuneClock = now;
    for (const item of items) this.queue.add(item, now);
    this.metrics?.feedback(now, items.map((i) => i.id));
  }

  /**
   * True while a request is live or (for a training policy) fine-tuning has work it may start now.
   */
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
      this.finetuneSlices++;
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
   * Abandons the DPO step in progress after a failed iteration (the GPU state of its slices is
   * unknown): its pairs wait again and the next step starts from the first slice. Retraining jobs
   * (periodic, synchronous) keep their pairs.
   */
  abortFinetuneStep(): void {
    if (!this.dpo) return;
    this.queue.release(this.dpo.pairs);
    if (this.job) this.job.push(...this.dpo.pairs);
    this.dpo = null;
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
  // MACE: one iteration is planned in steps that fill a MacePlan in order.

  private planMace(now: number): MaceDecision<T> {
    const p = this.policy;
    const plan: MacePlan<T> = {
      picks: [],
      shape: { prefillTokens: 0, decodeSeqs: 0, attentionPairs: 0 },
      tokensLeft: this.batch.options.maxTokensPerStep,
      seqsLeft: this.batch.options.maxSeqsPerStep,
      memUsed: this.batch.options.blockManager.stats().used * this.cost.kvBytes(1),
      kvBlocksLeft: this.batch.options.blockManager.numAvailableBlocks(),
      finetune: null,
    };
    const deadline = this.pickDecodes(plan);
    const forced = this.forceStarvedSlice(now, plan);
    const mandatoryMs = this.cost.predictMs(plan.shape);
    // What the optional work may fill: memory under τ_mem, time up to the latency budget.
    const capacity: Capacity = {
      memBytes: Math.max(0, p.tauMem * this.options.memoryBytes - plan.memUsed),
      timeMs: Math.max(0, this.latencyBudgetMs(now, deadline) - mandatoryMs),
    };
    const prefillTasks = this.prefillTasks(now, plan);
    const tasks: PackTask<MacePlacement<T>>[] = [...prefillTasks];
    const sliceTask = plan.finetune ? null : this.sliceTask(now, plan, prefillTasks, capacity);
    if (sliceTask) tasks.push(sliceTask);
    const placed = bestFitPack(tasks, capacity, {
      lambdaMem: p.lambdaMem,
      lambdaTime: p.lambdaTime,
      window: p.window,
      place: (value) => this.place(plan, value),
    });
    if (placed.length === 0) this.guaranteeProgress(now, plan, prefillTasks);
    let step = plan.picks.length > 0 ? this.batch.schedule(plan.picks) : null;
    // Nothing the plan picked can run now (e.g. the pool cannot admit its prompt): serve first
    // come first served rather than idle with work waiting.
    if (!step && !plan.finetune) step = this.batch.schedule();
    return {
      step,
      finetune: plan.finetune,
      forced,
      deadlineMs: Number.isFinite(deadline) ? deadline : null,
      mandatoryMs,
    };
  }

  /**
   * Step 1: every running decode goes in first (as many as the step holds). Returns the earliest
   * TBT deadline among them (absolute ms; Infinity without one): what the iteration must meet.
   */
  private pickDecodes(plan: MacePlan<T>): number {
    const bm = this.batch.options.blockManager;
    let deadline = Infinity;
    for (const req of this.batch.runningRequests) {
      if (req.length - req.numScheduled !== 1 || req.samplesIssued >= req.request.maxTokens) {
        continue;
      }
      if (plan.seqsLeft === 0) break;
      plan.picks.push({ request: req, maxTokens: 1 });
      plan.seqsLeft--;
      plan.tokensLeft--;
      const blocks = newBlocks(req, req.numScheduled + 1, bm.blockSize);
      plan.memUsed += blocks * this.cost.kvBytes(1);
      plan.kvBlocksLeft -= blocks;
      plan.shape = addChunk(plan.shape, req.numScheduled - req.evicted, 1, true);
      if (req.lastTokenAt >= 0) {
        deadline = Math.min(deadline, req.lastTokenAt + this.policy.tbtSloMs);
      }
    }
    return deadline;
  }

  /** Step 2 (δ_ft): fine-tuning that has waited too long goes in regardless of fit. */
  private forceStarvedSlice(now: number, plan: MacePlan<T>): boolean {
    const p = this.policy;
    if (!this.finetuneRunnable(now) || now - this.finetuneClock < p.deltaFtMs) return false;
    const slice = this.takeSlice(now, p.gamma > 0);
    if (!slice) return false;
    plan.finetune = slice;
    plan.shape = { ...plan.shape, finetune: slice.shape };
    plan.memUsed += this.cost.finetuneBytes(slice.shape);
    return true;
  }

  /**
   * Step 3: the time the iteration may take, ms: the slack to the decodes' TBT deadline. Without
   * a running decode no TBT deadline binds: the budget is the TTFT slack of the most urgent
   * prompt (at least one TBT SLO, so a late prompt still gets a full chunk). Both under the
   * latency margin.
   */
  private latencyBudgetMs(now: number, deadline: number): number {
    const p = this.policy;
    let ttftSlack = Infinity;
    for (const req of [...this.batch.runningRequests, ...this.batch.waitingRequests]) {
      if (req.firstTokenAt < 0) {
        ttftSlack = Math.min(ttftSlack, req.submittedAt + p.ttftSloMs - now);
      }
    }
    return p.latencyMargin *
      (Number.isFinite(deadline)
        ? deadline - now
        : Math.max(p.tbtSloMs, Number.isFinite(ttftSlack) ? ttftSlack : 0));
  }

  /**
   * Step 4: a packing task per prompt still to prefill (running ones first, then waiting ones).
   * Its priority grows with its wait and its TTFT urgency; it fits the largest chunk whose
   * marginal time and KV blocks fit what is left (at least minChunkTokens unless that finishes
   * the prompt). The tasks read the plan when asked, so they see what was placed before them.
   */
  private prefillTasks(now: number, plan: MacePlan<T>): PackTask<PrefillChunk>[] {
    const p = this.policy;
    const B = this.batch.options.blockManager.blockSize;
    const blockBytes = this.cost.kvBytes(1);
    const minChunk = this.minChunkTokens();
    const prefills = [
      ...this.batch.runningRequests.filter((r) =>
        r.length - r.numScheduled > 1 && r.numScheduled < knownLength(r)
      ),
      ...this.batch.waitingRequests,
    ];
    return prefills.map((req) => {
      const waited = (now - req.submittedAt) / 1000;
      const slack = req.submittedAt + p.ttftSloMs - now;
      const urgency = Math.min(2, Math.max(0, 1 - slack / p.ttftSloMs));
      const admitted = req.reservedSlots > 0 || req.numScheduled > 0;
      return {
        priority: p.basePriority.prefill + p.agingPerS * waited + p.urgencyWeight * urgency,
        fit: (left: Capacity) => {
          if (plan.seqsLeft === 0 || plan.tokensLeft === 0) return null;
          const start = req.numScheduled;
          const remaining = knownLength(req) - start;
          const slot = start - req.evicted;
          // Admission reserves blocks for every known token at once.
          const blocksFor = (n: number) =>
            admitted ? newBlocks(req, start + n, B) : Math.ceil(knownLength(req) / B);
          const timeFor = (n: number) =>
            this.marginalMs(plan, addChunk(plan.shape, slot, n, false));
          let n = largestFitting(
            Math.min(remaining, plan.tokensLeft),
            (k) => timeFor(k) <= left.timeMs + FIT_EPSILON,
          );
          const blocks = blocksFor(n);
          if (blocks * blockBytes > left.memBytes) n = 0;
          if (!admitted && blocks > plan.kvBlocksLeft) n = 0;
          if (n === 0 || (n < minChunk && n < remaining)) return null;
          return {
            value: { request: req, tokens: n, blocks },
            memBytes: blocks * blockBytes,
            timeMs: timeFor(n),
          };
        },
      };
    });
  }

  /**
   * Step 5: a packing task for the next fine-tuning slice, when one may run. Its priority grows
   * with its wait and the pairs' mean DPO loss (γ). Fine-tuning's share of a serving iteration's
   * slack grows with its wait (SLO urgency, as for prefills): just served, it runs only on an
   * otherwise idle GPU and leaves the requests' latency alone; nearing δ_ft it may take all the
   * slack; at δ_ft it is forced (step 2).
   */
  private sliceTask(
    now: number,
    plan: MacePlan<T>,
    prefillTasks: readonly PackTask<PrefillChunk>[],
    capacity: Capacity,
  ): PackTask<MacePlacement<T>> | null {
    const p = this.policy;
    if (!this.finetuneRunnable(now)) return null;
    const next = this.peekSlice(now, p.gamma > 0);
    if (!next) return null;
    const meanLoss = next.pairs.reduce((s, q) => s + q.loss, 0) / next.pairs.length;
    const waited = now - this.finetuneClock;
    const share = Math.min(1, waited / p.deltaFtMs) ** 2;
    return {
      priority: p.basePriority.finetune + p.agingPerS * waited / 1000 + p.gamma * meanLoss,
      fit: (left) => {
        const timeMs = this.marginalMs(plan, { ...plan.shape, finetune: next.shape });
        const serving = plan.picks.length > 0 || prefillTasks.length > 0;
        const reserved = serving ? (1 - share) * capacity.timeMs : 0;
        if (timeMs > left.timeMs - reserved + FIT_EPSILON) return null;
        return { value: { slice: next }, memBytes: this.cost.finetuneBytes(next.shape), timeMs };
      },
    };
  }

  /** Step 6: best-fit packing chose `value`: it joins the plan. */
  private place(plan: MacePlan<T>, value: MacePlacement<T>): void {
    if ("slice" in value) {
      plan.finetune = value.slice;
      this.dpo!.next++;
      plan.shape = { ...plan.shape, finetune: value.slice.shape };
    } else {
      plan.picks.push({ request: value.request, maxTokens: value.tokens });
      plan.shape = addChunk(
        plan.shape,
        value.request.numScheduled - value.request.evicted,
        value.tokens,
        false,
      );
      plan.seqsLeft--;
      plan.tokensLeft -= value.tokens;
      plan.kvBlocksLeft -= value.blocks;
    }
  }

  /**
   * Step 7, when packing placed nothing: with nothing else to run, the first prefill in priority
   * order runs a minimal chunk even if the model predicts it over budget; without prefills an
   * idle GPU runs the next slice even if it is longer than the budget.
   */
  private guaranteeProgress(
    now: number,
    plan: MacePlan<T>,
    prefillTasks: readonly PackTask<PrefillChunk>[],
  ): void {
    if (plan.picks.length > 0 || plan.finetune) return;
    if (prefillTasks.length === 0) {
      plan.finetune = this.takeSlice(now, this.policy.gamma > 0);
      return;
    }
    const head = [...prefillTasks].sort((a, b) => b.priority - a.priority)[0];
    const chunk = head.fit({ memBytes: Infinity, timeMs: Infinity });
    if (chunk) {
      plan.picks.push({
        request: chunk.value.request,
        maxTokens: Math.min(chunk.value.tokens, this.minChunkTokens()),
      });
    }
  }

  /** The smallest prefill chunk worth a step (never more than a step holds), tokens. */
  private minChunkTokens(): number {
    return Math.min(this.policy.minChunkTokens, this.batch.options.maxTokensPerStep);
  }

  /** Predicted time `next` adds to the plan's current shape, ms. */
  private marginalMs(plan: MacePlan<T>, next: StepShape): number {
    return this.cost.predictMs(next) - this.cost.predictMs(plan.shape);
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

/** KV blocks a request needs beyond those it holds to have slots up to position `end`. */
function newBlocks(req: RequestState, end: number, blockSize: number): number {
  return Math.max(
    0,
    Math.ceil((end - req.evicted) / blockSize) - Math.ceil(req.reservedSlots / blockSize),
  );
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
