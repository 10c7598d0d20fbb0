/**
 * Float64 CPU references of the elementwise and gather kernels: SwiGLU,
 * embedding gather, token feedback. Row-major, token-major activations.
 */

/** gu [rows, 2I] (gate | up) -> h [rows, I], h = g / (1 + exp(-g)) * u. */
export function swiglu(gu: ArrayLike<number>, rows: number, intermediate: number): Float64Array {
  const I = intermediate;
  const h = new Float64Array(rows * I);
  for (let r = 0; r < rows; r++) {
    for (let i = 0; i < I; i++) {
      const g = gu[r * 2 * I + i];
      h[r * I + i] = (g / (1 + Math.exp(-g))) * gu[r * 2 * I + I + i];
    }
  }
  return h;
}

/**
 * Embedding gather: out[t, :] = table[ids[t], :] for ids below the table's row
 * count; rows of other tokens keep their value in `out` (copied, not modified).
 * table [V, dim], out [tokens, dim].
 */
export function embeddingGather(
  ids: ArrayLike<number>,
  table: ArrayLike<number>,
  dim: number,
  out: ArrayLike<number>,
): Float64Array {
  const result = Float64Array.from(out);
  const vocab = table.length / dim;
  for (let t = 0; t < ids.length; t++) {
    if (ids[t] >= vocab) continue;
    for (let d = 0; d < dim; d++) result[t * dim + d] = table[ids[t] * dim + d];
  }
  return result;
}

/** Token feedback: tokenIds with tokenIds[dst] = sampled[src] for each (src, dst) pair. */
export function tokenFeedback(
  tokenIds: ArrayLike<number>,
  sampled: ArrayLike<number>,
  pairs: readonly (readonly [number, number])[],
): Uint32Array {
  const out = Uint32Array.from(tokenIds);
  for (const [src, dst] of pairs) out[dst] = sampled[src];
  return out;
}
