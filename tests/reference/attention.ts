/**
 * Float64 references for rotary embedding and causal attention over a token batch. They work on
 * logical per-sequence K/V arrays (no paging), so kernel tests that page K/V through shuffled
 * block tables check the paging as well as the math.
 */

/**
 * Hugging Face "rotate_half" rotary embedding of one head vector x [hd] at `position`, with
 * a_i = position * invFreq[i] (invFreq [hd/2]) and i < hd/2:
 *   out[i] = x[i] cos(a_i) - x[i + hd/2] sin(a_i),
 *   out[i + hd/2] = x[i + hd/2] cos(a_i) + x[i] sin(a_i).
 */
export function rope(x: ArrayLike<number>, position: number, invFreq: ArrayLike<number>) {
  const half = invFreq.length;
  const out = new Float64Array(2 * half);
  for (let i = 0; i < half; i++) {
    const angle = position * invFreq[i];
    const c = Math.cos(angle);
    const s = Math.sin(angle);
    out[i] = x[i] * c - x[i + half] * s;
    out[i + half] = x[i + half] * c + x[i] * s;
  }
  return out;
}

export interface HeadLayout {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

/**
 * Splits the fused projection qkv [T, (H + 2 Hkv) hd] into rotated queries q [T, H hd], rotated
 * keys k [T, Hkv hd] and values v [T, Hkv hd].
 */
export function ropeQkv(
  qkv: ArrayLike<number>,
  positions: ArrayLike<number>,
  invFreq: ArrayLike<number>,
  { numHeads, numKvHeads, headDim }: HeadLayout,
) {
  const tokens = positions.length;
  const heads = numHeads + 2 * numKvHeads;
  const q = new Float64Array(tokens * numHeads * headDim);
  const k = new Float64Array(tokens * numKvHeads * headDim);
  const v = new Float64Array(tokens * numKvHeads * headDim);
  for (let t = 0; t < tokens; t++) {
    for (let h = 0; h < heads; h++) {
      const src = (t * heads + h) * headDim;
      const x = Float64Array.from({ length: headDim }, (_, d) => qkv[src + d]);
      if (h < numHeads) {
        q.set(rope(x, positions[t], invFreq), (t * numHeads + h) * headDim);
      } else if (h < numHeads + numKvHeads) {
        k.set(rope(x, positions[t], invFreq), (t * numKvHeads + h - numHeads) * headDim);
      } else {
        v.set(x, (t * numKvHeads + h - numHeads - numKvHeads) * headDim);
      }
    }
  }
  return { q, k, v };
}

/**
 * Causal attention of a token batch. q [T, H hd]; token t belongs to sequence tokenSeq[t] at
 * positions[t] and attends to keys 0..positions[t] of that sequence. keys[s], values[s]:
 * sequence s's cache [contextLen_s, Hkv, hd]. Query head h reads kv head h / (H / Hkv).
 * Returns out [T, H hd] = softmax(q k^T / sqrt(hd)) v per token and head.
 */
export function attention(
  q: ArrayLike<number>,
  positions: ArrayLike<number>,
  tokenSeq: ArrayLike<number>,
  keys: readonly ArrayLike<number>[],
  values: readonly ArrayLike<number>[],
  { numHeads, numKvHeads, headDim }: HeadLayout,
) {
  const tokens = positions.length;
  const group = numHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const out = new Float64Array(tokens * numHeads * headDim);
  for (let t = 0; t < tokens; t++) {
    const k = keys[tokenSeq[t]];
    const v = values[tokenSeq[t]];
    const visible = positions[t] + 1;
    const scores = new Float64Array(visible);
    for (let h = 0; h < numHeads; h++) {
      const qBase = (t * numHeads + h) * headDim;
      const kvHead = Math.floor(h / group);
      let max = -Infinity;
      for (let j = 0; j < visible; j++) {
        const kBase = (j * numKvHeads + kvHead) * headDim;
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[qBase + d] * k[kBase + d];
        scores[j] = dot * scale;
        max = Math.max(max, scores[j]);
      }
      let sum = 0;
      for (let j = 0; j < visible; j++) sum += scores[j] = Math.exp(scores[j] - max);
      for (let j = 0; j < visible; j++) {
        const vBase = (j * numKvHeads + kvHead) * headDim;
        const p = scores[j] / sum;
        for (let d = 0; d < headDim; d++) out[qBase + d] += p * v[vBase + d];
      }
    }
  }
  return out;
}
