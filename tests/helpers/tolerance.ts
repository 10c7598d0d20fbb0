/**
 * The one tolerance helper every numeric test uses.
 *
 * assertClose passes when  max_i |a_i - e_i|  <=  atol + rtol * max_i |e_i|,
 * i.e. the error is measured relative to the tensor's scale, not element by
 * element (elementwise relative error is meaningless where e_i crosses zero).
 */
import { AssertionError } from "node:assert";

export interface Tolerance {
  rtol: number;
  atol?: number;
}

/** float32 kernels against a float64 reference. */
export const F32: Tolerance = { rtol: 1e-5, atol: 1e-6 };

export function maxRelativeError(actual: ArrayLike<number>, expected: ArrayLike<number>) {
  let maxErr = 0;
  let scale = 0;
  for (let i = 0; i < expected.length; i++) {
    maxErr = Math.max(maxErr, Math.abs(actual[i] - expected[i]));
    scale = Math.max(scale, Math.abs(expected[i]));
  }
  return { maxErr, scale, relative: scale === 0 ? maxErr : maxErr / scale };
}

export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: Tolerance,
  label = "tensor",
): void {
  if (actual.length !== expected.length) {
    throw new AssertionError({
      message: `${label}: length ${actual.length} != expected ${expected.length}`,
    });
  }
  for (let i = 0; i < actual.length; i++) {
    if (!Number.isFinite(actual[i])) {
      throw new AssertionError({
        message: `${label}: non-finite value ${actual[i]} at index ${i}`,
      });
    }
  }
  const { maxErr, scale } = maxRelativeError(actual, expected);
  const bound = (tol.atol ?? 0) + tol.rtol * scale;
  if (maxErr > bound) {
    let worst = 0;
    for (let i = 0; i < actual.length; i++) {
      if (Math.abs(actual[i] - expected[i]) === maxErr) worst = i;
    }
    throw new AssertionError({
      message: `${label}: max abs error ${maxErr.toExponential(3)} > ${bound.toExponential(3)} ` +
        `(rtol ${tol.rtol}, atol ${tol.atol ?? 0}, scale ${scale.toExponential(3)}); ` +
        `worst at ${worst}: got ${actual[worst]}, expected ${expected[worst]}`,
    });
  }
}
