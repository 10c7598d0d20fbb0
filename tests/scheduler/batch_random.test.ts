/**
 * BatchScheduler under randomized load, on the CPU: a pipelined loop (depth 1..3) over the fake
 * executor (fake_executor.ts), with random arrivals of prompts that share prefixes, small KV pools
 * (preemption), random cancellations of waiting and running requests, KV budgets (pruning),
 * adapters, max tokens and EOS. After every step the block manager's invariants hold; each step
 * keeps the token and sequence budgets; every request that is not cancelled ends with exactly the
 * tokens the unbatched reference gives (with pruning: up to its first pruning; after it, what it
 * attended to is checked); after the run no block is referenced. Seeds are fixed; a failure names
 * its seed and scenario.
 */
import assert from "node:assert/strict";
import { rng } from "../helpers/random.ts";
import { BlockManager } from "../../src/scheduler/block_manager.ts";
import { BatchScheduler, type ScheduledStep } from "../../src/scheduler/batch_scheduler.ts";
import type { PruningPolicy } from "../../src/scheduler/kv_pruning.ts";
import type { GenerationRequest, RequestState } from "../../src/scheduler/request.ts";
import {
  FakeExecutor,
  referenceGeneration,
  type ReferenceOutput,
  type SampleEvent,
} from "./fake_executor.ts";

const VOCAB = 40;
const PRUNING: PruningPolicy = { sinks: 2, window: 8, heavyHitters: true };

interface Scenario {
  seed: number;
  /** Steps in flight at most. */
  depth: number;
  numBlocks: number;
  blockSize: number;
  prefixCaching: boolean;
  /** Engine-wide KV budget (0: no pruning). */
  kvBudget: number;
  adapters: (string | undefined)[];
  maxTokensPerStep: number;
  maxSeqsPerStep: number;
  /** Loop turns during which requests arrive; the loop then drains. */
  turns: number;
  /** Per turn: chance of an arrival, and of a cancellation. */
  arrivalRate: number;
  cancelRate: number;
}

/** One request's life as the test sees it (a request id can be reused once its request ended). */
interface Tracked {
  request: GenerationRequest;
  state: RequestState;
  reference: ReferenceOutput;
  budget: number;
  streamed: number[];
  /** Output length when cancelled. */
  cancelledWith: number | null;
  /** Output length at its first pruning (tokens before it are exact). */
  firstPruneWith: number | null;
  /** A prune was refused (no blocks for its copies): its KV may exceed the budget for a while. */
  pruneRefused: boolean;
  /** Samples it took, with what each attended (kept for requests with a KV budget). */
  events: SampleEvent[];
}

interface Stats {
  steps: number;
  tokens: number;
  feedbackTokens: number;
  finished: number;
  eos: number;
  cancelledWaiting: number;
  cancelledRunning: number;
  cancelledWithSampleInFlight: number;
  preemptions: number;
  prefixHitTokens: number;
  prunes: number;
  pruneRefusals: number;
  kvEditCopies: number;
  idReuses: number;
  adapterRequests: number;
  maxInFlight: number;
}

function emptyStats(): Stats {
  return {
    steps: 0,
    tokens: 0,
    feedbackTokens: 0,
    finished: 0,
    eos: 0,
    cancelledWaiting: 0,
    cancelledRunning: 0,
    cancelledWithSampleInFlight: 0,
    preemptions: 0,
    prefixHitTokens: 0,
    prunes: 0,
    pruneRefusals: 0,
    kvEditCopies: 0,
    idReuses: 0,
    adapterRequests: 0,
    maxInFlight: 0,
  };
}

/** The smallest KV budget a request may have: sinks + window + one block. */
function minBudget(blockSize: number): number {
  return PRUNING.sinks + PRUNING.window + blockSize;
}

function scenarioFor(seed: number): Scenario {
  const r = rng(seed * 7919 + 17);
  const blockSize = [4, 4, 1, 2, 8, 16, 4][seed % 7];
  // A pool of 72 to 130 tokens: a request can need all of it, so decodes preempt.
  const poolTokens = 72 + Math.floor(r() * 60);
  return {
    seed,
    depth: 1 + (seed % 3),
    numBlocks: Math.max(Math.ceil(72 / blockSize), Math.round(poolTokens / blockSize)),
    blockSize,
    prefixCaching: seed % 6 !== 5,
    kvBudget: seed % 3 === 1 ? minBudget(blockSize) + [2, 6, 10][Math.floor(r() * 3)] : 0,
    adapters: seed % 2 === 0 ? [undefined, "a@1", "b@1"] : [undefined],
    // Some runs have tiny steps: prompts trickle in a token or a few at a time.
    maxTokensPerStep: seed % 4 === 3 ? 1 + Math.floor(r() * 4) : 12 + Math.floor(r() * 40),
    maxSeqsPerStep: seed % 5 === 2 ? 1 : 2 + Math.floor(r() * 5),
    turns: 600,
    arrivalRate: 0.12 + 0.1 * r(),
    cancelRate: 0.02 + 0.03 * r(),
  };
}

