/**
 * The packed-f16 weight layout the dense kernels read: a [rows, cols] matrix
 * stored as [rows, ceil(cols/2)] u32, two binary16 values per u32 along a row
 * (element 2p in the low half, 2p+1 in the high half, which is what WGSL's
 * `unpack2x16float` returns as .x and .y). A row of odd length is padded with
 * +0 so every row starts on a u32. Narrowing rounds to nearest, ties to even.
 */
import { f16ToF32Array, f32ToF16Array } from "../model/dtype.ts";

/** u32 words per stored row of `cols` f16 values. */
export function packedRowWords(cols: number): number {
  return Math.ceil(cols / 2);
}

/** w f32 [rows, cols] row-major -> packed f16 [rows, ceil(cols/2)] u32. */
export function packF16Rows(w: Float32Array, rows: number, cols: number): Uint32Array {
  if (w.length !== rows * cols) {
    throw new RangeError(`packF16Rows: ${w.length} values is not [${rows}, ${cols}]`);
  }
  const halves = f32ToF16Array(w);
  // Even rows are already laid out as u32 pairs (little-endian host): reuse the bytes.
  if (cols % 2 === 0) return new Uint32Array(halves.buffer, 0, (rows * cols) / 2);
  const words = packedRowWords(cols);
  const padded = new Uint16Array(rows * words * 2);
  for (let r = 0; r < rows; r++) {
    padded.set(halves.subarray(r * cols, (r + 1) * cols), r * words * 2);
  }
  return new Uint32Array(padded.buffer);
}

/** packed f16 [rows, ceil(cols/2)] u32 -> f32 [rows, cols] (exact; drops the padding). */
export function unpackF16Rows(packed: Uint32Array, rows: number, cols: number): Float32Array {
  const words = packedRowWords(cols);
  if (packed.length < rows * words) {
    throw new RangeError(`unpackF16Rows: ${packed.length} words is less than [${rows}, ${words}]`);
  }
  const halves = new Uint16Array(packed.buffer, packed.byteOffset, rows * words * 2);
  if (cols % 2 === 0) return f16ToF32Array(halves);
  const out = new Float32Array(rows * cols);
  const all = f16ToF32Array(halves);
  for (let r = 0; r < rows; r++) {
    out.set(all.subarray(r * words * 2, r * words * 2 + cols), r * cols);
  }
  return out;
}
