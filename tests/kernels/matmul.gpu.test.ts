import { deepStrictEqual } from "node:assert";
import { type LinearOptions, MatMul, matvecMaxRows } from "../../src/engine/kernels/matmul.ts";
import { packF16Rows, unpackF16Rows } from "../../src/engine/kernels/f16_pack.ts";
import { linear } from "../reference/matmul.ts";
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

// Each layer configuration compiles three pipelines, which takes seconds on
// SwiftShader: configurations are few, row counts many.
const ROWS = [1, 2, 3, 5, 17, 64, 130];

function weightBuffer(ctx: GpuContext, w: Float32Array, o: LinearOptions) {
  const data = o.weight === "f16" ? packF16Rows(w, o.outFeatures, o.inFeatures) : w;
  return uploadStorage(ctx, data, "w");
}

/** The weights the kernel sees: f16 weights are compared after the same rounding. */
function effectiveWeight(w: Float32Array, o: LinearOptions): Float32Array {
  if (o.weight === "f32") return w;
  return unpackF16Rows(packF16Rows(w, o.outFeatures, o.inFeatures), o.outFeatures, o.inFeatures);
}

/**
 * y0 with the layer's columns of rows [0, rows) written (or added), as the kernel should leave y.
 */
function expectedY(
  o: LinearOptions,
  rows: number,
  x: Float32Array,
  w: Float32Array,
  bias: Float32Array | null,
  y0: Float32Array,
) {
  const stride = o.outStride ?? o.outFeatures, offset = o.outOffset ?? 0;
  const out = Float64Array.from(y0);
  const layer = linear(x, effectiveWeight(w, o), bias, rows, o.inFeatures, o.outFeatures);
  for (let r = 0; r < rows; r++) {
    for (let n = 0; n < o.outFeatures; n++) {
      const i = r * stride + offset + n;
      out[i] = (o.accumulate ? y0[i] : 0) + layer[r * o.outFeatures + n];
    }
  }
  return out;
}

/**
 * Runs one layer for each row count on a y buffer with two spare rows (which
 * must stay untouched) and compares with the reference.
 */
async function check(o: LinearOptions, rowCounts: readonly number[], seed: number) {
  const ctx = await testContext();
  const K = o.inFeatures, N = o.outFeatures, stride = o.outStride ?? N;
  const layer = new MatMul(ctx, o);
  const w = randn(N * K, seed, 1 / Math.sqrt(K));
  const wBuf = weightBuffer(ctx, w, o);
  const bias = o.bias ? randn(N, seed + 1) : null;
  const biasBuf = bias ? uploadStorage(ctx, bias, "bias") : null;
  for (const rows of rowCounts) {
    const capacity = rows + 2;
    const x = randn(rows * K, seed + rows);
    const y0 = randn(capacity * stride, seed + rows + 1);
    const y = uploadStorage(ctx, y0, "y");
    const params = createUniform(ctx, packUniform([["u32", rows]]), "params");
    const group = layer.bind(params, uploadStorage(ctx, x, "x"), wBuf, biasBuf, y);
    runPass(ctx, (pass) => layer.encode(pass, group, rows));
    assertClose(
      await readF32(ctx, y, capacity * stride),
      expectedY(o, rows, x, w, bias, y0),
      F32,
      `linear rows=${rows} ${JSON.stringify(o)}`,
    );
  }
}

const layer = (K: number, N: number, more: Partial<LinearOptions> = {}): LinearOptions => ({
  inFeatures: K,
  outFeatures: N,
  weight: "f32",
  bias: false,
  accumulate: false,
  ...more,
});

// Every K in {1, 7, 64, 173, 576} and N in {1, 9, 65, 172, 513}, with bias and
// accumulate on and off, f16 at odd K, and column windows of a wider y.
const CONFIGS: LinearOptions[] = [
  layer(1, 513, { bias: true }),
  layer(7, 9, { weight: "f16", bias: true, accumulate: true, outStride: 20, outOffset: 5 }),
  layer(64, 65, { accumulate: true, outStride: 100, outOffset: 20 }),
  layer(173, 172, { weight: "f16" }),
  layer(576, 1, { bias: true, accumulate: true }),
];

for (const [i, o] of CONFIGS.entries()) {
  const name = `matmul K=${o.inFeatures} N=${o.outFeatures} ${o.weight}` +
    `${o.bias ? " bias" : ""}${o.accumulate ? " accumulate" : ""}` +
    `${o.outOffset ? ` window ${o.outOffset}/${o.outStride}` : ""}`;
  Deno.test({ name, ...gpuTest }, async () => {
    const threshold = matvecMaxRows(await testContext());
    // Both sides of the switch from the matvec kernel to the tiled one.
    await check(o, [...ROWS, threshold, threshold + 1], 100 * i);
  });
}

