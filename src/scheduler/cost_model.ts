/**
 * Predicted time and memory of one iteration from its contents. Pure TypeScript.
 *
 * Time is linear in a handful of features of the step (FEATURES below): a fixed cost per
 * iteration, prefill tokens, decoded sequences, attention work (query-key pairs), and the
 * fine-tuning slice's tokens by kind. The coefficients come from a profile measured offline on
 * the device and model (`mace profile`), then follow the measured step times online by
 * recursive least squares with forgetting, so the model stays accurate when the workload or
 * the device's state shifts (the MACE paper profiles offline only).
 *
 * Memory: KV blocks come from the block manager exactly; a fine-tuning slice is charged the
 * activation bytes its tokens need (profile.memory.trainBytesPerToken).
 */
import { ProfileFormatError } from "../engine/errors.ts";
import type { StepPlan } from "../engine/step.ts";
import type { TrainingSlice } from "../engine/training/slice_plan.ts";

export type FinetuneSliceKind = "reference" | "forward" | "backward" | "optimizer";

/** What an iteration computes, as the cost model sees it. */
export interface StepShape {
  /** Tokens computed by sequences that do not sample this step or that prefill > 1 token. */
  prefillTokens: number;
  /** Sequences that compute exactly one token (decodes). */
  decodeSeqs: number;
  /** Σ over the step's tokens of the KV entries each attends to (query-key pairs). */
  attentionPairs: number;
  finetune?: FinetuneShape;
}

export interface FinetuneShape {
  kind: FinetuneSliceKind;
  /** Tokens of the pair's two sequences (prompt + chosen + prompt + rejected); 0 for optimizer. */
  tokens: number;
  /** Layers this slice covers, as a share of the model's depth (0..1]; 0 for optimizer. */
  depthShare: number;
  /**
   * True when the slice runs the LM head: the last reference or forward slice of a pair (logits
   * and log-probs) and its first backward slice.
   */
  head: boolean;
}

/** Feature names, in the coefficient order of a profile. */
export const FEATURES = [
  "iteration",
  "prefillTokens",
  "decodeSeqs",
  "attentionKPairs",
  "ftSlice",
  "ftReferenceTokens",
  "ftForwardTokens",
  "ftBackwardTokens",
  "ftHeadTokens",
  "ftOptimizer",
] as const;
export type Feature = typeof FEATURES[number];

/** The feature vector of a step (same order as FEATURES). */
export function features(s: StepShape): number[] {
  const inference = s.prefillTokens + s.decodeSeqs > 0 ? 1 : 0;
  const ft = s.finetune;
  return [
    inference,
    s.prefillTokens,
    s.decodeSeqs,
    s.attentionPairs / 1000,
    ft ? 1 : 0,
    ft?.kind === "reference" ? ft.tokens * ft.depthShare : 0,
    ft?.kind === "forward" ? ft.tokens * ft.depthShare : 0,
    ft?.kind === "backward" ? ft.tokens * ft.depthShare : 0,
    ft?.head ? ft.tokens : 0,
    ft?.kind === "optimizer" ? 1 : 0,
  ];
}

export interface ProfileMemory {
  /** KV bytes per token (all layers, K and V). */
  kvBytesPerToken: number;
  blockSize: number;
  /** KV pool size in blocks. */
  kvBlocks: number;
  /** Fine-tuning activation bytes per token of a pair's sequences. */
  trainBytesPerToken: number;
  /** Adapter + gradients + optimizer moments. */
  trainStateBytes: number;
}

/** A measured cost profile (JSON, schema "mace.profile.v1"). */
export interface CostProfile {
  schema: "mace.profile.v1";
  /** e.g. "lavapipe (llvmpipe) via wgpu". */
  device: string;
  /** e.g. "stories260K". */
  model: string;
  numLayers: number;
  maxContext: number;
  /** ms per unit of each feature, FEATURES order. */
  coefficients: Record<Feature, number>;
  memory: ProfileMemory;
  /** How well the coefficients fit the profiling samples. */
  fit: { samples: number; meanAbsErrorMs: number; meanAbsPercentError: number };
  measuredAt: string;
}

