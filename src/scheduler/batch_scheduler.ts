/**
 * Continuous batching with chunked prefill (vLLM-style, first come first served),
 * over the paged KV cache of a BlockManager. Pure TypeScript: it builds StepPlans
 * and reads StepResults; the engine executes them.
 *
 * A request is a token sequence X = prompt ++ generated tokens (the last few may
 * still be in flight on the GPU). `numScheduled` tokens of X have their K/V
 * computed or submitted; every step closes the gap under a token budget, so a
 * prefill chunk, a decode and a recompute after preemption are the same thing.
 * Decodes may be scheduled before the previous step's sample is on the CPU
 * (FEEDBACK_TOKEN), so the engine loop can keep several steps in flight.
 *
 * Per step: running requests that need one token (decodes) first, then running
 * requests still prefilling, then waiting requests are admitted in arrival order
 * while the budget, the step's sequence limit and the KV pool allow. When the pool
 * is full a decode preempts the most recently admitted request (its blocks are
 * freed, its full blocks stay in the prefix cache, and it is recomputed later).
 */
import { FEEDBACK_TOKEN, type KvEdit, type StepPlan, type StepResult } from "../engine/step.ts";
import { InvalidRequestError } from "../engine/errors.ts";
import type { BlockManager } from "./block_manager.ts";
import { type GenerationRequest, RequestState } from "./request.ts";
import {
  DEFAULT_PRUNING,
  meanAttentionMass,
  type PruningPolicy,
  selectKeptSlots,
} from "./kv_pruning.ts";

export interface BatchSchedulerOptions {
  blockManager: BlockManager;
  /** Tokens per step: the prefill chunk budget. */
  maxTokensPerStep: number;
  /** Sequences per step. */
  maxSeqsPerStep: number;
  /** Longest sequence (prompt + generated) the engine accepts. */
  maxContext: number;
  /** KV entries a request keeps before it is pruned (0 = no pruning, the default). */
  kvBudget?: number;
  pruning?: PruningPolicy;
}

/** One plan entry and what the scheduler needs to account for it when its result arrives. */
interface StepEntry {
  request: RequestState;
  /** The request's admission (preemption starts a new one); stale entries are ignored. */
  admission: number;
  /** Index in X of the first token. */
  start: number;
  count: number;
  sample: boolean;
}

/** A request a policy put into a step, and the most tokens it may compute in it. */
export interface StepPick {
  request: RequestState;
  maxTokens: number;
}

export interface ScheduledStep {
  id: number;
  plan: StepPlan;
  entries: StepEntry[];
}

export class BatchScheduler {
  private readonly waiting: RequestState[] = [];
  /** Admitted requests, in admission order. */
  private readonly running: RequestState[] = [];
  private readonly admissions = new Map<RequestState, number>();
  private nextStepId = 0;
  private admissionCounter = 0;

  constructor(readonly options: BatchSchedulerOptions) {}

