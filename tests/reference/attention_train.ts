/**
 * Float64 references for training attention: causal self-attention of one whole sequence
 * (positions 0..T-1) read from the fused projection qkv [T, (H + 2 Hkv) hd] (rotated q heads,
 * then rotated k heads, then v heads), its log-sum-exp, and its gradient in the same layout.
 * Query head h reads kv head h / (H / Hkv); scores are q . k / sqrt(hd).
 */
import type { HeadLayout } from "./attention.ts";

/** Floats per qkv row: (H + 2 Hkv) hd. */
export function qkvStride({ numHeads, numKvHeads, headDim }: HeadLayout): number {
  return (numHeads + 2 * numKvHeads) * headDim;
}

/** Causally masked scores s[h][t][j] = q_t,h . k_j,g / sqrt(hd) for j <= t (j > t unused). */
function scores(qkv: ArrayLike<number>, tokens: number, layout: HeadLayout): Float64Array[] {
  const { numHeads, numKvHeads, headDim } = layout;
  const stride = qkvStride(layout);
  const group = numHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  return Array.from({ length: numHeads }, (_, h) => {
    const s = new Float64Array(tokens * tokens);
    const kCol = (numHeads + Math.floor(h / group)) * headDim;
    for (let t = 0; t < tokens; t++) {
      for (let j = 0; j <= t; j++) {
        let dot = 0;
        for (let i = 0; i < headDim; i++) {
          dot += qkv[t * stride + h * headDim + i] * qkv[j * stride + kCol + i];
        }
        s[t * tokens + j] = dot * scale;
      }
    }
    return s;
  });
}

/**
 * Softmax probabilities P[h][t * T + j] (0 for j > t) and lse[h * T + t] = log sum_{j<=t} exp(s).
 */
function probabilities(qkv: ArrayLike<number>, tokens: number, layout: HeadLayout) {
  const lse = new Float64Array(layout.numHeads * tokens);
  const p = scores(qkv, tokens, layout).map((s, h) => {
    for (let t = 0; t < tokens; t++) {
      let max = -Infinity;
      for (let j = 0; j <= t; j++) max = Math.max(max, s[t * tokens + j]);
      let sum = 0;
      for (let j = 0; j <= t; j++) sum += Math.exp(s[t * tokens + j] - max);
      const rowLse = max + Math.log(sum);
      lse[h * tokens + t] = rowLse;
      for (let j = 0; j < tokens; j++) {
        s[t * tokens + j] = j <= t ? Math.exp(s[t * tokens + j] - rowLse) : 0;
      }
    }
    return s;
  });
  return { p, lse };
}

/**
 * Forward: out [T, H hd] = softmax(q k^T / sqrt(hd)) v per head, and lse [H, T] (dense rows of T,
 * unlike the kernel's rows of maxTokens).
 */
export function attentionTrainForward(
  qkv: ArrayLike<number>,
  tokens: number,
  layout: HeadLayout,
): { out: Float64Array; lse: Float64Array } {
  const { out, lse } = forward(qkv, tokens, layout);
  return { out, lse };
}

/** out, lse and the probabilities P they came from. */
function forward(qkv: ArrayLike<number>, tokens: number, layout: HeadLayout) {
  const { numHeads, numKvHeads, headDim } = layout;
  const stride = qkvStride(layout);
  const group = numHeads / numKvHeads;
  const { p, lse } = probabilities(qkv, tokens, layout);
  const out = new Float64Array(tokens * numHeads * headDim);
  for (let h = 0; h < numHeads; h++) {
    const vCol = (numHeads + numKvHeads + Math.floor(h / group)) * headDim;
    for (let t = 0; t < tokens; t++) {
      for (let j = 0; j <= t; j++) {
        const w = p[h][t * tokens + j];
        for (let i = 0; i < headDim; i++) {
          out[(t * numHeads + h) * headDim + i] += w * qkv[j * stride + vCol + i];
        }
      }
    }
  }
  return { out, lse, p };
}

/**
 * Backward: the gradient of sum(out * dOut) with respect to qkv, dQkv [T, (H + 2 Hkv) hd] (dq at
 * the q columns, dk and dv, summed over each kv head's query heads, at the k and v columns).
 * With P = softmax, dP[t, j] = dOut_t . v_j, D_t = dOut_t . out_t and dS = P (dP - D):
 * dq_t = sum_j dS k_j / sqrt(hd), dk_j = sum_t dS q_t / sqrt(hd), dv_j = sum_t P dOut_t.
 */
export function attentionTrainBackward(
  qkv: ArrayLike<number>,
  dOut: ArrayLike<number>,
  tokens: number,
  layout: HeadLayout,
): Float64Array {
  const { numHeads, numKvHeads, headDim } = layout;
  const stride = qkvStride(layout);
  const group = numHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const { out, p } = forward(qkv, tokens, layout);
  const dQkv = new Float64Array(tokens * stride);
  for (let h = 0; h < numHeads; h++) {
    const g = Math.floor(h / group);
    const qCol = h * headDim;
    const kCol = (numHeads + g) * headDim;
    const vCol = (numHeads + numKvHeads + g) * headDim;
    const oCol = h * headDim;
    for (let t = 0; t < tokens; t++) {
      let delta = 0;
      for (let i = 0; i < headDim; i++) {
        delta += dOut[t * numHeads * headDim + oCol + i] * out[t * numHeads * headDim + oCol + i];
      }
      for (let j = 0; j <= t; j++) {
        const pj = p[h][t * tokens + j];
        let dp = 0;
        for (let i = 0; i < headDim; i++) {
          dp += dOut[t * numHeads * headDim + oCol + i] * qkv[j * stride + vCol + i];
        }
        const ds = pj * (dp - delta) * scale;
        for (let i = 0; i < headDim; i++) {
          dQkv[t * stride + qCol + i] += ds * qkv[j * stride + kCol + i];
          dQkv[j * stride + kCol + i] += ds * qkv[t * stride + qCol + i];
          dQkv[j * stride + vCol + i] += pj * dOut[t * numHeads * headDim + oCol + i];
        }
      }
    }
  }
  return dQkv;
}
