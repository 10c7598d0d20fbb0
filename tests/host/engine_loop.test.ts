/**
 * The one engine loop (src/host/engine_loop.ts) without a GPU: the real CoScheduler,
 * BatchScheduler and BlockManager, driven through EngineLoop by an executor on the CPU
 * (tests/scheduler/fake_executor.ts: a fake model whose tokens hash the whole KV history it was
 * fed, and a fake trainer that checks the DPO slice protocol). The fake GPU runs iterations one
 * after another on a virtual clock and completes each in a macrotask of its own, so pipelining,
 * drains and time attribution happen as on the real queue. Seeded random workloads, thousands of
 * iterations, all policies, depths 1..3; asserted after every iteration and at the end.
 */
import assert from "node:assert/strict";
import { setImmediate } from "node:timers";
import type { StepResult } from "../../src/engine/step.ts";
import { BatchScheduler } from "../../src/scheduler/batch_scheduler.ts";
import { BlockManager } from "../../src/scheduler/block_manager.ts";
import { CostModel } from "../../src/scheduler/cost_model.ts";
import {
  CoScheduler,
  type Iteration,
  type IterationOutcome,
} from "../../src/scheduler/mace/co_scheduler.ts";
import { type PolicyName, policyOptions } from "../../src/scheduler/mace/policy.ts";
import type { RequestOutput, RequestState } from "../../src/scheduler/request.ts";
import {
  EngineLoop,
  type IterationExecutor,
  type IterationResults,
} from "../../src/host/engine_loop.ts";
import { FakeExecutor, FakeTrainer, referenceGeneration } from "../scheduler/fake_executor.ts";
import { rng } from "../helpers/random.ts";
import { TEST_PROFILE } from "../scheduler/test_profile.ts";

const VOCAB = 97;
const BLOCK = 4;
const EOS = [5];

/** A virtual clock (ms) that only the fake GPU moves. */
class Clock {
  t = 0;
  readonly now = () => this.t;
}

/**
 * The GPU side of an iteration on the CPU: the step runs on the FakeExecutor and the slice is
 * issued to the FakeTrainer at launch (submission order); each iteration then takes its fake
 * duration after the GPU is free, and completes in a macrotask of its own at that virtual time.
 */
class FakeGpu implements IterationExecutor<null> {
  inFlight = 0;
  maxInFlight = 0;
  launched = 0;
  drains = 0;
  prunes = 0;
  /** Iteration id -> its fake GPU duration (ms). */
  readonly durations = new Map<number, number>();
  /** Iteration whose results come back as a GPU error (the failure path), or -1. */
  failAt = -1;
  private gpuFreeAt = 0;
  private previous: Promise<unknown> = Promise.resolve();

  constructor(
    readonly clock: Clock,
    readonly model: FakeExecutor,
    readonly trainer: FakeTrainer,
    readonly batch: BatchScheduler,
    readonly random: () => number,
    /** Report GPU time as timestamp queries would (else the loop attributes it). */
    readonly reportsGpuTime: boolean,
  ) {}

  launch(it: Iteration<null>): Promise<IterationResults> {
    const result: StepResult | null = it.step ? this.model.run(it.step.plan) : null;
    if (it.finetune) this.trainer.issue(it.finetune);
    this.launched++;
    this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    const duration = 1 + Math.floor(this.random() * 20);
    this.durations.set(it.id, duration);
    const doneAt = Math.max(this.clock.t, this.gpuFreeAt) + duration;
    this.gpuFreeAt = doneAt;
    const done = this.previous.then(() =>
      new Promise<IterationResults>((resolve, reject) =>
        setImmediate(() => {
          this.clock.t = doneAt;
          this.inFlight--;
          // A GPU error surfaces when the iteration's results are read.
          if (it.id === this.failAt) return reject(new Error(`GPU lost at iteration ${it.id}`));
          const losses = it.finetune ? this.trainer.complete(it.finetune) : undefined;
          resolve({ result, losses, gpuMs: this.reportsGpuTime ? duration : undefined });
        })
      )
    );
    // The GPU goes on after a failed iteration: the next one waits for it to settle, not succeed.
    this.previous = done.catch(() => {});
    return done;
  }

