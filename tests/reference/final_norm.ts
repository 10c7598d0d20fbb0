/** CPU reference of the final-norm row gather (src/shaders/final_norm.wgsl), in float64. */
import { rmsNorm } from "./ops.ts";

/**
 * y [S, dim] = rmsNorm(x[rowIndex[s], :]) * w for s < S; x [T, dim] token-major,
 * rowIndex [S] with entries < T, w [dim].
 */
export function finalNorm(
  x: ArrayLike<number>,
  rowIndex: ArrayLike<number>,
  w: ArrayLike<number>,
  eps: number,
): Float64Array {
  const dim = w.length;
  const rows = rowIndex.length;
  const gathered = new Float64Array(rows * dim);
  for (let s = 0; s < rows; s++) {
    const src = rowIndex[s] * dim;
    if (!Number.isInteger(rowIndex[s]) || src < 0 || src + dim > x.length) {
      throw new RangeError(`finalNorm: rowIndex[${s}] = ${rowIndex[s]} is outside x`);
    }
    for (let i = 0; i < dim; i++) gathered[s * dim + i] = x[src + i];
  }
  return rmsNorm(gathered, w, rows, eps);
}
