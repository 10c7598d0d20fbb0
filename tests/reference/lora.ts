/**
 * Float64 CPU references of the batched multi-adapter LoRA kernels (kernels/lora.ts).
 * A pool [numSlots, R, K], B pool [numSlots, N, R], scales [numSlots], slots [rows]
 * (NO_ADAPTER_SLOT: the row is on no adapter).
 */
import { NO_ADAPTER_SLOT } from "../../src/engine/kernels/lora.ts";

/**
 * u [rows, R]: u[t, j] = sum_k x[t * xStride + xOffset + k] · A[slot_t, j, k]; 0 without adapter.
 */
export function loraShrink(
  x: ArrayLike<number>,
  slots: ArrayLike<number>,
  aPool: ArrayLike<number>,
  rows: number,
  shape: { K: number; R: number; xStride: number; xOffset: number },
): Float64Array {
  const { K, R, xStride, xOffset } = shape;
  const u = new Float64Array(rows * R);
  for (let t = 0; t < rows; t++) {
    const slot = slots[t];
    if (slot === NO_ADAPTER_SLOT) continue;
    for (let j = 0; j < R; j++) {
      let sum = 0;
      for (let k = 0; k < K; k++) {
        sum += x[t * xStride + xOffset + k] * aPool[(slot * R + j) * K + k];
      }
      u[t * R + j] = sum;
    }
  }
  return u;
}

/**
 * A copy of y [rows, yStride] with y[t, yOffset + n] += scales[slot_t] · sum_j u[t, j] · B[slot_t,
 * n, j] for n < N; rows without adapter unchanged.
 */
export function loraExpand(
  y: ArrayLike<number>,
  u: ArrayLike<number>,
  slots: ArrayLike<number>,
  bPool: ArrayLike<number>,
  scales: ArrayLike<number>,
  rows: number,
  shape: { N: number; R: number; yStride: number; yOffset: number },
): Float64Array {
  const { N, R, yStride, yOffset } = shape;
  const out = Float64Array.from(y);
  for (let t = 0; t < rows; t++) {
    const slot = slots[t];
    if (slot === NO_ADAPTER_SLOT) continue;
    for (let n = 0; n < N; n++) {
      let sum = 0;
      for (let j = 0; j < R; j++) sum += u[t * R + j] * bPool[(slot * N + n) * R + j];
      out[t * yStride + yOffset + n] += scales[slot] * sum;
    }
  }
  return out;
}
