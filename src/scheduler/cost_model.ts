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
import { InvalidRequestError } from "../engine/errors.ts";
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
  /** Backward: layers this slice covers, as a share of the model's depth (0..1]. */
  depthShare: number;
  /** Backward: true when the slice includes the LM head (the first backward slice of a pair). */
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
    ft?.kind === "reference" ? ft.tokens : 0,
    ft?.kind === "forward" ? ft.tokens : 0,
    ft?.kind === "backward" ? ft.tokens * ft.depthShare : 0,
    ft?.kind === "backward" && ft.head ? ft.tokens : 0,
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

export class ProfileFormatError extends InvalidRequestError {
  override readonly code = "profile_format";
}

/** Checks a parsed profile; throws ProfileFormatError naming the first bad field. */
export function validateProfile(value: unknown, file = "<profile>"): CostProfile {
  const bad = (what: string) =>
    new ProfileFormatError(`${file}: ${what}; re-run \`deno task mace profile\` to write a valid profile`);
  if (typeof value !== "object" || value === null) throw bad("not a JSON object");
  const p = value as Partial<CostProfile>;
  if (p.schema !== "mace.profile.v1") throw bad(`schema is ${JSON.stringify(p.schema)}, expected "mace.profile.v1"`);
  for (const key of ["device", "model", "measuredAt"] as const) {
    if (typeof p[key] !== "string") throw bad(`"${key}" must be a string`);
  }
  for (const key of ["numLayers", "maxContext"] as const) {
    if (!Number.isInteger(p[key]) || (p[key] as number) < 1) throw bad(`"${key}" must be a positive integer`);
  }
  if (typeof p.coefficients !== "object" || p.coefficients === null) throw bad(`"coefficients" missing`);
  for (const f of FEATURES) {
    const c = p.coefficients[f];
    if (typeof c !== "number" || !Number.isFinite(c)) throw bad(`coefficient "${f}" must be a finite number`);
  }
  const m = p.memory;
  if (typeof m !== "object" || m === null) throw bad(`"memory" missing`);
  for (const key of ["kvBytesPerToken", "blockSize", "kvBlocks", "trainBytesPerToken", "trainStateBytes"] as const) {
    if (typeof m[key] !== "number" || !(m[key] >= 0)) throw bad(`memory.${key} must be a number >= 0`);
  }
  if (typeof p.fit !== "object" || p.fit === null) throw bad(`"fit" missing`);
  return p as CostProfile;
}

export interface CostSample {
  shape: StepShape;
  ms: number;
}

/**
 * Least-squares coefficients for samples, with a small ridge toward zero so features the samples
 * never exercise stay at 0 instead of blowing up. Negative coefficients are clamped to 0: every
 * feature is work, and a negative cost would let the packer add work to make a step shorter.
 */
export function fitCoefficients(samples: readonly CostSample[], ridge = 1e-6): Record<Feature, number> {
  const n = FEATURES.length;
  const active = new Array<boolean>(n).fill(true);
  let beta = new Array<number>(n).fill(0);
  // Active-set refit: drop features whose coefficient comes out negative, refit the rest.
  for (let round = 0; round < n; round++) {
    const ata = Array.from({ length: n }, () => new Array<number>(n).fill(0));
    const atb = new Array<number>(n).fill(0);
    for (const { shape, ms } of samples) {
      const x = features(shape).map((v, i) => (active[i] ? v : 0));
      for (let i = 0; i < n; i++) {
        atb[i] += x[i] * ms;
        for (let j = 0; j < n; j++) ata[i][j] += x[i] * x[j];
      }
    }
    for (let i = 0; i < n; i++) ata[i][i] += ridge * (1 + ata[i][i]);
    beta = solve(ata, atb);
    const negative = beta.findIndex((b, i) => active[i] && b < 0);
    if (negative < 0) break;
    active[negative] = false;
  }
  return Object.fromEntries(FEATURES.map((f, i) => [f, active[i] ? Math.max(0, beta[i]) : 0])) as Record<
    Feature,
    number
  >;
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
  /** RLS forgetting factor: weight of the past per observation (default 0.995, ~200-step memory). */
  forgetting?: number;
  /**
   * Confidence in the profile, as a count of pseudo-observations per feature unit (default 20):
   * the larger, the more measured steps it takes to move a coefficient.
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

export class CostModel {
  readonly memory: ProfileMemory;
  readonly numLayers: number;
  private theta: number[];
  /** RLS inverse covariance P (n×n). */
  private readonly p: number[][];
  private readonly online: boolean;
  private readonly lambda: number;
  /** Largest variance a coefficient may reach: forgetting must not inflate unexcited ones. */
  private readonly pMax: number;
  private absErr = 0;
  private absPct = 0;
  private sumPred = 0;
  private sumMeasured = 0;
  private observed = 0;

  constructor(readonly profile: CostProfile, options: CostModelOptions = {}) {
    this.memory = profile.memory;
    this.numLayers = profile.numLayers;
    this.theta = FEATURES.map((f) => profile.coefficients[f]);
    this.online = options.online ?? true;
    this.lambda = options.forgetting ?? 0.995;
    const prior = options.priorWeight ?? 20;
    this.pMax = 1 / prior;
    this.p = FEATURES.map((_, i) => FEATURES.map((_, j) => (i === j ? this.pMax : 0)));
  }

  get coefficients(): Record<Feature, number> {
    return Object.fromEntries(FEATURES.map((f, i) => [f, this.theta[i]])) as Record<Feature, number>;
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
    const x = features(shape);
    const n = x.length;
    const px = this.p.map((row) => row.reduce((s, v, j) => s + v * x[j], 0));
    const denom = this.lambda + x.reduce((s, v, i) => s + v * px[i], 0);
    const gain = px.map((v) => v / denom);
    const residual = measuredMs - x.reduce((s, v, i) => s + v * this.theta[i], 0);
    this.theta = this.theta.map((t, i) => Math.max(0, t + gain[i] * residual));
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n; j++) this.p[i][j] = (this.p[i][j] - gain[i] * px[j]) / this.lambda;
    }
    // Forgetting divides P by λ every step, so features absent from recent steps (no fine-tuning
    // for a while) would gain huge variances and jump on their next sample ("windup"): cap them,
    // scaling row and column together so P stays symmetric positive semi-definite.
    for (let i = 0; i < n; i++) {
      if (this.p[i][i] <= this.pMax) continue;
      const s = Math.sqrt(this.pMax / this.p[i][i]);
      for (let j = 0; j < n; j++) {
        this.p[i][j] *= s;
        this.p[j][i] *= s;
      }
    }
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
export function finetuneShape(slice: TrainingSlice, pairTokens: number, numLayers: number): FinetuneShape {
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
      return { kind: slice.kind, tokens: pairTokens, depthShare: 1, head: false };
  }
}
