import { MatMulNN, type MatMulNNOptions } from "../../src/engine/kernels/matmul_nn.ts";
import { packF16Rows, unpackF16Rows } from "../../src/engine/kernels/f16_pack.ts";
import { matmulNN } from "../reference/matmul_backward.ts";
import {
  createStorage,
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
  writeBuffer,
} from "../../src/engine/gpu/buffers.ts";
import type { GpuContext } from "../../src/engine/gpu/context.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";

/**
 * The test device posing as a hardware GPU: the wrapper then runs the 64 x 64-tiled
 * kernel past 8 rows and splits the thin kernel's sums among threads (software
 * GPUs get the thin kernel with few splits throughout).
 */
async function hardwareTuned(): Promise<GpuContext> {
  return { ...(await testContext()), isSoftware: false };
}

function weightBuffer(ctx: GpuContext, w: Float32Array, o: MatMulNNOptions) {
  return uploadStorage(ctx, o.weight === "f16" ? packF16Rows(w, o.n, o.k) : w, "w");
}

/** The weights the kernel sees: f16 weights are compared after the same rounding. */
function effectiveWeight(w: Float32Array, o: MatMulNNOptions): Float32Array {
  if (o.weight === "f32") return w;
  return unpackF16Rows(packF16Rows(w, o.n, o.k), o.n, o.k);
}

/**
 * y0 with the product's window of rows [0, rows) written (or added), as the kernel should leave y.
 */
function expectedY(
  o: MatMulNNOptions,
  rows: number,
  x: Float32Array,
  w: Float32Array,
  y0: Float32Array,
): Float64Array {
  const product = matmulNN(x, effectiveWeight(w, o), rows, o.n, o.k, o.xStride, o.xOffset, o.alpha);
  const out = Float64Array.from(y0);
  for (let r = 0; r < rows; r++) {
    for (let k = 0; k < o.k; k++) {
      const i = r * o.yStride + o.yOffset + k;
      out[i] = (o.accumulate ? y0[i] : 0) + product[r * o.k + k];
    }
  }
  return out;
}

/**
 * Runs one configuration for each row count on a random y with two spare rows
 * (which must stay untouched) and compares with the reference.
 */
async function check(
  ctx: GpuContext,
  o: MatMulNNOptions,
  rowCounts: readonly number[],
  seed: number,
) {
  const kernel = new MatMulNN(ctx, o);
  const w = randn(o.n * o.k, seed, 1 / Math.sqrt(o.n));
  const wBuf = weightBuffer(ctx, w, o);
  for (const rows of rowCounts) {
    const x = randn(rows * o.xStride, seed + rows);
    const y0 = randn((rows + 2) * o.yStride, seed + rows + 1);
    const y = uploadStorage(ctx, y0, "y");
    const params = createUniform(ctx, packUniform([["u32", rows]]), "params");
    const group = kernel.bind(params, uploadStorage(ctx, x, "x"), wBuf, y);
    runPass(ctx, (pass) => kernel.encode(pass, group, rows));
    assertClose(
      await readF32(ctx, y, y0.length),
      expectedY(o, rows, x, w, y0),
      F32,
      `matmul_nn rows=${rows} ${JSON.stringify(o)}`,
    );
  }
}

const nn = (n: number, k: number, more: Partial<MatMulNNOptions> = {}): MatMulNNOptions => ({
  n,
  k,
  xStride: n,
  xOffset: 0,
  yStride: k,
  yOffset: 0,
  weight: "f32",
  accumulate: false,
  ...more,
});

// Both LoRA shapes (K = r: G = dY · B; N = r: dX += scale · G · A) and square-ish
// ones, odd sizes, windows of wider x and y, accumulate on and off, alpha != 1,
// f16 weights at odd and even K.
const CONFIGS: MatMulNNOptions[] = [
  nn(577, 5, { xStride: 600, xOffset: 11, accumulate: true, alpha: 0.5 }),
  nn(5, 577, { yStride: 600, yOffset: 20, weight: "f16", accumulate: true, alpha: 2 }),
  nn(173, 64, { weight: "f16" }),
  nn(64, 173, { xStride: 70, xOffset: 6, yStride: 180, yOffset: 7, alpha: -1.5 }),
];
const ROWS = [1, 7, 33, 130];