/** Checks a parsed profile; throws ProfileFormatError naming the first bad field. */
export function validateProfile(value: unknown, file = "<profile>"): CostProfile {
  const bad = (what: string) =>
    new ProfileFormatError(
      file,
      `${what}; re-run \`deno task mace profile\` to write a valid profile`,
    );
  if (typeof value !== "object" || value === null) throw bad("not a JSON object");
  const p = value as Partial<CostProfile>;
  if (p.schema !== "mace.profile.v1") {
    throw bad(`schema is ${JSON.stringify(p.schema)}, expected "mace.profile.v1"`);
  }
  for (const key of ["device", "model", "measuredAt"] as const) {
    if (typeof p[key] !== "string") throw bad(`"${key}" must be a string`);
  }
  for (const key of ["numLayers", "maxContext"] as const) {
    if (!Number.isInteger(p[key]) || (p[key] as number) < 1) {
      throw bad(`"${key}" must be a positive integer`);
    }
  }
  if (typeof p.coefficients !== "object" || p.coefficients === null) {
    throw bad(`"coefficients" missing`);
  }
  for (const f of FEATURES) {
    const c = p.coefficients[f];
    // Every feature is work: a negative cost would let the packer add work to shorten a step.
    if (typeof c !== "number" || !Number.isFinite(c) || c < 0) {
      throw bad(`coefficient "${f}" must be a finite number >= 0`);
    }
  }
  const m = p.memory;
  if (typeof m !== "object" || m === null) throw bad(`"memory" missing`);
  for (
    const key of [
      "kvBytesPerToken",
      "blockSize",
      "kvBlocks",
      "trainBytesPerToken",
      "trainStateBytes",
    ] as const
  ) {
    if (typeof m[key] !== "number" || !(m[key] >= 0)) {
      throw bad(`memory.${key} must be a number >= 0`);
    }
  }
  const fit = p.fit;
  if (typeof fit !== "object" || fit === null) throw bad(`"fit" missing`);
  if (!Number.isInteger(fit.samples) || fit.samples < 0) {
    throw bad(`fit.samples must be an integer >= 0`);
  }
  // The simulator sizes its step-time noise from the fit error: it must be a real number.
  for (const key of ["meanAbsErrorMs", "meanAbsPercentError"] as const) {
    if (typeof fit[key] !== "number" || !Number.isFinite(fit[key]) || fit[key] < 0) {
      throw bad(`fit.${key} must be a finite number >= 0`);
    }
  }
  return p as CostProfile;
}

export interface CostSample {
  shape: StepShape;
  ms: number;
}

/**
 * Least-squares coefficients for samples, in relative error: each sample weighs 1/ms², so the
 * fit minimizes Σ ((predicted − ms) / ms)². Measured steps span 20 ms decodes to 1 s prefills;
 * in absolute error the long ones decide the fit and short decodes (what a TBT budget is made
 * of) came out 30% low on lavapipe, while every reader of the fit (the scheduler's budget, the
 * profile's reported percent error, the simulator's relative noise) cares about relative error.
 * A small ridge, relative to each feature's scale, keeps features the samples never exercise
 * at 0 instead of blowing up; non-negative (see solveNonNegative).
 */
export function fitCoefficients(
  samples: readonly CostSample[],
  ridge = 1e-6,
): Record<Feature, number> {
  const n = FEATURES.length;
  const ata = Array.from({ length: n }, () => new Array<number>(n).fill(0));
  const atb = new Array<number>(n).fill(0);
  for (const { shape, ms } of samples) {
    addOuter(ata, atb, features(shape), ms, 1 / Math.max(ms, 1e-3) ** 2);
  }
  for (let i = 0; i < n; i++) ata[i][i] += ridge * (ata[i][i] || 1);
  const beta = solveNonNegative(ata, atb);
  return Object.fromEntries(FEATURES.map((f, i) => [f, beta[i]])) as Record<Feature, number>;
}

/** ata += w·x·xᵀ, atb += w·x·y. */
function addOuter(
  ata: number[][],
  atb: number[],
  x: readonly number[],
  y: number,
  w: number,
): void {
  for (let i = 0; i < x.length; i++) {
    if (x[i] === 0) continue;
    atb[i] += w * x[i] * y;
    for (let j = 0; j < x.length; j++) ata[i][j] += w * x[i] * x[j];
  }
}

/**
 * argmin ‖Aθ - b‖ over θ ≥ 0 given the normal equations (ata, atb), by an active set: features
 * whose coefficient comes out negative are fixed at 0 and the rest refit. Every feature is work,
 * and a negative cost would let the packer add work to make a step shorter.
 */