  needsDrain(it: Iteration<null>): boolean {
    const drain = it.finetune !== null && this.trainer.needsReference(it.finetune);
    if (drain) this.drains++;
    return drain;
  }

  async prune(): Promise<void> {
    assert.equal(this.inFlight, 0, "pruning with an iteration in flight");
    this.prunes++;
    for (const req of this.batch.pruneCandidates()) {
      const edit = this.batch.prune(req, this.model.massSnapshot());
      if (edit) await this.model.applyKvEdit(edit);
    }
  }
}

interface Submitted {
  state: RequestState;
  prompt: number[];
  maxTokens: number;
  seed: number;
  adapterId?: string;
  pruned: boolean;
  output?: RequestOutput;
  error?: unknown;
}

/** One engine on the fake GPU: the loop, its scheduler, and a random workload fed into it. */
function harness(seed: number, policy: PolicyName, depth: number, reportsGpuTime: boolean) {
  const random = rng(seed);
  const clock = new Clock();
  const blockManager = new BlockManager({
    numBlocks: 40,
    blockSize: BLOCK,
    enablePrefixCaching: true,
  });
  const batch = new BatchScheduler({
    blockManager,
    maxTokensPerStep: 48,
    maxSeqsPerStep: 6,
    maxContext: 96,
    pruning: { sinks: 2, window: 4, heavyHitters: true },
  });
  const cost = new CostModel(TEST_PROFILE, { online: false });
  const scheduler = new CoScheduler<null>({
    policy: policyOptions(policy, {
      tbtSloMs: 60,
      ttftSloMs: 400,
      deltaFtMs: 80,
      periodMs: 300,
      pairsPerStep: 2,
      layersPerSlice: 1,
    }),
    batch,
    cost,
    numLayers: TEST_PROFILE.numLayers,
    memoryBytes: cost.kvBytes(40 * BLOCK) + 1e6,
  }, 0);
  const model = new FakeExecutor({
    numBlocks: 40,
    blockSize: BLOCK,
    vocabSize: VOCAB,
    maxTokensPerStep: 48,
    maxSeqsPerStep: 6,
  });
  const trainer = new FakeTrainer(TEST_PROFILE.numLayers, 1);
  const gpu = new FakeGpu(clock, model, trainer, batch, random, reportsGpuTime);
  const live = new Map<number, Submitted>();
  const all: Submitted[] = [];
  const attributed = new Map<number, number>();
  let failure: unknown = null;
  // Record the time the loop attributes to each iteration.
  const complete = scheduler.complete.bind(scheduler);
  scheduler.complete = (it: Iteration<null>, outcome: IterationOutcome, now: number) => {
    attributed.set(it.id, outcome.ms);
    return complete(it, outcome, now);
  };

  let nextId = 0;
  let nextPair = 0;
  const prefixes = [0, 1, 2].map(() =>
    Array.from({ length: 8 }, () => 6 + Math.floor(random() * 90))
  );
  const addRequest = () => {
    const prompt = [
      ...prefixes[Math.floor(random() * 3)].slice(0, Math.floor(random() * 9)),
      ...Array.from({ length: 1 + Math.floor(random() * 12) }, () => 6 + Math.floor(random() * 90)),
    ];
    const maxTokens = 1 + Math.floor(random() * 30);
    const kvBudget = random() < 0.15 ? 16 : 0;
    const adapterId = random() < 0.3 ? "a@1" : undefined;
    const sampleSeed = Math.floor(random() * 1000);
    const state = scheduler.addRequest({
      id: nextId++,
      prompt,
      maxTokens,
      sampling: { temperature: 1, topK: 0, topP: 1, seed: sampleSeed },
      eosIds: EOS,
      kvBudget,
      adapterId,
    }, clock.t);
    const s: Submitted = {
      state,
      prompt,
      maxTokens,
      seed: sampleSeed,
      adapterId,
      pruned: kvBudget > 0,
    };
    live.set(state.id, s);
    all.push(s);
  };
  const addFeedback = () => {
    const n = 1 + Math.floor(random() * 3);
    scheduler.addFeedback(
      Array.from(
        { length: n },
        () => ({ id: nextPair++, tokens: 10 + Math.floor(random() * 40), payload: null }),
      ),
      clock.t,
    );
  };

  let arrivalsLeft = 0;
  const loop = new EngineLoop(scheduler, batch, gpu, {
    completed: (_it, effects, now) => {
      scheduler.checkInvariants();
      blockManager.checkIntegrity();
      for (const req of effects.finished) {
        const s = live.get(req.id)!;
        s.output = req.result(now);
        live.delete(req.id);
      }
      trainer.retire(effects.retired.map((p) => p.item.id));
      // New work arrives while the loop runs: requests, feedback, cancellations.
      if (arrivalsLeft > 0) {
        const r = random();
        if (r < 0.25) {
          addRequest();
          arrivalsLeft--;
        } else if (r < 0.32) addFeedback();
        else if (r < 0.36 && live.size > 0) {
          const ids = [...live.keys()];
          const id = ids[Math.floor(random() * ids.length)];
          const req = scheduler.cancel(id, now);
          if (req) {
            live.get(id)!.output = req.result(now);
            live.delete(id);
          }
        }
        loop.kick();
      }
    },
    failed: (error) => {
      failure = error;
      batch.abortAll();
      scheduler.abortFinetuneStep();
      trainer.abandonStep();
      for (const s of live.values()) s.error = error;
      live.clear();
    },
    idleExit: () => live.size === 0 && arrivalsLeft === 0,
  }, { depth, now: clock.now });

  /** Feeds `arrivals` requests (a few at once, the rest as the loop runs); resolves when idle. */
  const run = async (arrivals: number) => {
    arrivalsLeft = arrivals;
    for (let i = 0; i < 4 && arrivalsLeft > 0; i++, arrivalsLeft--) addRequest();
    addFeedback();
    loop.kick();
    // The loop stops itself when idle; wait for that on the event loop.
    while (live.size > 0 || arrivalsLeft > 0 || scheduler.hasWork(clock.t) || gpu.inFlight > 0) {
      await new Promise((resolve) => setImmediate(resolve));
      if (failure) return;
      // Everything served and more to come: the next request arrives at an idle engine.
      if (live.size === 0 && arrivalsLeft > 0 && gpu.inFlight === 0) {
        addRequest();
        arrivalsLeft--;
        loop.kick();
      }
      // A periodic policy may idle until its next period: let virtual time get there.
      const wakeAt = scheduler.nextWakeAt();
      if (gpu.inFlight === 0 && wakeAt !== null && !scheduler.hasWork(clock.t)) {
        clock.t = Math.max(clock.t, wakeAt);
        loop.kick();
      }
    }
  };
  return {
    clock,
    gpu,
    trainer,
    scheduler,
    blockManager,
    loop,
    all,
    attributed,
    run,
    failure: () => failure,
    clearFailure: () => (failure = null),
  };
}

