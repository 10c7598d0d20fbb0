/**
 * Measures the engine's cost profile (src/scheduler/cost_model.ts) on this device and model: runs
 * a designed set of iterations through launchIteration, the function the live loop runs, and fits
 * the cost model's coefficients to the measured wall times.
 *
 * The design, one round:
 *  - serving steps alone: prefill chunks of several sizes at position 0 and mid-context (chunked
 *    prefill), decode batches of several sizes at several context lengths, and mixed steps
 *    (one prefill chunk plus decodes);
 *  - DPO steps of one fresh random pair (so its reference slices run) for each pair length and
 *    each slicing (layers per slice): once with every slice alone (plan null), once with every
 *    slice next to one of the small serving steps (the same one for a given slice every round),
 *    so each slice kind is measured with and without serving.
 * Rounds run in a seeded shuffled order of these units (a drift of the device's speed then
 * spreads over all features instead of biasing one). Round 0 is a warm-up and is not recorded:
 * drivers compile pipelines on first use, which costs seconds on a software GPU. The fit is made
 * to the median of each configuration's rounds; its error is reported on every sample.
 *
 * Serving steps run real StepPlans over the runner's paged KV pool with random token ids; each
 * sequence owns a disjoint run of blocks (wrapping around only when the pool is smaller than the
 * step's contexts, which changes no timing). Their K/V contents are whatever earlier steps left:
 * the profile measures time, not text.
 *
 * The trainer is trained on random pairs while profiling: pass a fresh one, not the live one.
 */
import type { ModelRunner } from "../engine/runner/model_runner.ts";
import { GREEDY, type SequenceWork, type StepPlan } from "../engine/step.ts";
import type { DpoTrainer, TrainingPair } from "../engine/training/dpo_trainer.ts";
import { planDpoSlices, type TrainingSlice } from "../engine/training/slice_plan.ts";
import { rng, shuffled } from "../engine/training/seeded_random.ts";
import { InvalidRequestError } from "../engine/errors.ts";
import {
  type CostProfile,
  type CostSample,
  FEATURES,
  features,
  finetuneShape,
  fitCoefficients,
  shapeOfPlan,
} from "../scheduler/cost_model.ts";
import { launchIteration } from "./gpu_executor.ts";
import { SpanTimer } from "../engine/gpu/span_timer.ts";

export interface ProfileOptions {
  /** The model's name as the profile records it (e.g. "stories260K"). */
  model: string;
  /** Recorded rounds of the whole design (default 3); one unrecorded warm-up round runs first. */
  repeats?: number;
  /** Seeds token ids, pairs and the order of the design (default 0). */
  seed?: number;
  /**
   * Tokens per sequence (prompt + response) of the training pairs; default 16, L/4, L/2 of max
   * length L.
   */
  pairLengths?: number[];
  /**
   * Layers per slice to measure (trainer.planStep); default 1 and all: every depth, with and
   * without the head.
   */
  layersPerSlice?: number[];
  /**
   * Serve the steps on a LoRA adapter when the runner has an adapter pool (default true), as the
   * live loop does.
   */
  serveAdapter?: boolean;
  /** Called after every recorded iteration, with how many of `total` are done. */
  onSample?: (sample: ProfileSample, done: number, total: number) => void;
}

/** One recorded iteration: its cost-model shape, measured wall ms and what it ran. */
export interface ProfileSample extends CostSample {
  label: string;
}

/** A serving step of the design: each sequence's new tokens and the KV entries before them. */
interface ServingDesign {
  label: string;
  /** `sample`: false for a chunk in the middle of a prompt (nothing to sample yet). */
  seqs: { tokens: number; context: number; sample: boolean }[];
}

/** One unit of a round: a serving step alone, or a whole DPO step (alone or next to serving). */
type Unit =
  | { kind: "serve"; design: ServingDesign }
  | { kind: "train"; length: number; layersPerSlice: number; withServing: boolean };

const ADAPTER_ID = "mace-profile@0";