function solveNonNegative(ata: readonly number[][], atb: readonly number[]): number[] {
  const n = atb.length;
  const active = new Array<boolean>(n).fill(true);
  for (let round = 0; round <= n; round++) {
    const idx = active.flatMap((a, i) => (a ? [i] : []));
    const sub = solve(idx.map((i) => idx.map((j) => ata[i][j])), idx.map((i) => atb[i]));
    const beta = new Array<number>(n).fill(0);
    idx.forEach((i, k) => (beta[i] = sub[k]));
    const negative = idx.filter((i) => beta[i] < 0);
    if (negative.length === 0) return beta;
    // Drop the most negative one and refit.
    active[negative.reduce((a, b) => (beta[a] < beta[b] ? a : b))] = false;
  }
  return new Array<number>(n).fill(0);
}

/** Gaussian elimination with partial pivoting; a (n×n) is consumed. */
function solve(a: number[][], b: number[]): number[] {
  const n = b.length;
  const m = a.map((row, i) => [...row, b[i]]);
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(m[r][c]) > Math.abs(m[p][c])) p = r;
    [m[c], m[p]] = [m[p], m[c]];
    if (Math.abs(m[c][c]) < 1e-300) continue;
    for (let r = c + 1; r < n; r++) {
      const f = m[r][c] / m[c][c];
      for (let k = c; k <= n; k++) m[r][k] -= f * m[c][k];
    }
  }
  const x = new Array<number>(n).fill(0);
  for (let r = n - 1; r >= 0; r--) {
    if (Math.abs(m[r][r]) < 1e-300) continue;
    let s = m[r][n];
    for (let k = r + 1; k < n; k++) s -= m[r][k] * x[k];
    x[r] = s / m[r][r];
  }
  return x;
}

export interface CostModelOptions {
  /** Follow measured step times online (default true). */
  online?: boolean;
  /** Forgetting factor: weight of the past per observation (default 0.995, ~200-step memory). */
  forgetting?: number;
  /**
   * Confidence in the profile, as a number of observations (default 10): the more, the more
   * measured steps it takes to move a coefficient away from the profile.
   */
  priorWeight?: number;
}

/** Prediction error bookkeeping: every observed step is first predicted, then learned from. */
export interface PredictionError {
  steps: number;
  meanAbsErrorMs: number | null;
  /** Mean of |predicted - measured| / measured. */
  meanAbsPercentError: number | null;
  /** Σ predicted / Σ measured - 1 (signed: > 0 over-predicts). */
  totalBias: number | null;
}

/**
 * Online, the coefficients minimize Σ_k λ^(n-k) ((x_k·θ - y_k) / y_k)² + Σ_i w·d_i (θ_i - θ0_i)²
 * over θ ≥ 0: exponentially forgotten least squares in relative error on the measured steps,
 * pulled toward the profile θ0 with the weight w of `priorWeight` typical steps that have the
 * feature (d_i: the mean of (x_i / y)² over those steps, so the pull is in each feature's own
 * units; a feature never seen keeps its profile value). Solved
 * exactly from the 10×10 normal equations after every observation: unlike recursive least
 * squares it cannot lose positive definiteness, whatever the feature scales.
 */
export class CostModel {
  readonly memory: ProfileMemory;
  readonly numLayers: number;
  private theta: number[];
  private readonly prior: number[];
  private readonly ata: number[][];
  private readonly atb: number[];
  /**
   * Per feature, over the steps that had it (forgotten only at those): Σ w·x_i² and their count.
   * Their ratio, a typical step's weight in that feature, scales the pull toward the profile, so
   * the profile keeps the weight of `priorWeight` such steps however long ago the feature last
   * occurred (fine-tuning absent for a while must not let one slice reset its coefficients).
   */
  private readonly presentSq: number[];
  private readonly presentCount: number[];
  private readonly online: boolean;
  private readonly lambda: number;
  private readonly priorWeight: number;
  private absErr = 0;
  private absPct = 0;
  private sumPred = 0;
  private sumMeasured = 0;
  private observed = 0;

  constructor(readonly profile: CostProfile, options: CostModelOptions = {}) {
    this.memory = profile.memory;
    this.numLayers = profile.numLayers;
    this.prior = FEATURES.map((f) => profile.coefficients[f]);
    this.theta = [...this.prior];
    this.online = options.online ?? true;
    this.lambda = options.forgetting ?? 0.995;
    this.priorWeight = options.priorWeight ?? 10;
    this.ata = FEATURES.map(() => new Array<number>(FEATURES.length).fill(0));
    this.atb = new Array<number>(FEATURES.length).fill(0);
    this.presentSq = new Array<number>(FEATURES.length).fill(0);
    this.presentCount = new Array<number>(FEATURES.length).fill(0);
  }