/** Runs one scenario; throws (with the seed in the message) on any broken property. */
function runScenario(sc: Scenario, stats: Stats): void {
  const fail = (what: string): never => {
    throw new Error(`seed ${sc.seed} (depth ${sc.depth}): ${what}`);
  };
  const B = sc.blockSize;
  const maxContext = Math.min(sc.numBlocks * B, 72);
  const blockManager = new BlockManager({
    numBlocks: sc.numBlocks,
    blockSize: B,
    enablePrefixCaching: sc.prefixCaching,
  });
  const scheduler = new BatchScheduler({
    blockManager,
    maxTokensPerStep: sc.maxTokensPerStep,
    maxSeqsPerStep: sc.maxSeqsPerStep,
    maxContext,
    kvBudget: sc.kvBudget,
    pruning: PRUNING,
  });
  const live = new Map<number, Tracked>();
  const all: Tracked[] = [];
  const executor = new FakeExecutor({
    numBlocks: sc.numBlocks,
    blockSize: B,
    vocabSize: VOCAB,
    maxTokensPerStep: sc.maxTokensPerStep,
    maxSeqsPerStep: sc.maxSeqsPerStep,
    maxBlocksPerSeq: Math.ceil(maxContext / B),
    // Every sample is attributed to the request that owns the id when the step runs.
    onSample: (event) => {
      const t = live.get(event.seqId);
      if (t && t.budget > 0) t.events.push(event);
    },
  });
  const rand = rng(sc.seed);
  const int = (n: number) => Math.floor(rand() * n);
  const randomTokens = (n: number) => Array.from({ length: n }, () => int(VOCAB));
  const systemPrompts = [2 * B, 3 * B + 1, 5 * B + 2].map((n) => randomTokens(Math.min(n, 30)));
  const endedIds: number[] = [];
  let nextId = 0;
  let now = 0;
  const inFlight: ScheduledStep[] = [];

  const addRequest = () => {
    let id: number;
    const reuse = endedIds.length > 0 && rand() < 0.2;
    if (reuse) id = endedIds.splice(int(endedIds.length), 1)[0];
    else id = nextId++;
    let prompt: number[];
    const shape = rand();
    if (shape < 0.1 && all.length > 0) {
      prompt = [...all[int(all.length)].request.prompt]; // the very same prompt again
    } else if (shape < 0.75) {
      prompt = [...systemPrompts[int(3)], ...randomTokens(1 + int(2 * B + 3))];
    } else {
      prompt = randomTokens(1 + int(4 * B));
    }
    prompt = prompt.slice(0, maxContext - 2);
    const maxTokens = 1 + int(Math.min(24, maxContext - prompt.length));
    const perRequestBudget = sc.kvBudget > 0 && rand() < 0.3;
    const request: GenerationRequest = {
      id,
      prompt,
      maxTokens,
      sampling: { temperature: 1, topK: 0, topP: 1, seed: int(3) },
      eosIds: rand() < 0.6 ? [int(VOCAB)] : [],
      adapterId: sc.adapters[int(sc.adapters.length)],
      kvBudget: perRequestBudget ? [0, minBudget(B), minBudget(B) + 12][int(3)] : undefined,
    };
    const t: Tracked = {
      request,
      state: null as unknown as RequestState,
      reference: referenceGeneration(request, VOCAB),
      budget: request.kvBudget ?? sc.kvBudget,
      streamed: [],
      cancelledWith: null,
      firstPruneWith: null,
      pruneRefused: false,
      events: [],
    };
    request.onToken = (token) => {
      if (t.state.finished) fail(`request ${id} streamed a token after it ended`);
      t.streamed.push(token);
    };
    t.state = scheduler.add(request, now);
    live.set(id, t);
    all.push(t);
    if (reuse) stats.idReuses++;
    if (request.adapterId !== undefined) stats.adapterRequests++;
  };

  const ended = (t: Tracked) => {
    live.delete(t.request.id);
    endedIds.push(t.request.id);
  };

  const checkStep = (step: ScheduledStep) => {
    const seqs = step.plan.sequences;
    const tokens = seqs.reduce((s, w) => s + w.tokens.length, 0);
    if (seqs.length > sc.maxSeqsPerStep) fail(`step ${step.id} has ${seqs.length} sequences`);
    if (tokens > sc.maxTokensPerStep) fail(`step ${step.id} has ${tokens} tokens`);
    for (const work of seqs) {
      const t = live.get(work.seqId);
      if (!t || t.state.finished) fail(`step ${step.id} runs request ${work.seqId}, not live`);
      if (work.adapterId !== t!.request.adapterId) {
        fail(`request ${work.seqId} runs on adapter ${work.adapterId}, not its own`);
      }
    }
    stats.steps++;
    stats.tokens += tokens;
  };

  const completeOldest = () => {
    const step = inFlight.shift()!;
    const result = executor.collect();
    now += result.gpuMs;
    for (const state of scheduler.update(step, result, now)) {
      const t = live.get(state.id);
      if (!t || t.state !== state) fail(`request ${state.id} finished but is not live`);
      ended(t!);
    }
    blockManager.checkIntegrity();
  };

  const pruneOverBudget = () => {
    while (inFlight.length > 0) completeOldest();
    const candidates = scheduler.pruneCandidates();
    if (candidates.length === 0) return;
    const mass = executor.massSnapshot();
    for (const req of candidates) {
      const t = live.get(req.id)!;
      const slots = req.numScheduled - req.evicted;
      const edit = scheduler.prune(req, mass);
      if (!edit) {
        t.pruneRefused = true;
        stats.pruneRefusals++;
        continue;
      }
      executor.applyEdit(edit);
      stats.prunes++;
      stats.kvEditCopies += edit.copies.length;
      t.firstPruneWith ??= req.output.length;
      const kept = req.numScheduled - req.evicted;
      if (kept !== t.budget - B || req.reservedSlots !== kept || kept >= slots) {
        fail(`request ${req.id} pruned from ${slots} to ${kept} slots, budget ${t.budget}`);
      }
      blockManager.checkIntegrity();
    }
  };

  for (let turn = 0;; turn++) {
    if (turn < sc.turns && rand() < sc.arrivalRate) {
      addRequest();
      if (rand() < 0.3) addRequest();
    }
    if (rand() < sc.cancelRate && live.size > 0) {
      const victims = [...live.values()];
      const t = victims[int(victims.length)];
      const running = scheduler.runningRequests.includes(t.state);
      const inFlightSample = t.state.pendingSamples > 0;
      const cancelled = scheduler.cancel(t.request.id, now);
      if (cancelled !== t.state) fail(`cancel of request ${t.request.id} returned another`);
      t.cancelledWith = t.state.output.length;
      if (running) stats.cancelledRunning++;
      else stats.cancelledWaiting++;
      if (inFlightSample) stats.cancelledWithSampleInFlight++;
      ended(t);
      blockManager.checkIntegrity();
    }
    if (scheduler.pruneCandidates().length > 0) pruneOverBudget();
    if (inFlight.length < sc.depth) {
      const step = scheduler.schedule();
      if (step) {
        checkStep(step);
        executor.submit(step.plan);
        inFlight.push(step);
        stats.maxInFlight = Math.max(stats.maxInFlight, inFlight.length);
        blockManager.checkIntegrity();
        continue;
      }
    }
    if (inFlight.length > 0) {
      completeOldest();
      continue;
    }
    if (scheduler.hasWork()) {
      fail(
        `stuck: ${scheduler.numWaiting} waiting, ${scheduler.numRunning} running, nothing ` +
          `scheduled with no step in flight`,
      );
    }
    if (turn >= sc.turns) break;
    now += 1;
  }

  // Every request ended: as the reference says, or cancelled with a prefix of it.
  for (const t of all) {
    const { state, reference, request } = t;
    const where =
      `request ${request.id} (prompt ${request.prompt.length}, max ${request.maxTokens})`;
    if (!state.finished) fail(`${where} never ended`);
    assert.deepEqual(t.streamed, state.output, `seed ${sc.seed}: ${where}: streamed != output`);
    const exactUpTo = t.firstPruneWith ?? Infinity;
    if (t.cancelledWith !== null) {
      if (state.finished !== "cancelled") fail(`${where} cancelled but ended ${state.finished}`);
      if (state.output.length !== t.cancelledWith) fail(`${where} got tokens after cancel`);
      const exact = Math.min(exactUpTo, state.output.length);
      assert.deepEqual(
        state.output.slice(0, exact),
        reference.tokens.slice(0, exact),
        `seed ${sc.seed}: ${where}: cancelled with tokens that are not the reference's`,
      );
      continue;
    }
    stats.finished++;
    if (state.finished === "eos") stats.eos++;
    if (t.firstPruneWith === null) {
      assert.deepEqual(
        { tokens: state.output, stop: state.finished },
        { tokens: reference.tokens, stop: reference.stopReason },
        `seed ${sc.seed}: ${where} differs from its unbatched reference`,
      );
    } else {
      assert.deepEqual(
        state.output.slice(0, exactUpTo),
        reference.tokens.slice(0, exactUpTo),
        `seed ${sc.seed}: ${where}: tokens before its first pruning differ from the reference`,
      );
      if (state.finished === "length" && state.output.length !== request.maxTokens) {
        fail(`${where} stopped for length with ${state.output.length} tokens`);
      }
      if (state.finished === "eos" && state.output.length >= request.maxTokens) {
        fail(`${where} stopped at EOS after its last token`);
      }
      if (state.output.some((token) => request.eosIds.includes(token))) {
        fail(`${where} returned an EOS token`);
      }
    }
    if (t.budget > 0) checkAttended(t, fail);
  }
  stats.preemptions += all.reduce((s, t) => s + t.state.preemptions, 0);
  stats.prefixHitTokens += all.reduce((s, t) => s + t.state.prefixHitTokens, 0);
  stats.feedbackTokens += executor.feedbackTokens;

  // Nothing leaked: no request holds a block, every block is free or cached with no reference.
  if (scheduler.hasWork() || executor.inFlight > 0) fail("work left after the drain");
  blockManager.checkIntegrity();
  for (let b = 0; b < sc.numBlocks; b++) {
    if (blockManager.refCount(b) !== 0) {
      fail(`block ${b} still referenced after every request ended`);
    }
  }
  const s = blockManager.stats();
  if (s.used !== 0 || s.free + s.cached !== s.total) {
    fail(`blocks after the run: ${JSON.stringify(s)}`);
  }
}