export async function profileEngine(
  runner: ModelRunner,
  trainer: DpoTrainer,
  options: ProfileOptions,
): Promise<CostProfile> {
  const repeats = options.repeats ?? 3;
  if (!Number.isInteger(repeats) || repeats < 1) {
    throw new InvalidRequestError(`profile repeats must be an integer >= 1, got ${repeats}`);
  }
  const config = runner.config;
  const { blockSize, maxBlocksPerSeq, maxTokens, maxSeqs } = runner.capacity;
  const maxContext = Math.min(maxBlocksPerSeq * blockSize, config.maxPositionEmbeddings);
  const maxLength = trainer.options.maxLength;
  const lengths = unique(
    (options.pairLengths ?? [16, maxLength / 4, maxLength / 2]).map((n) =>
      Math.min(maxLength, Math.max(2, n))
    ),
  );
  const depths = unique(
    (options.layersPerSlice ?? [1, config.numLayers]).map((n) =>
      Math.min(config.numLayers, Math.max(1, n))
    ),
  );
  const serving = servingDesigns(maxTokens, maxSeqs, maxContext);
  // Slices share iterations with the small steps a TBT budget leaves room for, as MACE packs them.
  const light = serving.filter((d) =>
    d.seqs.reduce((n, s) => n + s.tokens, 0) <= Math.max(1, maxTokens / 4)
  );
  const units: Unit[] = [
    ...serving.map((design) => ({ kind: "serve" as const, design })),
    ...lengths.flatMap((length) =>
      depths.flatMap((layersPerSlice) =>
        [false, true].map((withServing) => ({
          kind: "train" as const,
          length,
          layersPerSlice,
          withServing,
        }))
      )
    ),
  ];
  const slicesPerStep = (d: number) => planDpoSlices([false], config.numLayers, d).length;
  const perRound = units.reduce(
    (n, u) => n + (u.kind === "serve" ? 1 : slicesPerStep(u.layersPerSlice)),
    0,
  );
  const total = perRound * repeats;

  const random = rng(options.seed ?? 0);
  const timer = SpanTimer.create(runner.ctx);
  const token = () => Math.floor(random() * config.vocabSize);
  const adapterId = options.serveAdapter !== false && runner.adapterPool ? ADAPTER_ID : undefined;
  if (adapterId) runner.loadAdapter(adapterId, await trainer.params.read());
  /** Recorded samples by configuration (label): every round runs each configuration once. */
  const byConfig = new Map<string, ProfileSample[]>();
  let recorded = 0;
  try {
    for (let round = 0; round <= repeats; round++) {
      const record = (sample: ProfileSample) => {
        if (round === 0) return;
        byConfig.set(sample.label, [...(byConfig.get(sample.label) ?? []), sample]);
        options.onSample?.(sample, ++recorded, total);
      };
      // The warm-up round compiles every pipeline: the slices next to serving use no other kernels.
      const roundUnits = round === 0
        ? units.filter((u) => u.kind === "serve" || !u.withServing)
        : units;
      for (const unit of shuffled(roundUnits, random)) {
        if (unit.kind === "serve") {
          const plan = buildPlan(unit.design, runner, token, adapterId);
          const ms = await timeIteration(runner, trainer, { plan, slice: null }, timer);
          record({ label: unit.design.label, shape: shapeOfPlan(plan), ms });
          continue;
        }
        const pair = randomPair(unit.length, token);
        const pairTokens = 2 * pair.prompt.length + pair.chosen.length + pair.rejected.length;
        const slices = trainer.planStep([pair], unit.layersPerSlice);
        for (const [j, slice] of slices.entries()) {
          // The same serving design next to the same slice in every round: a configuration repeats.
          const design = unit.withServing
            ? light[(units.indexOf(unit) * 7 + j) % light.length]
            : null;
          const plan = design ? buildPlan(design, runner, token, adapterId) : null;
          const ms = await timeIteration(runner, trainer, { plan, slice }, timer);
          const ft = finetuneShape(slice, pairTokens, config.numLayers);
          const label = `${sliceLabel(slice, unit.length)}${design ? ` + ${design.label}` : ""}`;
          record({ label, shape: shapeOfPlan(plan, ft), ms });
        }
      }
    }
  } finally {
    timer?.destroy();
    if (adapterId) runner.unloadAdapter(adapterId);
  }

  // Fit the median of each configuration's repeats: another process taking the CPU (a software
  // GPU shares it) or a collection pause slows single iterations by up to several times, and one
  // such outlier must not tilt every coefficient. The error is reported on every sample.
  const samples = [...byConfig.values()].flat();
  const medians = [...byConfig.values()].map((group) => ({
    shape: group[0].shape,
    ms: median(group.map((s) => s.ms)),
  }));
  const coefficients = fitCoefficients(medians);
  return {
    schema: "mace.profile.v1",
    device: `${runner.ctx.adapterDescription} via ${runner.ctx.backend}`,
    model: options.model,
    numLayers: config.numLayers,
    maxContext,
    coefficients,
    memory: {
      kvBytesPerToken: runner.memory.kvBytesPerToken,
      blockSize,
      kvBlocks: runner.kvBlocks,
      trainBytesPerToken: trainer.memory.activationBytes / (2 * maxLength),
      trainStateBytes: trainer.memory.adapterBytes,
    },
    fit: fitError(coefficients, samples),
    measuredAt: new Date().toISOString(),
  };
}

/**
 * Mean absolute error (ms) and mean absolute relative error (a fraction) of the
 * coefficients on samples.
 */
export function fitError(
  coefficients: Record<(typeof FEATURES)[number], number>,
  samples: readonly CostSample[],
): CostProfile["fit"] {
  let abs = 0, rel = 0;
  for (const { shape, ms } of samples) {
    const err = Math.abs(predictWith(coefficients, shape) - ms);
    abs += err;
    rel += err / ms;
  }
  const n = samples.length;
  return { samples: n, meanAbsErrorMs: n ? abs / n : 0, meanAbsPercentError: n ? rel / n : 0 };
}

/**
 * The profile's prediction for a shape: the feature vector times the coefficients
 * (never below 0).
 */
function predictWith(
  coefficients: Record<(typeof FEATURES)[number], number>,
  shape: CostSample["shape"],
): number {
  const x = features(shape);
  return Math.max(0, FEATURES.reduce((s, f, i) => s + x[i] * coefficients[f], 0));
}

