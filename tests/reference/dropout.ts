/** CPU reference of src/shaders/lora_dropout.wgsl: the same hash mask, values in float64. */

function hash(v: number): number {
  let h = v >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  h ^= h >>> 16;
  return h >>> 0;
}

/** Whether element (r, c) of a [*, cols] input survives dropout p under (seed, stream). */
export function dropoutKeeps(
  seed: number,
  stream: number,
  r: number,
  c: number,
  cols: number,
  p: number,
): boolean {
  const key = hash((seed ^ hash(stream)) >>> 0);
  const u = (hash((key ^ ((r * cols + c) >>> 0)) >>> 0) >>> 8) / 16777216;
  return u >= p;
}

/** out [rows, cols] = x [rows, cols] with dropped elements zeroed and kept ones / (1 - p). */
export function loraDropout(
  x: ArrayLike<number>,
  rows: number,
  cols: number,
  p: number,
  seed: number,
  stream: number,
): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      if (dropoutKeeps(seed, stream, r, c, cols, p)) out[r * cols + c] = x[r * cols + c] / (1 - p);
    }
  }
  return out;
}
