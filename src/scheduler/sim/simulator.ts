/**
 * Discrete-event simulation of a policy serving a workload, deterministic for a seed.
 *
 * Time advances by iterations: the CoScheduler (the same code the live engine runs) plans each
 * one; its duration is the profile's prediction for what it holds, times seeded log-normal noise
 * (sized from the profile's own fit error, so the simulated device is as noisy as the measured
 * one); then the scheduler accounts it. When nothing can run, time jumps to the next arrival,
 * feedback or retraining period. The KV cache is the real BlockManager over the profile's pool,
 * so admission, prefix hits, preemption and pruning happen as they would live.
 *
 * Requests get synthetic token ids: a prefix shared by every request (a system prompt, so prefix
 * sharing has something to share), then ids unique to the request. Generation never hits EOS: a
 * request produces exactly its trace output length. A request marked `feedback` returns one
 * preference pair when it finishes (prompt, and chosen and rejected responses of its output
 * length), clamped to the fine-tuner's max length.
 *
 * The simulator models time, not learning: DPO losses are unknown (null) in its metrics.
 */
import { GREEDY } from "../../engine/step.ts";
import { rng } from "../../engine/training/seeded_random.ts";
import { BatchScheduler } from "../batch_scheduler.ts";
import { BlockManager } from "../block_manager.ts";
import { CostModel, type CostProfile, type PredictionError } from "../cost_model.ts";
import { MetricsRecorder, type MetricsSummary } from "../metrics.ts";
import { CoScheduler } from "../mace/co_scheduler.ts";
import type { PolicyOptions } from "../mace/policy.ts";
import type { Arrival } from "./workload.ts";

export interface SimulationOptions {
  policy: PolicyOptions;
  profile: CostProfile;
  workload: readonly Arrival[];
  seed: number;
  /** σ of the log-normal step-time noise; default: the profile's mean abs percent fit error. */
  noise?: number;
  /** The scheduler's cost model learns online from simulated step times (default true). */
  online?: boolean;
  /** Tokens every prompt starts with after BOS (a shared system prompt); default 32. */
  sharedPrefixTokens?: number;
  /**
   * Token ids of synthetic prompts lie below this (default 512, the bundled model's vocabulary).
   */
  vocabSize?: number;
  /** Engine limits; defaults are the engine's (512 tokens, 16 sequences per step). */
  maxTokensPerStep?: number;
  maxSeqsPerStep?: number;
  /** Longest prompt + response of a training sequence (default 256, the trainer's). */
  trainMaxLength?: number;
  /** Workload window, ms: the metrics cover at least this (default: up to the last arrival). */
  durationMs?: number;
  /** Keep going after the last arrival until every request ends, at most this long (ms). */
  drainMs?: number;
  /** Check the block manager's invariants after every iteration (tests). */
  checkInvariants?: boolean;
  /** Called after every iteration (tests observe plans and timings). */
  onIteration?: (event: SimulatedIteration) => void;
}

export interface SimulatedIteration {
  startMs: number;
  endMs: number;
  predictedMs: number;
  prefillTokens: number;
  decodeSeqs: number;
  finetune: string | null;
  forcedFinetune: boolean;
  /**
   * mace: earliest TBT deadline of the iteration's decodes (ms), and the predicted time of what had
   * to run.
   */
  deadlineMs: number | null;
  mandatoryMs: number;
  /** KV bytes held by requests after the iteration. */
  kvUsedBytes: number;
  /** Fine-tuning activation bytes of the iteration's slice. */
  finetuneBytes: number;
  /** The memory τ_mem is a share of (KV pool + training activations), bytes. */
  memoryBytes: number;
}

export interface SimulationResult {
  summary: MetricsSummary;
  prediction: PredictionError;
  iterations: number;
  optimizerSteps: number;
  adapterVersions: number;
  /** Longest time fine-tuning waited for a slice while it had work, ms. */
  maxFinetuneWaitMs: number;
  endMs: number;
}

