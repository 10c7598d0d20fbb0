/**
 * CPU reference implementations of the engine's ops, in float64 (Float64Array
 * in, Float64Array out). Kernel tests compare the WGSL kernels against these;
 * the reference forward pass (llama.ts) is built from them.
 * Layouts match the kernels: row-major, token-major activations.
 */

/** y[t, i] = x[t, i] / sqrt(mean(x[t]^2) + eps) * w[i]; x [rows, dim]. */
export function rmsNorm(x: ArrayLike<number>, w: ArrayLike<number>, rows: number, eps: number) {
  const dim = w.length;
  const y = new Float64Array(rows * dim);
  for (let t = 0; t < rows; t++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[t * dim + i] ** 2;
    const scale = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) y[t * dim + i] = x[t * dim + i] * scale * w[i];
  }
  return y;
}
