/**
 * Scheduling policies, all run by the same CoScheduler (co_scheduler.ts):
 *
 * - mace: SLO-aware iteration-level co-scheduling: priorities P(t) (base by kind, aging, SLO
 *   urgency, γ·L_DPO for fine-tuning), best-fit packing of prefill chunks and fine-tuning slices
 *   into each iteration under its memory (τ_mem) and time (TBT budget) capacities, δ_ft against
 *   starvation of fine-tuning.
 * - inference-only: first-come-first-served continuous batching; feedback is never trained.
 * - periodic (Ekya-style): feedback is buffered; every periodMs the buffer becomes one retraining
 *   job that runs one slice per iteration alongside first-come-first-served serving until done.
 * - synchronous: as periodic, but serving stops while the job runs.
 * - fcfs: co-located, first come first served: serving batches as inference-only and every
 *   iteration also runs the next fine-tuning slice whenever feedback is queued; no priorities,
 *   no packing.
 *
 * Ablations of mace: no prefix sharing, no KV pruning, no DPO-loss priority (γ = 0).
 */
import { InvalidRequestError } from "../../engine/errors.ts";

export const POLICY_NAMES = ["mace", "inference-only", "periodic", "synchronous", "fcfs"] as const;
export type PolicyName = typeof POLICY_NAMES[number];

export interface PolicyOptions {
  name: PolicyName;
  ttftSloMs: number;
  tbtSloMs: number;
  /** Memory threshold τ_mem: share of (KV pool + training activations) an iteration may fill. */
  tauMem: number;
  /**
   * λ1, λ2 of the best-fit objective f = λ1·|memory residual| + λ2·|latency residual| (normalized).
   */
  lambdaMem: number;
  lambdaTime: number;
  /**
   * γ: weight of a fine-tuning task's latest DPO loss in its priority (0: the no-loss ablation).
   */
  gamma: number;
  /** δ_ft: longest fine-tuning may wait for a slice while it has work, ms. */
  deltaFtMs: number;
  /** Priority gained per second waited. */
  agingPerS: number;
  /** Base priority by kind: prefill > fine-tune (decodes are not ranked: they always go first). */
  basePriority: { prefill: number; finetune: number };
  /** Weight of SLO urgency (1 - slack/SLO, clamped to [0, 2]) in a prefill's priority. */
  urgencyWeight: number;
  /** Best-fit looks at this many fitting candidates, in priority order. */
  window: number;
  /** Share of the TBT slack an iteration may fill (headroom for prediction error). */
  latencyMargin: number;
  /** Smallest prefill chunk worth scheduling unless it finishes the prompt. */
  minChunkTokens: number;
  /** Pairs per optimizer step. */
  pairsPerStep: number;
  /** Backward layers per slice (finer slices fit smaller gaps). */
  layersPerSlice: number;
  /**
   * A pair is trained again while its loss is above this and it was trained fewer than maxTrainings
   * times.
   */
  retrainAboveLoss: number;
  maxTrainings: number;
  /** Publish a new adapter version every this many optimizer steps. */
  publishEvery: number;
  /** periodic / synchronous: retraining period, ms. */
  periodMs: number;
  /** KV entries a request keeps before pruning (0 = no pruning). */
  kvBudget: number;
  prefixSharing: boolean;
}

const BASE: Omit<PolicyOptions, "name"> = {
  ttftSloMs: 2000,
  tbtSloMs: 250,
  tauMem: 0.9,
  lambdaMem: 1,
  lambdaTime: 1,
  gamma: 1,
  deltaFtMs: 500,
  agingPerS: 0.05,
  basePriority: { prefill: 2, finetune: 0 },
  urgencyWeight: 1,
  window: 2,
  latencyMargin: 0.9,
  minChunkTokens: 16,
  pairsPerStep: 4,
  layersPerSlice: 1,
  retrainAboveLoss: 0.5,
  maxTrainings: 1,
  publishEvery: 1,
  periodMs: 30_000,
  kvBudget: 0,
  prefixSharing: true,
};

/**
 * The defaults of a policy, with overrides. Throws InvalidRequestError on an unknown name or bad
 * value.
 */
export function policyOptions(
  name: string,
  overrides: Partial<Omit<PolicyOptions, "name">> = {},
): PolicyOptions {
  if (!(POLICY_NAMES as readonly string[]).includes(name)) {
    throw new InvalidRequestError(
      `unknown policy "${name}"; use one of ${POLICY_NAMES.join(", ")}`,
    );
  }
  const defined = Object.fromEntries(Object.entries(overrides).filter(([, v]) => v !== undefined));
  const o: PolicyOptions = { ...BASE, name: name as PolicyName, ...defined };
  const positive = (key: keyof PolicyOptions) => {
    const v = o[key] as number;
    if (!(Number.isFinite(v) && v > 0)) {
      throw new InvalidRequestError(`${key} must be a positive number, got ${v}`);
    }
  };
  for (const key of ["ttftSloMs", "tbtSloMs", "deltaFtMs", "periodMs", "latencyMargin"] as const) {
    positive(key);
  }
  if (!(o.tauMem > 0 && o.tauMem <= 1)) {
    throw new InvalidRequestError(`tauMem must be in (0, 1], got ${o.tauMem}`);
  }
  if (!(o.gamma >= 0)) throw new InvalidRequestError(`gamma must be >= 0, got ${o.gamma}`);
  for (
    const key of [
      "pairsPerStep",
      "layersPerSlice",
      "maxTrainings",
      "publishEvery",
      "window",
    ] as const
  ) {
    if (!(Number.isInteger(o[key]) && o[key] >= 1)) {
      throw new InvalidRequestError(`${key} must be an integer >= 1, got ${o[key]}`);
    }
  }
  if (!(Number.isInteger(o.kvBudget) && o.kvBudget >= 0)) {
    throw new InvalidRequestError(
      `kvBudget must be an integer >= 0 (0 = no pruning), got ${o.kvBudget}`,
    );
  }
  return o;
}

/** Named variants for reports: the five policies and the three ablations of mace. */
export const ABLATIONS: Record<string, { policy: PolicyName; overrides: Partial<PolicyOptions> }> =
  {
    "mace-no-prefix-sharing": { policy: "mace", overrides: { prefixSharing: false } },
    "mace-no-kv-pruning": { policy: "mace", overrides: { kvBudget: 0 } },
    "mace-no-loss-priority": { policy: "mace", overrides: { gamma: 0 } },
  };
