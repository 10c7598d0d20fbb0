/**
 * Float64 CPU references of the backward-pass products (kernels/matmul_nn.ts,
 * kernels/matmul_tn.ts). Each returns only the product block, alpha included;
 * callers add it into (or write it over) the destination window themselves.
 */

/**
 * out[r, k] = alpha * sum_{n < N} x[r, xOffset + n] * w[n, k]  ->  [rows, K].
 * x [rows, xStride]; w [N, K] row-major (a frozen weight [out, in] gives dX = dY · W).
 */
export function matmulNN(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  rows: number,
  N: number,
  K: number,
  xStride: number,
  xOffset: number,
  alpha = 1,
): Float64Array {
  const out = new Float64Array(rows * K);
  for (let r = 0; r < rows; r++) {
    for (let n = 0; n < N; n++) {
      const xv = x[r * xStride + xOffset + n];
      for (let k = 0; k < K; k++) out[r * K + k] += xv * w[n * K + k];
    }
  }
  for (let i = 0; i < out.length; i++) out[i] *= alpha;
  return out;
}

/**
 * out[m, n] = alpha * sum_{t < rows} p[t, pOffset + m] * q[t, qOffset + n]  ->  [M, N].
 * p [rows, pStride], q [rows, qStride] (weight gradients: dW = dY^T X over tokens t).
 */
export function matmulTN(
  p: ArrayLike<number>,
  q: ArrayLike<number>,
  rows: number,
  M: number,
  N: number,
  pStride: number,
  pOffset: number,
  qStride: number,
  qOffset: number,
  alpha = 1,
): Float64Array {
  const out = new Float64Array(M * N);
  for (let t = 0; t < rows; t++) {
    for (let m = 0; m < M; m++) {
      const pv = p[t * pStride + pOffset + m];
      for (let n = 0; n < N; n++) out[m * N + n] += pv * q[t * qStride + qOffset + n];
    }
  }
  for (let i = 0; i < out.length; i++) out[i] *= alpha;
  return out;
}
