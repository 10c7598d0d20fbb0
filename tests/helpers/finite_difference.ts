/** Central finite differences for checking float64 reference gradients. */
import type { Tolerance } from "./tolerance.ts";

/**
 * Float64 central differences with step 1e-5: truncation error ~h^2 and cancellation ~1e-16 / h,
 * both far below 1e-7 of the gradient's scale.
 */
export const FINITE_DIFFERENCE: Tolerance = { rtol: 1e-7, atol: 1e-10 };

/** d f / d x_i for every i, by central differences of step h. */
export function numericGradient(f: (x: Float64Array) => number, x: ArrayLike<number>, h = 1e-5) {
  const point = Float64Array.from(x);
  return point.map((v, i) => {
    point[i] = v + h;
    const up = f(point);
    point[i] = v - h;
    const down = f(point);
    point[i] = v;
    return (up - down) / (2 * h);
  });
}