/**
 * What a request with a KV budget attended to when it sampled: entries of its own history (its
 * tokens at their positions, its adapter) in position order, ending at the sampled token; either
 * the whole history, or at most the budget with the sinks and the recent window kept. Each sample
 * that was accepted is the output token after that position.
 */
function checkAttended(t: Tracked, fail: (what: string) => never): void {
  const x = [...t.request.prompt, ...t.state.output];
  const where = `request ${t.request.id}`;
  for (const e of t.events) {
    const q = e.position;
    if (q >= x.length) continue; // a sample after its end (in flight at EOS)
    const positions = e.attended.map((a) => a.position);
    if (positions.at(-1) !== q) {
      fail(`${where}: a sample at position ${q} attended up to ${positions.at(-1)}`);
    }
    e.attended.forEach((a, i) => {
      if (i > 0 && a.position <= positions[i - 1]) {
        fail(`${where}: KV positions out of order at ${q}`);
      }
      if (a.token !== x[a.position]) {
        fail(
          `${where}: KV slot ${i} holds token ${a.token} at position ${a.position}, not ${
            x[a.position]
          }`,
        );
      }
      if (a.adapterId !== t.request.adapterId) fail(`${where}: attended another adapter's KV`);
    });
    const whole = positions.length === q + 1;
    if (!whole) {
      if (!t.pruneRefused && positions.length > t.budget) {
        fail(`${where}: ${positions.length} KV entries at position ${q}, budget ${t.budget}`);
      }
      const present = new Set(positions);
      for (let p = 0; p < PRUNING.sinks; p++) {
        if (!present.has(p)) fail(`${where}: sink ${p} missing at position ${q}`);
      }
      for (let p = Math.max(0, q - PRUNING.window); p <= q; p++) {
        if (!present.has(p)) fail(`${where}: recent position ${p} missing at position ${q}`);
      }
    }
    if (q + 1 < x.length && x[q + 1] !== e.token) {
      fail(`${where}: sampled ${e.token} at position ${q}, but its output says ${x[q + 1]}`);
    }
  }
}