  /** Queues a request. Throws InvalidRequestError if it can never run on this engine. */
  add(request: GenerationRequest, now: number): RequestState {
    const { prompt, maxTokens } = request;
    if (prompt.length === 0) throw new InvalidRequestError(`request ${request.id}: empty prompt`);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new InvalidRequestError(`request ${request.id}: max tokens must be a positive integer`);
    }
    if (prompt.length + maxTokens > this.options.maxContext) {
      throw new InvalidRequestError(
        `request ${request.id}: prompt (${prompt.length} tokens) + max tokens (${maxTokens}) ` +
          `exceeds the context of ${this.options.maxContext} tokens; shorten the prompt or ` +
          `lower max tokens`,
      );
    }
    const budget = request.kvBudget ?? this.options.kvBudget ?? 0;
    const policy = this.options.pruning ?? DEFAULT_PRUNING;
    if (
      budget !== 0 &&
      (!Number.isInteger(budget) ||
        budget < policy.sinks + policy.window + this.options.blockManager.blockSize)
    ) {
      throw new InvalidRequestError(
        `request ${request.id}: a KV budget of ${budget} tokens is below sinks (${policy.sinks}) ` +
          `+ window (${policy.window}) + one block (${this.options.blockManager.blockSize}); ` +
          `raise it or use 0 (no pruning)`,
      );
    }
    if (this.isLive(request.id)) {
      throw new InvalidRequestError(`request id ${request.id} is already in use`);
    }
    const state = new RequestState(request, now);
    this.waiting.push(state);
    return state;
  }

  get numWaiting(): number {
    return this.waiting.length;
  }

  get numRunning(): number {
    return this.running.length;
  }

  hasWork(): boolean {
    return this.waiting.length > 0 || this.running.length > 0;
  }

  /** Queued requests not admitted yet, in arrival order (preempted ones first). */
  get waitingRequests(): readonly RequestState[] {
    return this.waiting;
  }

  /** Admitted requests, in admission order. */
  get runningRequests(): readonly RequestState[] {
    return this.running;
  }

  /**
   * The next step, or null when nothing can run until an in-flight step returns.
   *
   * Without `picks`: first come first served (decodes, then running prefills, then admissions in
   * arrival order) under the step's token budget. With `picks` (a policy chose the step's work,
   * e.g. the MACE packer): exactly those requests, in that order, each computing at most its
   * `maxTokens` (waiting ones are admitted out of order); a pick that cannot run now (KV pool
   * full, nothing to compute) is left out.
   */
  schedule(picks?: readonly StepPick[]): ScheduledStep | null {
    const id = this.nextStepId;
    const { maxTokensPerStep, maxSeqsPerStep } = this.options;
    const entries: StepEntry[] = [];
    let budget = maxTokensPerStep;
    const inStep = new Set<RequestState>();

    const tryAdd = (req: RequestState, limit = budget): void => {
      if (entries.length >= maxSeqsPerStep || budget === 0 || inStep.has(req)) return;
      const work = this.nextChunk(req, id, Math.min(budget, limit));
      if (!work) return;
      if (!this.reserveSlots(req, work.start + work.count, inStep)) return;
      entries.push({ request: req, admission: this.admissions.get(req)!, ...work });
      inStep.add(req);
      budget -= work.count;
      req.numScheduled = work.start + work.count;
      if (work.sample) {
        req.pendingSamples++;
        req.lastSampleStep = id;
      }
    };

    if (picks) {
      for (const { request, maxTokens } of picks) {
        if (request.finished || (!this.admissions.has(request) && !this.admitWaiting(request))) {
          continue;
        }
        tryAdd(request, maxTokens);
      }
    } else {
      const needsOneToken = (req: RequestState) => req.length - req.numScheduled === 1;
      for (const req of [...this.running]) if (needsOneToken(req)) tryAdd(req);
      for (const req of [...this.running]) if (!needsOneToken(req)) tryAdd(req);
      while (this.waiting.length > 0 && entries.length < maxSeqsPerStep && budget > 0) {
        if (!this.admitWaiting(this.waiting[0])) break;
        tryAdd(this.running[this.running.length - 1]);
      }
    }
    if (entries.length === 0) return null;
    this.nextStepId++;
    const plan: StepPlan = {
      sequences: entries.map(({ request, start, count, sample }) => {
        const known = request.knownSlice(start, start + count);
        return {
          seqId: request.id,
          tokens: Array.from({ length: count }, (_, i) => known[i] ?? FEEDBACK_TOKEN),
          startPosition: start,
          startSlot: start - request.evicted,
          trackMass: this.budgetOf(request) > 0,
          blockTable: this.options.blockManager.blockTable(request.id),
          sample,
          sampling: request.request.sampling,
          adapterId: request.request.adapterId,
        };
      }),
    };
    return { id, plan, entries };
  }

  /**
   * Accounts a finished step: commits computed tokens to the block manager, takes the
   * samples, and frees finished requests. Steps must be updated in the order scheduled.
   * Returns the requests that finished.
   */
  update(step: ScheduledStep, result: StepResult, now: number): RequestState[] {
    const finished: RequestState[] = [];
    const bm = this.options.blockManager;
    step.entries.forEach((entry, i) => {
      const req = entry.request;
      if (req.finished || this.admissions.get(req) !== entry.admission) return;
      // Every token of the entry is known now: an earlier step's sample was accepted first.
      bm.commitTokens(req.id, req.knownSlice(entry.start, entry.start + entry.count));
      if (entry.sample && req.acceptSample(result.sampled[i], now)) {
        bm.free(req.id);
        this.running.splice(this.running.indexOf(req), 1);
        this.admissions.delete(req);
        finished.push(req);
      }
    });
    return finished;
  }

  /** The next tokens of X the request can compute in step `stepId`, or null. */
  private nextChunk(
    req: RequestState,
    stepId: number,
    budget: number,
  ): { start: number; count: number; sample: boolean } | null {
    const start = req.numScheduled;
    const end = req.length;
    // Once every sample is issued, the remaining tokens' K/V would never be read.
    if (start >= end || req.samplesIssued >= req.request.maxTokens) return null;
    const knownEnd = req.request.prompt.length + req.output.length;
    if (start >= knownEnd) {
      // The input is the token sampled by the previous step, still on the GPU.
      if (req.lastSampleStep !== stepId - 1) return null;
      return { start, count: 1, sample: req.samplesIssued < req.request.maxTokens };
    }
    const count = Math.min(budget, knownEnd - start);
    const reachesEnd = start + count === end;
    return { start, count, sample: reachesEnd && req.samplesIssued < req.request.maxTokens };
  }

  /**
   * Makes sure KV slots exist for X[0 .. end), preempting the most recently admitted
   * request outside this step if the pool is full. False if it cannot be done now.
   */
  private reserveSlots(
    req: RequestState,
    end: number,
    inStep: ReadonlySet<RequestState>,
  ): boolean {
    const bm = this.options.blockManager;
    const missing = end - req.evicted - req.reservedSlots;
    if (missing <= 0) return true;
    for (;;) {
      if (bm.appendSlots(req.id, missing)) {
        req.reservedSlots = end - req.evicted;
        return true;
      }
      const victim = this.running.findLast((r) =>
        r !== req && !inStep.has(r) && r.pendingSamples === 0
      );
      if (!victim) return false;
      this.preempt(victim);
    }
  }

  /** Admits a waiting request (anywhere in the queue); false if the KV pool cannot take it now. */
  private admitWaiting(req: RequestState): boolean {
    const index = this.waiting.indexOf(req);
    if (index < 0 || !this.admit(req)) return false;
    this.waiting.splice(index, 1);
    return true;
  }

  /** Allocates KV blocks for a waiting request (prefix hit included); false if the pool is full. */
  private admit(req: RequestState): boolean {
    const tokens = req.knownTokens;
    const allocation = this.options.blockManager.allocate(req.id, tokens, req.request.adapterId);
    if (!allocation) return false;
    req.numScheduled = allocation.numCached;
    req.reservedSlots = tokens.length;
    req.prefixHitTokens += allocation.numCached;
    this.running.push(req);
    this.admissions.set(req, this.admissionCounter++);
    return true;
  }

  /** Drops a request's K/V; it waits at the head of the queue to be recomputed. */
  private preempt(req: RequestState): void {
    this.options.blockManager.free(req.id);
    this.running.splice(this.running.indexOf(req), 1);
    this.admissions.delete(req);
    req.numScheduled = 0;
    req.reservedSlots = 0;
    req.evicted = 0;
    req.keptPositions = [];
    req.preemptions++;
    this.waiting.unshift(req);
  }

  /**
   * Running requests whose KV reached their budget: prune them (after every step in flight
   * has been accounted) before scheduling more.
   */
  pruneCandidates(): RequestState[] {
    return this.running.filter((req) => {
      const budget = this.budgetOf(req);
      const slots = req.numScheduled - req.evicted;
      // A prompt still being prefilled holds slots reserved for tokens not computed yet: it is
      // pruned once its prefill is done.
      return budget > 0 && slots >= budget && req.numScheduled < req.length &&
        req.reservedSlots === slots;
    });
  }

  /**
   * Prunes a request to one block under its budget, keeping slots by the policy and the
   * attention mass of each physical slot (`mass`). Returns the KV edit the engine must apply
   * before the next step, or null if the pool cannot spare the copies it needs now.
   */
  prune(req: RequestState, mass: Float32Array): KvEdit | null {
    const bm = this.options.blockManager;
    const B = bm.blockSize;
    const slots = req.numScheduled - req.evicted;
    const table = bm.blockTable(req.id);
    // Position of the token in a slot: slots past the last pruning hold consecutive positions.
    const kept = req.keptPositions;
    const position = (slot: number) => (slot < kept.length ? kept[slot] : slot + req.evicted);
    const keep = selectKeptSlots(
      slots,
      this.budgetOf(req) - B,
      this.options.pruning ?? DEFAULT_PRUNING,
      (slot) =>
        meanAttentionMass(
          mass[table[Math.floor(slot / B)] * B + (slot % B)],
          req.numScheduled - position(slot),
        ),
    );
    const edit = bm.prune(req.id, keep);
    if (!edit) return null;
    req.keptPositions = keep.map(position);
    req.evicted += slots - keep.length;
    req.reservedSlots = keep.length;
    return { copies: edit.copies, moves: edit.moves };
  }

  private budgetOf(req: RequestState): number {
    return req.request.kvBudget ?? this.options.kvBudget ?? 0;
  }

  /**
   * Ends a live request now: a running one frees its blocks (results of its steps still in flight
   * are ignored), a waiting one leaves the queue. Returns it, or null if no live request has `id`.
   */
  cancel(id: number, now: number): RequestState | null {
    const waitingIndex = this.waiting.findIndex((r) => r.id === id);
    const req = waitingIndex >= 0
      ? this.waiting.splice(waitingIndex, 1)[0]
      : this.running.find((r) => r.id === id);
    if (!req) return null;
    if (this.admissions.has(req)) {
      this.options.blockManager.free(req.id);
      this.running.splice(this.running.indexOf(req), 1);
      this.admissions.delete(req);
    }
    req.cancel(now);
    return req;
  }

  /** Drops every request and frees its blocks (after a failed step). */
  abortAll(): void {
    for (const req of this.running) this.options.blockManager.free(req.id);
    this.running.length = 0;
    this.waiting.length = 0;
    this.admissions.clear();
  }

  private isLive(id: number): boolean {
    return this.waiting.some((r) => r.id === id) || this.running.some((r) => r.id === id);
  }
}
