/**
 * Float64 CPU references of the training kernels: the backward passes of RMSNorm and SwiGLU, the
 * rotary embedding of contiguous rows (and its inverse, the rotation's backward), and token
 * log-probabilities with their backward. Row-major, token-major activations, as in the kernels.
 */
import { rope } from "./attention.ts";

/**
 * Gradient of y = rmsNorm(x) * w with respect to x (w frozen), for x, dy [rows, dim], w [dim]:
 *   dx[t, i] = r w_i dy_i - x_i r^3 (sum_j w_j dy_j x_j) / dim,   r = 1 / sqrt(mean_j x_j^2 + eps).
 * With `dxInit` [rows, dim] the gradient is added to it (the residual stream's gradient).
 */
export function rmsNormBackward(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  dy: ArrayLike<number>,
  rows: number,
  eps: number,
  dxInit?: ArrayLike<number>,
): Float64Array {
  const dim = w.length;
  const dx = new Float64Array(rows * dim);
  for (let t = 0; t < rows; t++) {
    const base = t * dim;
    let squares = 0;
    let dot = 0;
    for (let j = 0; j < dim; j++) {
      squares += x[base + j] ** 2;
      dot += w[j] * dy[base + j] * x[base + j];
    }
    const r = 1 / Math.sqrt(squares / dim + eps);
    const c = (r ** 3 * dot) / dim;
    for (let i = 0; i < dim; i++) {
      const g = r * w[i] * dy[base + i] - x[base + i] * c;
      dx[base + i] = (dxInit ? dxInit[base + i] : 0) + g;
    }
  }
  return dx;
}

/**
 * Gradient of act = silu(gate) * up (gateUp [rows, 2I]: gate in columns [0, I), up in [I, 2I))
 * given dAct [rows, I]: dGateUp [rows, 2I] with
 *   dgate = dAct up s (1 + g (1 - s)),  dup = dAct g s,   s = sigmoid(g).
 */
export function swigluBackward(
  gateUp: ArrayLike<number>,
  dAct: ArrayLike<number>,
  rows: number,
  intermediate: number,
): Float64Array {
  const I = intermediate;
  const dGateUp = new Float64Array(rows * 2 * I);
  for (let r = 0; r < rows; r++) {
    for (let i = 0; i < I; i++) {
      const g = gateUp[r * 2 * I + i];
      const u = gateUp[r * 2 * I + I + i];
      const d = dAct[r * I + i];
      const s = 1 / (1 + Math.exp(-g));
      dGateUp[r * 2 * I + i] = d * u * s * (1 + g * (1 - s));
      dGateUp[r * 2 * I + I + i] = d * g * s;
    }
  }
  return dGateUp;
}

export interface RopeRowsLayout {
  heads: number;
  headDim: number;
  /** Floats per row of x. */
  stride: number;
  /** First column of the rotated heads. */
  offset: number;
  /** Rotate by -angle: the backward of the rotation. */
  inverse: boolean;
}

/**
 * x [rows, stride] with heads [offset, offset + heads headDim) of each row rotated (rotate_half,
 * attention.ts rope) at position startPosition + t; other columns copied.
 */
export function ropeRows(
  x: ArrayLike<number>,
  rows: number,
  startPosition: number,
  invFreq: ArrayLike<number>,
  { heads, headDim, stride, offset, inverse }: RopeRowsLayout,
): Float64Array {
  const out = Float64Array.from(x);
  for (let t = 0; t < rows; t++) {
    // Rotating by -angle is rotating at position -p: angle = p * invFreq[i] is odd in p.
    const position = (inverse ? -1 : 1) * (startPosition + t);
    for (let h = 0; h < heads; h++) {
      const start = t * stride + offset + h * headDim;
      out.set(rope(out.subarray(start, start + headDim), position, invFreq), start);
    }
  }
  return out;
}

/**
 * Per row t < rows of logits [rows, vocab]: lse[t] = log sum_v exp(logits[t, v]) and
 * logp[t] = logits[t, targets[rowOffset + t]] - lse[t] (both [rows], indexed by t).
 */
export function tokenLogprobs(
  logits: ArrayLike<number>,
  targets: ArrayLike<number>,
  rows: number,
  vocab: number,
  rowOffset: number,
): { lse: Float64Array; logp: Float64Array } {
  const lse = new Float64Array(rows);
  const logp = new Float64Array(rows);
  for (let t = 0; t < rows; t++) {
    const base = t * vocab;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, logits[base + v]);
    let sum = 0;
    for (let v = 0; v < vocab; v++) sum += Math.exp(logits[base + v] - max);
    lse[t] = max + Math.log(sum);
    logp[t] = logits[base + targets[rowOffset + t]] - lse[t];
  }
  return { lse, logp };
}

/**
 * d(g sum_t logp[t]) / d logits [rows, vocab], row t:
 *   g (onehot(targets[rowOffset + t]) - softmax(logits[t, :])).
 */
export function tokenLogprobsBackward(
  logits: ArrayLike<number>,
  targets: ArrayLike<number>,
  rows: number,
  vocab: number,
  rowOffset: number,
  g: number,
): Float64Array {
  const { lse } = tokenLogprobs(logits, targets, rows, vocab, rowOffset);
  const grad = new Float64Array(rows * vocab);
  for (let t = 0; t < rows; t++) {
    const target = targets[rowOffset + t];
    for (let v = 0; v < vocab; v++) {
      const p = Math.exp(logits[t * vocab + v] - lse[t]);
      grad[t * vocab + v] = g * ((v === target ? 1 : 0) - p);
    }
  }
  return grad;
}