/** Every request that was not cancelled got exactly the tokens it gets alone. */
function checkOutputs(all: readonly Submitted[]): { checked: number; cancelled: number } {
  let checked = 0, cancelled = 0;
  for (const s of all) {
    assert.ok(s.output, `request ${s.state.id} never finished`);
    if (s.output.stopReason === "cancelled") {
      cancelled++;
      continue;
    }
    const ref = referenceGeneration(
      {
        prompt: s.prompt,
        maxTokens: s.maxTokens,
        eosIds: EOS,
        adapterId: s.adapterId,
        sampling: { seed: s.seed },
      },
      VOCAB,
    );
    if (s.pruned) {
      // Pruning changes what later tokens attend to: only the count and the stop rule hold.
      assert.ok(s.output.tokens.length <= s.maxTokens);
      assert.ok(s.output.tokens.every((t) => !EOS.includes(t)));
    } else {
      assert.deepEqual(s.output.tokens, ref.tokens, `request ${s.state.id}`);
      assert.equal(s.output.stopReason, ref.stopReason, `request ${s.state.id}`);
    }
    checked++;
  }
  return { checked, cancelled };
}

const POLICIES: PolicyName[] = ["mace", "inference-only", "periodic", "synchronous", "fcfs"];

Deno.test({
  name:
    "engine loop: random workloads finish exactly, blocks return to idle, depth and drains hold",
}, async () => {
  let iterations = 0, requests = 0, slices = 0, drains = 0, prunes = 0, cancelled = 0;
  for (const policy of POLICIES) {
    for (const depth of [1, 2, 3]) {
      for (const seed of [1, 2]) {
        const h = harness(seed * 101 + depth, policy, depth, seed === 2);
        await h.run(60);
        const where = `${policy}, depth ${depth}, seed ${seed}`;
        assert.equal(h.failure(), null, where);
        assert.ok(h.gpu.maxInFlight <= depth, `${where}: ${h.gpu.maxInFlight} in flight`);
        if (depth > 1) assert.ok(h.gpu.maxInFlight > 1, `${where}: never pipelined`);
        const { checked, cancelled: c } = checkOutputs(h.all);
        cancelled += c;
        prunes += h.gpu.prunes;
        assert.ok(checked > 30, `${where}: only ${checked} requests checked`);
        // Idle again: nothing referenced, every block free or cached for reuse.
        const stats = h.blockManager.stats();
        assert.equal(stats.used, 0, `${where}: ${stats.used} blocks still used`);
        h.blockManager.checkIntegrity();
        if (policy === "inference-only") assert.equal(h.trainer.slicesIssued, 0, where);
        else assert.ok(h.trainer.optimizerSteps > 0, `${where}: never trained`);
        iterations += h.gpu.launched;
        requests += h.all.length;
        slices += h.trainer.slicesIssued;
        drains += h.gpu.drains;
        await h.loop.close();
      }
    }
  }
  console.log(
    `${iterations} iterations, ${requests} requests (${cancelled} cancelled), ` +
      `${slices} DPO slices, ${drains} drains for a reference, ${prunes} prunes`,
  );
  // The workload reached every path it is meant to.
  assert.ok(iterations > 3000 && cancelled > 0 && drains > 0 && prunes > 0);
});

