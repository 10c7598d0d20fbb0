/**
 * Float64 CPU reference of the linear layer (kernels/matmul.ts).
 * x [rows, K], w [N, K] (Hugging Face [out, in]), bias [N] or null -> y [rows, N].
 */
export function linear(
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  bias: ArrayLike<number> | null,
  rows: number,
  inFeatures: number,
  outFeatures: number,
): Float64Array {
  const K = inFeatures, N = outFeatures;
  const y = new Float64Array(rows * N);
  for (let r = 0; r < rows; r++) {
    for (let n = 0; n < N; n++) {
      let sum = bias ? bias[n] : 0;
      for (let k = 0; k < K; k++) sum += x[r * K + k] * w[n * K + k];
      y[r * N + n] = sum;
    }
  }
  return y;
}