export function simulate(o: SimulationOptions): SimulationResult {
  const { profile, policy } = o;
  const mem = profile.memory;
  const trainMaxLength = o.trainMaxLength ?? 256;
  const blockManager = new BlockManager({
    numBlocks: mem.kvBlocks,
    blockSize: mem.blockSize,
    enablePrefixCaching: policy.prefixSharing,
  });
  const batch = new BatchScheduler({
    blockManager,
    maxTokensPerStep: o.maxTokensPerStep ?? 512,
    maxSeqsPerStep: o.maxSeqsPerStep ?? 16,
    maxContext: profile.maxContext,
    kvBudget: policy.kvBudget,
  });
  const metrics = new MetricsRecorder(0);
  const cost = new CostModel(profile, { online: o.online ?? true });
  const truth = new CostModel(profile, { online: false });
  const memoryBytes = cost.kvBytes(mem.kvBlocks) + 2 * trainMaxLength * mem.trainBytesPerToken;
  const scheduler = new CoScheduler<null>({
    policy,
    batch,
    cost,
    numLayers: profile.numLayers,
    memoryBytes,
    metrics,
  });
  const noise = o.noise ?? profile.fit.meanAbsPercentError;
  const random = rng(o.seed);
  const gaussian = () => {
    const u = Math.max(random(), 1e-12), v = random();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  };
  const shared = o.sharedPrefixTokens ?? 32;
  const vocabSize = o.vocabSize ?? 512;
  const arrivals = [...o.workload].sort((a, b) => a.atMs - b.atMs || a.id - b.id);
  const byId = new Map(arrivals.map((a) => [a.id, a]));
  const feedback: { atMs: number; arrival: Arrival }[] = [];
  const lastArrival = arrivals.at(-1)?.atMs ?? 0;
  const endLimit = lastArrival + (o.drainMs ?? 120_000);

  const noMass = new Float32Array(mem.kvBlocks * mem.blockSize);
  let t = 0, next = 0, iterations = 0, versions = 0;
  for (;;) {
    while (next < arrivals.length && arrivals[next].atMs <= t) {
      const a = arrivals[next++];
      scheduler.addRequest({
        id: a.id,
        prompt: syntheticPrompt(a, shared, vocabSize),
        maxTokens: a.outputTokens,
        sampling: GREEDY,
        eosIds: [],
      }, a.atMs);
    }
    while (feedback.length > 0 && feedback[0].atMs <= t) {
      const { atMs, arrival } = feedback.shift()!;
      const { promptLength, responseLength } = feedbackShape(arrival, trainMaxLength);
      scheduler.addFeedback([{
        id: arrival.id,
        tokens: 2 * (promptLength + responseLength),
        payload: null,
      }], atMs);
    }
    // The run ends when every request has arrived and ended; fine-tuning left then is staleness.
    if (next === arrivals.length && !batch.hasWork()) break;
    const it = scheduler.schedule(t);
    if (!it) {
      const wake = Math.min(
        arrivals[next]?.atMs ?? Infinity,
        feedback[0]?.atMs ?? Infinity,
        scheduler.nextWakeAt() ?? Infinity,
      );
      if (!Number.isFinite(wake) || wake > endLimit) break;
      t = Math.max(t, wake);
      continue;
    }
    const ms = truth.predictMs(it.shape) * Math.exp(noise * gaussian() - noise * noise / 2);
    const start = t;
    t += ms;
    iterations++;
    const result = it.step
      ? { sampled: it.step.plan.sequences.map((s, i) => (s.sample ? 3 + (i % 7) : -1)), gpuMs: ms }
      : null;
    const effects = scheduler.complete(it, { result, ms }, t);
    // KV pruning as the live loop does it; the simulator has no attention mass, so the heavy
    // hitters tie and the sinks and the recent window decide (the cost is what is modelled).
    for (const req of batch.pruneCandidates()) batch.prune(req, noMass);
    if (effects.publish) versions++;
    for (const req of effects.finished) {
      const a = byId.get(req.id)!;
      if (a.feedback) insertSorted(feedback, { atMs: t, arrival: a });
    }
    if (o.checkInvariants) {
      blockManager.checkIntegrity();
      scheduler.checkInvariants();
    }
    o.onIteration?.({
      startMs: start,
      endMs: t,
      predictedMs: it.predictedMs,
      prefillTokens: it.shape.prefillTokens,
      decodeSeqs: it.shape.decodeSeqs,
      finetune: it.finetune ? it.finetune.slice.kind : null,
      forcedFinetune: it.forcedFinetune,
      deadlineMs: it.deadlineMs,
      mandatoryMs: it.mandatoryMs,
      kvUsedBytes: blockManager.stats().used * cost.kvBytes(1),
      finetuneBytes: cost.finetuneBytes(it.finetune?.shape),
      memoryBytes,
    });
    if (t > endLimit) break;
  }
  return {
    summary: metrics.summary({
      ttftSloMs: policy.ttftSloMs,
      tbtSloMs: policy.tbtSloMs,
      wallMs: Math.max(t, o.durationMs ?? 0),
    }),
    prediction: cost.error,
    iterations,
    optimizerSteps: scheduler.optimizerSteps,
    adapterVersions: versions,
    maxFinetuneWaitMs: scheduler.maxFinetuneWaitMs,
    endMs: Math.max(t, o.durationMs ?? 0),
  };
}

/**
 * A request's prompt as token ids (the simulator's, and the live load test's, so both see the
 * same prefix sharing): BOS (1), then the shared prefix, then ids drawn for the request; every id
 * but BOS lies in [3, vocabSize), clear of the usual unk/BOS/EOS ids 0..2.
 */
export function syntheticPrompt(a: Arrival, shared: number, vocabSize: number): number[] {
  const length = Math.max(1, a.promptTokens);
  const random = rng(a.id * 7919 + 17);
  const span = vocabSize - 3;
  return Array.from(
    { length },
    (_, i) => i === 0 ? 1 : i <= shared ? 3 + ((i - 1) % span) : 3 + Math.floor(random() * span),
  );
}

/**
 * The preference pair a feedback request returns, as the fine-tuner takes it: the first
 * `promptLength` prompt tokens and two responses of `responseLength` tokens, clamped so prompt +
 * response fits the trainer's max length.
 */
export function feedbackShape(
  a: Arrival,
  trainMaxLength: number,
): { promptLength: number; responseLength: number } {
  const promptLength = Math.min(a.promptTokens, trainMaxLength - 1);
  return {
    promptLength,
    responseLength: Math.max(1, Math.min(a.outputTokens, trainMaxLength - promptLength)),
  };
}

function insertSorted<E extends { atMs: number }>(list: E[], e: E): void {
  let i = list.length;
  while (i > 0 && list[i - 1].atMs > e.atMs) i--;
  list.splice(i, 0, e);
}