Deno.test("engine loop: each iteration's time is its own GPU time, pipelined or not", async () => {
  for (const depth of [1, 3]) {
    for (const reportsGpuTime of [false, true]) {
      const h = harness(7 + depth, "mace", depth, reportsGpuTime);
      await h.run(40);
      assert.equal(h.failure(), null);
      assert.ok(h.attributed.size > 100);
      for (const [id, ms] of h.attributed) {
        assert.equal(ms, h.gpu.durations.get(id), `iteration ${id} at depth ${depth}`);
      }
      await h.loop.close();
    }
  }
});

Deno.test({
  name: "engine loop: a GPU error fails every live request; the next request starts afresh",
}, async () => {
  const h = harness(11, "mace", 3, false);
  h.gpu.failAt = 25;
  await h.run(20);
  const error = h.failure() as Error;
  assert.match(error?.message ?? "", /GPU lost at iteration 25/);
  const failed = h.all.filter((s) => s.error === error);
  assert.ok(failed.length > 0, "some request was live when the GPU failed");
  assert.equal(h.blockManager.stats().used, 0, "the aborted requests freed their blocks");
  // The engine goes on: new requests run on a fresh KV state and finish exactly.
  h.clearFailure();
  const before = h.all.length;
  await h.run(10);
  assert.equal(h.failure(), null);
  const after = h.all.slice(before);
  assert.ok(after.length >= 10);
  assert.ok(checkOutputs(after).checked > 0);
  await h.loop.close();
});

Deno.test("engine loop: fine-tuning waits at most δ_ft plus the iterations in flight", async () => {
  for (const depth of [1, 2, 3]) {
    const h = harness(23 + depth, "mace", depth, true);
    await h.run(80);
    assert.equal(h.failure(), null);
    // δ_ft = 80 ms; a forced slice joins the next iteration scheduled, which may wait for the
    // `depth` iterations ahead of it (at most 20 ms each here).
    const bound = 80 + 20 * (depth + 1);
    assert.ok(
      h.scheduler.maxFinetuneWaitMs <= bound,
      `depth ${depth}: fine-tuning waited ${h.scheduler.maxFinetuneWaitMs} ms > ${bound}`,
    );
    await h.loop.close();
  }
});