/**
 * The serving steps of the design for an engine of `maxTokens` tokens and `maxSeqs` sequences per
 * step and contexts up to `maxContext`: chunks from 1 token to the whole budget, decode batches of
 * 1, a quarter and all sequences at a short, a middle and the longest context, and mixed steps.
 */
function servingDesigns(maxTokens: number, maxSeqs: number, maxContext: number): ServingDesign[] {
  const chunk = (n: number) => Math.max(1, Math.min(n, maxTokens, maxContext));
  const designs: ServingDesign[] = [];
  for (const n of unique([1, 4, 16, 64, maxTokens / 4, maxTokens / 2, maxTokens].map(chunk))) {
    // A 1-token chunk that samples would be a decode; this one is the first token of a
    // longer prompt.
    designs.push({ label: `prefill ${n}`, seqs: [{ tokens: n, context: 0, sample: n > 1 }] });
  }
  // Later chunks of a long prompt: the same tokens attend to many more keys.
  for (const n of unique([16, maxTokens / 4].map(chunk))) {
    const context = Math.max(0, Math.min(maxContext - n, Math.floor(maxContext / 2)));
    designs.push({
      label: `prefill ${n}@${context}`,
      seqs: [{ tokens: n, context, sample: true }],
    });
  }
  const batches = unique(
    [1, maxSeqs / 4, maxSeqs].map((b) => Math.max(1, Math.min(Math.floor(b), maxTokens))),
  );
  for (const b of batches) {
    for (
      const context of unique(
        [16, maxContext / 2, maxContext - 1].map((c) => Math.min(Math.floor(c), maxContext - 1)),
      )
    ) {
      designs.push({
        label: `decode ${b}@${context}`,
        seqs: Array.from({ length: b }, () => ({ tokens: 1, context, sample: true })),
      });
    }
  }
  // Mixed steps: a prefill chunk of a new request next to running decodes.
  for (
    const [n, b, context] of [[maxTokens / 4, maxSeqs / 2, maxContext / 4], [
      maxTokens / 2,
      maxSeqs - 1,
      maxContext / 2,
    ]]
  ) {
    const decodes = Math.max(1, Math.min(Math.floor(b), maxSeqs - 1, maxTokens - 2));
    const tokens = Math.max(2, Math.min(Math.floor(n), maxTokens - decodes, maxContext));
    if (decodes + 1 > maxSeqs || tokens + decodes > maxTokens) continue;
    const c = Math.max(1, Math.min(Math.floor(context), maxContext - 1));
    designs.push({
      label: `prefill ${tokens} + decode ${decodes}@${c}`,
      seqs: [
        { tokens, context: 0, sample: true },
        ...Array.from({ length: decodes }, () => ({ tokens: 1, context: c, sample: true })),
      ],
    });
  }
  return designs;
}

/** A real StepPlan for a design: random tokens, each sequence on its own run of KV blocks. */
function buildPlan(
  design: ServingDesign,
  runner: ModelRunner,
  token: () => number,
  adapterId?: string,
): StepPlan {
  const { blockSize } = runner.capacity;
  let nextBlock = 0;
  const sequences: SequenceWork[] = design.seqs.map(({ tokens, context, sample }, seqId) => {
    const blocks = Math.ceil((context + tokens) / blockSize);
    const blockTable = Array.from({ length: blocks }, (_, j) => (nextBlock + j) % runner.kvBlocks);
    nextBlock += blocks;
    return {
      seqId,
      tokens: Array.from({ length: tokens }, token),
      startPosition: context,
      blockTable,
      sample,
      sampling: GREEDY,
      adapterId,
    };
  });
  return { sequences };
}

/**
 * A pair whose two sequences have `length` tokens each: a prompt of half, responses of
 * the rest.
 */
function randomPair(length: number, token: () => number): TrainingPair {
  const prompt = Math.max(1, Math.floor(length / 2));
  const response = Math.max(1, length - prompt);
  const tokens = (n: number) => Array.from({ length: n }, token);
  return { prompt: tokens(prompt), chosen: tokens(response), rejected: tokens(response) };
}

function sliceLabel(slice: TrainingSlice, length: number): string {
  if (slice.kind === "optimizer") return "optimizer";
  const layers = "fromLayer" in slice ? ` layers ${slice.fromLayer}..${slice.toLayer}` : "";
  return `${slice.kind} ${2 * length}${layers}`;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function unique(values: number[]): number[] {
  return [...new Set(values.map((v) => Math.floor(v)))].sort((a, b) => a - b);
}

/**
 * One iteration's time, as the live loop measures it: its GPU time where the adapter has
 * timestamp queries, else the wall time from its submit until its results are read (the
 * loop's pipelined attribution is then lower by the readback latency it hides, which the
 * online cost model learns; docs/ARCHITECTURE.md, "Time attribution").
 */
async function timeIteration(
  ...args: Parameters<typeof launchIteration>
): Promise<number> {
  const start = performance.now();
  const { gpuMs } = await launchIteration(...args);
  return gpuMs ?? performance.now() - start;
}