  get coefficients(): Record<Feature, number> {
    return Object.fromEntries(FEATURES.map((f, i) => [f, this.theta[i]])) as Record<
      Feature,
      number
    >;
  }

  /** Predicted wall time of the step, ms. */
  predictMs(shape: StepShape): number {
    const x = features(shape);
    return Math.max(0, x.reduce((s, v, i) => s + v * this.theta[i], 0));
  }

  /** Bytes of fine-tuning activations a slice needs while it runs. */
  finetuneBytes(ft: FinetuneShape | undefined): number {
    return ft ? ft.tokens * this.memory.trainBytesPerToken : 0;
  }

  /** KV bytes of `blocks` blocks. */
  kvBytes(blocks: number): number {
    return blocks * this.memory.blockSize * this.memory.kvBytesPerToken;
  }

  /** Accounts a measured step: records the prediction error, then (online) updates by RLS. */
  observe(shape: StepShape, measuredMs: number): void {
    if (!(measuredMs >= 0) || !Number.isFinite(measuredMs)) return;
    const predicted = this.predictMs(shape);
    this.observed++;
    this.absErr += Math.abs(predicted - measuredMs);
    if (measuredMs > 0) this.absPct += Math.abs(predicted - measuredMs) / measuredMs;
    this.sumPred += predicted;
    this.sumMeasured += measuredMs;
    if (!this.online) return;
    const n = FEATURES.length;
    for (let i = 0; i < n; i++) {
      this.atb[i] *= this.lambda;
      for (let j = 0; j < n; j++) this.ata[i][j] *= this.lambda;
    }
    // Relative error, as in fitCoefficients: short decode steps count as much as long prefills.
    const w = 1 / Math.max(measuredMs, 1e-3) ** 2;
    const x = features(shape);
    addOuter(this.ata, this.atb, x, measuredMs, w);
    for (let i = 0; i < n; i++) {
      if (x[i] === 0) continue;
      this.presentSq[i] = this.presentSq[i] * this.lambda + w * x[i] * x[i];
      this.presentCount[i] = this.presentCount[i] * this.lambda + 1;
    }
    const ata = this.ata.map((row) => [...row]);
    const atb = [...this.atb];
    for (let i = 0; i < n; i++) {
      const d = this.presentCount[i] > 0 ? this.presentSq[i] / this.presentCount[i] : 1e-12;
      ata[i][i] += this.priorWeight * d;
      atb[i] += this.priorWeight * d * this.prior[i];
    }
    this.theta = solveNonNegative(ata, atb);
  }

  get error(): PredictionError {
    const n = this.observed;
    return {
      steps: n,
      meanAbsErrorMs: n ? this.absErr / n : null,
      meanAbsPercentError: n ? this.absPct / n : null,
      totalBias: this.sumMeasured > 0 ? this.sumPred / this.sumMeasured - 1 : null,
    };
  }
}

/** The cost-model shape of a serving step (plan) plus an optional fine-tuning slice. */
export function shapeOfPlan(plan: StepPlan | null, finetune?: FinetuneShape): StepShape {
  let prefillTokens = 0, decodeSeqs = 0, attentionPairs = 0;
  for (const seq of plan?.sequences ?? []) {
    const n = seq.tokens.length;
    if (n === 1 && seq.sample) decodeSeqs++;
    else prefillTokens += n;
    // Token i of the chunk attends to slots 0 .. startSlot + i.
    const first = (seq.startSlot ?? seq.startPosition) + 1;
    attentionPairs += n * first + (n * (n - 1)) / 2;
  }
  return { prefillTokens, decodeSeqs, attentionPairs, finetune };
}

/**
 * The cost-model shape of a DPO slice. `pairTokens`: prompt + chosen + prompt + rejected tokens
 * of the slice's pair (ignored for the optimizer).
 */
export function finetuneShape(
  slice: TrainingSlice,
  pairTokens: number,
  numLayers: number,
): FinetuneShape {
  switch (slice.kind) {
    case "optimizer":
      return { kind: "optimizer", tokens: 0, depthShare: 0, head: false };
    case "backward":
      return {
        kind: "backward",
        tokens: pairTokens,
        depthShare: (slice.fromLayer - slice.toLayer) / numLayers,
        head: slice.fromLayer === numLayers,
      };
    default:
      return {
        kind: slice.kind,
        tokens: pairTokens,
        depthShare: (slice.toLayer - slice.fromLayer) / numLayers,
        head: slice.toLayer === numLayers,
      };
  }
}
