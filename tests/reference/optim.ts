/**
 * Float64 CPU references of the DPO fine-tuning kernels: the DPO loss head
 * (src/shaders/dpo_loss.wgsl), the per-tensor gradient square sum
 * (src/shaders/grad_norm.wgsl) and the AdamW / SGD updates with global-norm
 * clipping (src/shaders/optimizer.wgsl).
 */
import type { AdamWOptions, GradClipOptions } from "../../src/engine/kernels/optimizer.ts";

/** log(1 + e^x) without overflow for large x or loss of precision for very negative x. */
export function softplus(x: number): number {
  return Math.max(x, 0) + Math.log1p(Math.exp(-Math.abs(x)));
}

/** 1 / (1 + e^-x), without overflow in exp for either sign. */
export function sigmoid(x: number): number {
  if (x >= 0) return 1 / (1 + Math.exp(-x));
  const e = Math.exp(x);
  return e / (1 + e);
}

/**
 * The DPO head for one preference pair. logp [chosenCount + rejectedCount]:
 * per-token policy log-probs of the chosen then the rejected response;
 * refSums [2]: the reference model's summed log-probs (chosen, rejected).
 * Returns the 8 outputs of dpo_loss.wgsl:
 *   [loss, gradScale·dL/dπw, gradScale·dL/dπl, πw, πl, chosen reward,
 *    rejected reward, margin].
 */
export function dpoLoss(
  logp: ArrayLike<number>,
  chosenCount: number,
  rejectedCount: number,
  refSums: ArrayLike<number>,
  beta: number,
  gradScale: number,
): Float64Array {
  if (logp.length < chosenCount + rejectedCount) {
    throw new RangeError(
      `dpoLoss: logp has ${logp.length} values, need chosenCount + rejectedCount = ` +
        `${chosenCount + rejectedCount}`,
    );
  }
  let chosen = 0;
  for (let i = 0; i < chosenCount; i++) chosen += logp[i];
  let rejected = 0;
  for (let i = chosenCount; i < chosenCount + rejectedCount; i++) rejected += logp[i];
  const chosenReward = beta * (chosen - refSums[0]);
  const rejectedReward = beta * (rejected - refSums[1]);
  const z = chosenReward - rejectedReward;
  // dL/dz = −σ(−z); z = β(πw − ...) − β(πl − ...).
  const dz = -sigmoid(-z);
  return Float64Array.from([
    softplus(-z),
    gradScale * beta * dz,
    -gradScale * beta * dz,
    chosen,
    rejected,
    chosenReward,
    rejectedReward,
    z,
  ]);
}

/** Σ grad[i]² over the whole array (one entry of grad_norm.wgsl's partials). */
export function gradSquareSum(grad: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < grad.length; i++) sum += grad[i] * grad[i];
  return sum;
}

/**
 * The factor every gradient element is multiplied by after gradScale, with
 * torch.nn.utils.clip_grad_norm_ semantics: the global L2 norm of the scaled
 * gradient is gradScale · sqrt(Σ partials); above maxGradNorm (> 0) the gradient
 * is scaled by maxGradNorm / (norm + 1e-6). maxGradNorm <= 0 turns clipping off.
 */
export function clipFactor(
  partials: ArrayLike<number>,
  gradScale: number,
  maxGradNorm: number,
): number {
  let sum = 0;
  for (let i = 0; i < partials.length; i++) sum += partials[i];
  const norm = gradScale * Math.sqrt(sum);
  return maxGradNorm > 0 && norm > maxGradNorm ? maxGradNorm / (norm + 1e-6) : 1;
}

export interface OptimizerState {
  p: Float64Array;
  m: Float64Array;
  v: Float64Array;
}

/**
 * One torch.optim.AdamW step on a tensor (decoupled weight decay, bias-corrected
 * moments, eps added after the square root). g: the accumulated gradient of p;
 * partials: Σ g² of every tensor in the model, for the global clipping norm.
 * Returns the new p, m, v.
 */
export function adamwStep(
  state: { p: ArrayLike<number>; m: ArrayLike<number>; v: ArrayLike<number> },
  g: ArrayLike<number>,
  partials: ArrayLike<number>,
  o: AdamWOptions,
): OptimizerState {
  const scale = o.gradScale * clipFactor(partials, o.gradScale, o.maxGradNorm);
  const n = g.length;
  const p = new Float64Array(n);
  const m = new Float64Array(n);
  const v = new Float64Array(n);
  const c1 = 1 - o.beta1 ** o.step;
  const c2 = 1 - o.beta2 ** o.step;
  for (let i = 0; i < n; i++) {
    const gs = g[i] * scale;
    m[i] = o.beta1 * state.m[i] + (1 - o.beta1) * gs;
    v[i] = o.beta2 * state.v[i] + (1 - o.beta2) * gs * gs;
    const decayed = state.p[i] * (1 - o.lr * o.weightDecay);
    p[i] = decayed - (o.lr * (m[i] / c1)) / (Math.sqrt(v[i] / c2) + o.eps);
  }
  return { p, m, v };
}

/** One plain SGD step (no momentum, no weight decay): p − lr · clipped scaled g. */
export function sgdStep(
  p: ArrayLike<number>,
  g: ArrayLike<number>,
  partials: ArrayLike<number>,
  o: GradClipOptions & { lr: number },
): Float64Array {
  const scale = o.gradScale * clipFactor(partials, o.gradScale, o.maxGradNorm);
  return Float64Array.from(p, (x, i) => x - o.lr * g[i] * scale);
}