Deno.test("BatchScheduler pipelined, randomized: reference tokens, no leaked blocks", () => {
  const total = emptyStats();
  const seeds = Array.from({ length: 21 }, (_, i) => i + 1);
  for (const seed of seeds) {
    const scenario = scenarioFor(seed);
    try {
      runScenario(scenario, total);
    } catch (error) {
      // Errors thrown inside the scheduler or the executor name the scenario too.
      const message = error instanceof Error ? error.message : String(error);
      if (message.startsWith(`seed ${seed} `)) throw error;
      throw new Error(`seed ${seed}, scenario ${JSON.stringify(scenario)}: ${message}`, {
        cause: error,
      });
    }
  }
  console.log(`batch_random: ${seeds.length} seeds, ${JSON.stringify(total)}`);
  // The runs exercised what they are meant to (a generator change must not make them vacuous).
  for (
    const key of [
      "eos",
      "cancelledWaiting",
      "cancelledRunning",
      "cancelledWithSampleInFlight",
      "preemptions",
      "prefixHitTokens",
      "prunes",
      "feedbackTokens",
      "idReuses",
      "adapterRequests",
    ] as const
  ) {
    assert.ok(total[key] > 0, `no run exercised ${key}`);
  }
  assert.equal(total.maxInFlight, 3);
  assert.ok(total.steps >= 5000, `${total.steps} steps`);
});
