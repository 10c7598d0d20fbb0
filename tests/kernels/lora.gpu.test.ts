import { LoraExpand, LoraShrink, NO_ADAPTER_SLOT } from "../../src/engine/kernels/lora.ts";
import { loraExpand, loraShrink } from "../reference/lora.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randInts, randn } from "../helpers/random.ts";

interface Case {
  rows: number;
  K: number;
  N: number;
  R: number;
  numSlots: number;
  xStride: number;
  xOffset: number;
  yStride: number;
  yOffset: number;
  /**
   * Rows come in runs of this many on one slot (a prefill chunk); default: each row its own draw.
   */
  run?: number;
}

const CASES: Case[] = [
  // Odd sizes, strided and offset x and y (a column range of a fused output).
  { rows: 7, K: 37, N: 23, R: 5, numSlots: 3, xStride: 45, xOffset: 3, yStride: 50, yOffset: 11 },
  // SmolLM2-135M q projection with a rank-16 pool, rows in prefill-like runs (blocks of 4 rows
  // on one adapter, on none, and straddling two).
  {
    rows: 33,
    K: 576,
    N: 576,
    R: 16,
    numSlots: 4,
    xStride: 576,
    xOffset: 0,
    yStride: 960,
    yOffset: 0,
    run: 7,
  },
  // The same with every row drawing its own slot (a decode batch on mixed adapters).
  {
    rows: 18,
    K: 576,
    N: 192,
    R: 16,
    numSlots: 4,
    xStride: 576,
    xOffset: 0,
    yStride: 960,
    yOffset: 576,
  },
  // down projection input, rank past one shrink block (16), one decode row.
  {
    rows: 1,
    K: 1536,
    N: 576,
    R: 20,
    numSlots: 2,
    xStride: 1536,
    xOffset: 0,
    yStride: 576,
    yOffset: 0,
  },
  // Rank 1, one output column, one slot (the trainer's layout: every row on slot 0).
  { rows: 5, K: 8, N: 1, R: 1, numSlots: 1, xStride: 8, xOffset: 0, yStride: 3, yOffset: 2 },
];

/** Row slots: every slot and NO_ADAPTER_SLOT, in a seeded order, in runs of `run` rows. */
function rowSlots(rows: number, numSlots: number, seed: number, run = 1): Uint32Array {
  const draws = randInts(Math.ceil(rows / run), numSlots + 1, seed);
  return Uint32Array.from({ length: rows }, (_, t) => draws[Math.floor(t / run)])
    .map((s) => (s === numSlots ? NO_ADAPTER_SLOT : s));
}

for (const c of CASES) {
  const name = `rows=${c.rows} K=${c.K} N=${c.N} R=${c.R} slots=${c.numSlots}`;

  Deno.test({ name: `lora_shrink matches reference ${name}`, ...gpuTest }, async () => {
    const ctx = await testContext();
    const x = randn(c.rows * c.xStride, c.K + 1);
    const a = randn(c.numSlots * c.R * c.K, c.K + 2);
    const slots = rowSlots(c.rows, c.numSlots, c.rows + 3, c.run);
    const kernel = new LoraShrink(ctx, {
      inFeatures: c.K,
      rank: c.R,
      inStride: c.xStride,
      inOffset: c.xOffset,
    });
    // Garbage in u: rows without adapter must be written with zeros.
    const u = uploadStorage(ctx, new Float32Array(c.rows * c.R).fill(7), "u");
    const group = kernel.bind(
      createUniform(ctx, packUniform([["u32", c.rows]]), "params"),
      uploadStorage(ctx, x, "x"),
      uploadStorage(ctx, slots, "slots"),
      uploadStorage(ctx, a, "a pool"),
      u,
    );
    runPass(ctx, (pass) => kernel.encode(pass, group, c.rows));
    const expected = loraShrink(x, slots, a, c.rows, c);
    assertClose(await readF32(ctx, u, c.rows * c.R), expected, F32, "lora_shrink");
  });

  Deno.test({ name: `lora_expand matches reference ${name}`, ...gpuTest }, async () => {
    const ctx = await testContext();
    const u = randn(c.rows * c.R, c.N + 4);
    const b = randn(c.numSlots * c.N * c.R, c.N + 5);
    const scales = randn(c.numSlots, c.N + 6);
    const y0 = randn(c.rows * c.yStride, c.N + 7);
    const slots = rowSlots(c.rows, c.numSlots, c.rows + 8, c.run);
    const kernel = new LoraExpand(ctx, {
      outFeatures: c.N,
      rank: c.R,
      outStride: c.yStride,
      outOffset: c.yOffset,
    });
    const y = uploadStorage(ctx, y0, "y");
    const group = kernel.bind(
      createUniform(ctx, packUniform([["u32", c.rows]]), "params"),
      uploadStorage(ctx, u, "u"),
      uploadStorage(ctx, slots, "slots"),
      uploadStorage(ctx, b, "b pool"),
      uploadStorage(ctx, scales, "scales"),
      y,
    );
    runPass(ctx, (pass) => kernel.encode(pass, group, c.rows));
    // Columns outside the range and rows without adapter keep their exact values.
    const expected = loraExpand(y0, u, slots, b, scales, c.rows, c);
    assertClose(await readF32(ctx, y, c.rows * c.yStride), expected, F32, "lora_expand");
  });
}

Deno.test(
  { name: "lora shrink then expand leave rows without adapter bit-exact", ...gpuTest },
  async () => {
    const ctx = await testContext();
    const rows = 9, K = 40, N = 30, R = 3;
    const x = randn(rows * K, 1),
      a = randn(2 * R * K, 2),
      b = randn(2 * N * R, 3),
      y0 = randn(rows * N, 4);
    const slots = Uint32Array.from([
      0,
      NO_ADAPTER_SLOT,
      1,
      1,
      NO_ADAPTER_SLOT,
      0,
      0,
      1,
      NO_ADAPTER_SLOT,
    ]);
    const params = createUniform(ctx, packUniform([["u32", rows]]), "params");
    const slotBuffer = uploadStorage(ctx, slots, "slots");
    const u = uploadStorage(ctx, new Float32Array(rows * R), "u");
    const y = uploadStorage(ctx, y0, "y");
    const shrink = new LoraShrink(ctx, { inFeatures: K, rank: R });
    const expand = new LoraExpand(ctx, { outFeatures: N, rank: R });
    const shrinkGroup = shrink.bind(
      params,
      uploadStorage(ctx, x, "x"),
      slotBuffer,
      uploadStorage(ctx, a, "a"),
      u,
    );
    const scales = Float32Array.from([0.5, 2]);
    const expandGroup = expand.bind(
      params,
      u,
      slotBuffer,
      uploadStorage(ctx, b, "b"),
      uploadStorage(ctx, scales, "s"),
      y,
    );
    runPass(ctx, (pass) => {
      shrink.encode(pass, shrinkGroup, rows);
      expand.encode(pass, expandGroup, rows);
    });
    const got = await readF32(ctx, y, rows * N);
    const shape = { K, N, R, xStride: K, xOffset: 0, yStride: N, yOffset: 0 };
    const expected = loraExpand(
      y0,
      loraShrink(x, slots, a, rows, shape),
      slots,
      b,
      scales,
      rows,
      shape,
    );
    assertClose(got, expected, F32, "shrink + expand");
    slots.forEach((slot, t) => {
      if (slot !== NO_ADAPTER_SLOT) return;
      for (let n = 0; n < N; n++) {
        if (got[t * N + n] !== y0[t * N + n]) {
          throw new Error(`row ${t} without adapter changed at ${n}`);
        }
      }
    });
  },
);