Deno.test({ name: "matmul one bind group serves both kernels", ...gpuTest }, async () => {
  const ctx = await testContext();
  const K = 64, N = 65, maxRows = 130;
  const layer = new MatMul(ctx, CONFIGS[2]); // already compiled: its pipelines are cached
  const x = randn(maxRows * K, 7);
  const w = randn(N * K, 8);
  const params = createUniform(ctx, packUniform([["u32", 1]]), "params");
  const y = createStorage(ctx, maxRows * 100 * 4, "y");
  const group = layer.bind(params, uploadStorage(ctx, x, "x"), uploadStorage(ctx, w, "w"), null, y);
  for (const rows of [2, maxRows, 1]) {
    writeBuffer(ctx, params, 0, packUniform([["u32", rows]]));
    const zeros = new Float32Array(rows * 100);
    writeBuffer(ctx, y, 0, zeros);
    runPass(ctx, (pass) => layer.encode(pass, group, rows));
    const expected = expectedY(CONFIGS[2], rows, x, w, null, zeros);
    assertClose(await readF32(ctx, y, rows * 100), expected, F32, `rows=${rows}`);
  }
});

Deno.test({
  name: "matmul weight split by rows into two chunks equals the unsplit layer",
  ...gpuTest,
}, async () => {
  const ctx = await testContext();
  // f16 at even K; 256 rows per chunk, so the bias slice starts 256-byte aligned.
  const K = 64, N = 513, split = 256;
  const o = layer(K, N, { weight: "f16", bias: true });
  const whole = new MatMul(ctx, o);
  const chunks = [[0, split], [split, N - split]].map(([start, count]) => ({
    start,
    count,
    layer: new MatMul(ctx, { ...o, outFeatures: count, outStride: N, outOffset: start }),
  }));
  const w = randn(N * K, 2, 0.1);
  const bias = randn(N, 3);
  const biasBuf = uploadStorage(ctx, bias, "bias");
  for (const rows of [1, 17, 130]) {
    const x = randn(rows * K, rows);
    const params = createUniform(ctx, packUniform([["u32", rows]]), "params");
    const xBuf = uploadStorage(ctx, x, "x");
    const yWhole = createStorage(ctx, rows * N * 4, "y whole");
    const ySplit = createStorage(ctx, rows * N * 4, "y split");
    const wholeGroup = whole.bind(params, xBuf, weightBuffer(ctx, w, o), biasBuf, yWhole);
    const chunkGroups = chunks.map(({ start, count, layer }) =>
      layer.bind(
        params,
        xBuf,
        weightBuffer(ctx, w.subarray(start * K, (start + count) * K), layer.options),
        { buffer: biasBuf, offset: start * 4, size: count * 4 },
        ySplit,
      )
    );
    runPass(ctx, (pass) => {
      whole.encode(pass, wholeGroup, rows);
      chunks.forEach(({ layer }, i) => layer.encode(pass, chunkGroups[i], rows));
    });
    const unsplit = await readF32(ctx, yWhole, rows * N);
    // Chunks may split K among a different number of threads: equal up to rounding.
    assertClose(await readF32(ctx, ySplit, rows * N), unsplit, F32, `split vs whole rows=${rows}`);
    assertClose(
      unsplit,
      expectedY(o, rows, x, w, bias, new Float32Array(rows * N)),
      F32,
      `rows=${rows}`,
    );
  }
});

Deno.test(
  { name: "matmul matvec grid past 65535 workgroups per dimension", ...gpuTest },
  async () => {
    const ctx = await testContext();
    // K = 1 on a software GPU: 4 columns per thread, 64 threads per workgroup, so
    // N needs more than 65535 * 256 columns. Small integers keep the check exact and cheap.
    const N = ctx.limits.maxComputeWorkgroupsPerDimension * 256 + 9;
    const o = layer(1, N);
    const w = new Float32Array(N);
    const expected = new Float32Array(N);
    for (let n = 0; n < N; n++) {
      w[n] = (n % 13) - 6;
      expected[n] = w[n] * 0.5;
    }
    const y = createStorage(ctx, N * 4, "y");
    const big = new MatMul(ctx, o);
    const params = createUniform(ctx, packUniform([["u32", 1]]), "params");
    const group = big.bind(
      params,
      uploadStorage(ctx, new Float32Array([0.5]), "x"),
      weightBuffer(ctx, w, o),
      null,
      y,
    );
    runPass(ctx, (pass) => big.encode(pass, group, 1));
    assertClose(await readF32(ctx, y, N), expected, F32, "wide layer");
  },
);

Deno.test("f16 packing rounds to nearest even, pads odd rows with zero, and round-trips", () => {
  const ulp = 2 ** -10; // f16 spacing in [1, 2)
  const values = new Float32Array([1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.75 * ulp, -2.5, 65520, 1e-8]);
  const packed = packF16Rows(values, 2, 3);
  deepStrictEqual(packed.length, 4); // two rows of ceil(3/2) words
  deepStrictEqual(packed[1] >>> 16, 0); // row 0's padding half
  deepStrictEqual(
    Array.from(unpackF16Rows(packed, 2, 3)),
    [1, 1 + 2 * ulp, 1 + ulp, -2.5, Infinity, 0],
  );
  const even = randn(4 * 6, 9);
  const once = unpackF16Rows(packF16Rows(even, 4, 6), 4, 6);
  deepStrictEqual(unpackF16Rows(packF16Rows(once, 4, 6), 4, 6), once);
});