for (const [i, o] of CONFIGS.entries()) {
  const name = `matmul_nn N=${o.n} K=${o.k} ${o.weight}${o.accumulate ? " accumulate" : ""}` +
    `${o.alpha !== undefined ? ` alpha=${o.alpha}` : ""}` +
    `${o.xOffset ? ` x window ${o.xOffset}/${o.xStride}` : ""}` +
    `${o.yOffset ? ` y window ${o.yOffset}/${o.yStride}` : ""}`;
  Deno.test({ name, ...gpuTest }, async () => {
    await check(await testContext(), o, ROWS, 100 * i);
    await check(await hardwareTuned(), o, ROWS, 100 * i + 50);
  });
}

Deno.test({ name: "matmul_nn long reduction N=4099", ...gpuTest }, async () => {
  // dX = dY · W of a wide layer: the sum runs over 4099 rows of W.
  const o = nn(4099, 70, { yStride: 75, yOffset: 3, accumulate: true, alpha: 0.25 });
  await check(await testContext(), o, [1, 33], 11);
  await check(await hardwareTuned(), o, [33], 12);
});

Deno.test({ name: "matmul_nn one bind group serves every row count", ...gpuTest }, async () => {
  const ctx = await hardwareTuned(); // both entry points, by row count
  const o = CONFIGS[3]; // already compiled: its pipelines are cached
  const maxRows = 130;
  const kernel = new MatMulNN(ctx, o);
  const x = randn(maxRows * o.xStride, 3);
  const w = randn(o.n * o.k, 4);
  const params = createUniform(ctx, packUniform([["u32", 1]]), "params");
  const y = createStorage(ctx, maxRows * o.yStride * 4, "y");
  const group = kernel.bind(params, uploadStorage(ctx, x, "x"), weightBuffer(ctx, w, o), y);
  for (const rows of [2, maxRows, 1, 33]) {
    writeBuffer(ctx, params, 0, packUniform([["u32", rows]]));
    const zeros = new Float32Array(rows * o.yStride);
    writeBuffer(ctx, y, 0, zeros);
    runPass(ctx, (pass) => kernel.encode(pass, group, rows));
    const expected = expectedY(o, rows, x, w, zeros);
    assertClose(await readF32(ctx, y, rows * o.yStride), expected, F32, `rows=${rows}`);
  }
});

Deno.test({
  name: "matmul_nn weight split by rows into two accumulated chunks equals the whole",
  ...gpuTest,
}, async () => {
  const ctx = await testContext();
  // A frozen weight too large for one binding: chunks of W's rows, x read at the
  // chunk's first row, accumulate after the first.
  const N = 577, K = 64, split = 300, rows = 33;
  const whole = nn(N, K, { weight: "f16" });
  const w = randn(N * K, 5, 0.1);
  const x = randn(rows * N, 6);
  const xBuf = uploadStorage(ctx, x, "x");
  const params = createUniform(ctx, packUniform([["u32", rows]]), "params");
  const y = createStorage(ctx, rows * K * 4, "y");
  const chunks = [[0, split], [split, N - split]].map(([start, count]) => {
    const o = { ...whole, n: count, xStride: N, xOffset: start, accumulate: start > 0 };
    const kernel = new MatMulNN(ctx, o);
    const wChunk = weightBuffer(ctx, w.subarray(start * K, (start + count) * K), o);
    return { kernel, group: kernel.bind(params, xBuf, wChunk, y) };
  });
  runPass(ctx, (pass) => chunks.forEach(({ kernel, group }) => kernel.encode(pass, group, rows)));
  assertClose(
    await readF32(ctx, y, rows * K),
    expectedY(whole, rows, x, w, new Float32Array(rows * K)),
    F32,
    "two chunks",
  );
});
