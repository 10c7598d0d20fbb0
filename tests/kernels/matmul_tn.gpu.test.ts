import { MatMulTN, type MatMulTNOptions } from "../../src/engine/kernels/matmul_tn.ts";
import { matmulTN } from "../reference/matmul_backward.ts";
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

/** c0 with the product written (or added), as the kernel should leave c. */
function expectedC(
  o: MatMulTNOptions,
  rows: number,
  p: Float32Array,
  q: Float32Array,
  c0: Float32Array,
): Float64Array {
  const product = matmulTN(
    p,
    q,
    rows,
    o.m,
    o.n,
    o.pStride,
    o.pOffset,
    o.qStride,
    o.qOffset,
    o.alpha,
  );
  return product.map((v, i) => (o.accumulate ? c0[i] : 0) + v);
}

/**
 * The test device posing as a hardware GPU: the wrapper then splits each block's
 * sum over rows among threads (software GPUs get one thread per block).
 */
async function hardwareTuned(): Promise<GpuContext> {
  return { ...(await testContext()), isSoftware: false };
}

/**
 * Runs one configuration for each row count on random p, q and c and compares with the reference.
 */
async function check(
  ctx: GpuContext,
  o: MatMulTNOptions,
  rowCounts: readonly number[],
  seed: number,
) {
  const kernel = new MatMulTN(ctx, o);
  for (const rows of rowCounts) {
    const p = randn(rows * o.pStride, seed + rows);
    const q = randn(rows * o.qStride, seed + rows + 1);
    const c0 = randn(o.m * o.n, seed + rows + 2);
    const c = uploadStorage(ctx, c0, "c");
    const params = createUniform(ctx, packUniform([["u32", rows]]), "params");
    // Empty p, q still need a binding: one float, never read.
    const group = kernel.bind(
      params,
      uploadStorage(ctx, rows ? p : new Float32Array(1), "p"),
      uploadStorage(ctx, rows ? q : new Float32Array(1), "q"),
      c,
    );
    runPass(ctx, (pass) => kernel.encode(pass, group));
    assertClose(
      await readF32(ctx, c, o.m * o.n),
      expectedC(o, rows, p, q, c0),
      F32,
      `matmul_tn rows=${rows} ${JSON.stringify(o)}`,
    );
  }
}

const tn = (m: number, n: number, more: Partial<MatMulTNOptions> = {}): MatMulTNOptions => ({
  m,
  n,
  pStride: m,
  pOffset: 0,
  qStride: n,
  qOffset: 0,
  accumulate: false,
  ...more,
});

// Both LoRA shapes (M = r or N = r), both dimensions odd or tiny, windows of wider
// p and q, accumulate on and off, alpha != 1.
const CONFIGS: MatMulTNOptions[] = [
  tn(173, 8, { pStride: 200, pOffset: 20, accumulate: true, alpha: 0.5 }),
  tn(8, 577, { qStride: 600, qOffset: 11, accumulate: true, alpha: 2 }),
  tn(5, 64, { pStride: 9, pOffset: 3 }),
  tn(577, 5, { qStride: 7, qOffset: 1, alpha: -1.5 }),
  tn(1, 1, { accumulate: true }),
  tn(64, 173, { pStride: 70, pOffset: 6, qStride: 180, qOffset: 7, accumulate: true }),
];
const ROWS = [0, 1, 7, 33, 130];

for (const [i, o] of CONFIGS.entries()) {
  const name = `matmul_tn M=${o.m} N=${o.n}${o.accumulate ? " accumulate" : ""}` +
    `${o.alpha !== undefined ? ` alpha=${o.alpha}` : ""}` +
    `${o.pOffset ? ` p window ${o.pOffset}/${o.pStride}` : ""}` +
    `${o.qOffset ? ` q window ${o.qOffset}/${o.qStride}` : ""}`;
  Deno.test({ name, ...gpuTest }, async () => {
    await check(await testContext(), o, ROWS, 100 * i);
    await check(await hardwareTuned(), o, ROWS, 100 * i + 50);
  });
}

Deno.test({ name: "matmul_tn LoRA shapes over 1024 rows", ...gpuTest }, async () => {
  // dB [out, r] = dY^T U over a long sequence: the reduction at full length.
  const o = tn(576, 8, { pStride: 1536, pOffset: 576, accumulate: true });
  await check(await testContext(), o, [1024], 7);
  await check(await hardwareTuned(), o, [1024], 8);
});

Deno.test({ name: "matmul_tn one bind group serves every row count", ...gpuTest }, async () => {
  const ctx = await testContext();
  const o = CONFIGS[0]; // already compiled: its pipeline is cached
  const maxRows = 130;
  const kernel = new MatMulTN(ctx, o);
  const p = randn(maxRows * o.pStride, 3);
  const q = randn(maxRows * o.qStride, 4);
  const params = createUniform(ctx, packUniform([["u32", 0]]), "params");
  const c = createStorage(ctx, o.m * o.n * 4, "c");
  const group = kernel.bind(params, uploadStorage(ctx, p, "p"), uploadStorage(ctx, q, "q"), c);
  for (const rows of [130, 2, 0, 33]) {
    writeBuffer(ctx, params, 0, packUniform([["u32", rows]]));
    const c0 = randn(o.m * o.n, rows);
    writeBuffer(ctx, c, 0, c0);
    runPass(ctx, (pass) => kernel.encode(pass, group));
    assertClose(
      await readF32(ctx, c, o.m * o.n),
      expectedC(o, rows, p, q, c0),
      F32,
      `rows=${rows}`,
    );
  }
});
