import assert from "node:assert/strict";
import { LoraDropout } from "../../src/engine/kernels/lora_dropout.ts";
import { dropoutKeeps, loraDropout } from "../reference/dropout.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";

const CASES = [
  {
    rows: 1,
    cols: 7,
    inStride: 7,
    inOffset: 0,
    outStride: 9,
    outOffset: 2,
    p: 0.5,
    accumulate: false,
  },
  {
    rows: 13,
    cols: 173,
    inStride: 180,
    inOffset: 5,
    outStride: 173,
    outOffset: 0,
    p: 0.1,
    accumulate: true,
  },
  {
    rows: 64,
    cols: 160,
    inStride: 160,
    inOffset: 0,
    outStride: 160,
    outOffset: 0,
    p: 0.3,
    accumulate: false,
  },
  {
    rows: 5,
    cols: 33,
    inStride: 33,
    inOffset: 0,
    outStride: 33,
    outOffset: 0,
    p: 0,
    accumulate: false,
  },
];

for (const c of CASES) {
  Deno.test(
    { name: `lora_dropout matches reference ${JSON.stringify(c)}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const seed = 0xdeadbeef, stream = 17;
      const x = randn(c.rows * c.inStride, c.rows + c.cols);
      const initial = randn(c.rows * c.outStride, 3 * c.cols);
      const out = uploadStorage(ctx, initial, "out");
      const kernel = new LoraDropout(ctx, c);
      const group = kernel.bind(
        createUniform(ctx, packUniform([["u32", c.rows], ["u32", seed]]), "params"),
        createUniform(ctx, packUniform([["u32", stream]]), "stream"),
        uploadStorage(ctx, x, "x"),
        out,
      );
      runPass(ctx, (pass) => kernel.encode(pass, group, c.rows));
      const packed = new Float64Array(c.rows * c.cols);
      for (let r = 0; r < c.rows; r++) {
        for (let j = 0; j < c.cols; j++) {
          packed[r * c.cols + j] = x[r * c.inStride + c.inOffset + j];
        }
      }
      const dropped = loraDropout(packed, c.rows, c.cols, c.p, seed, stream);
      const expected = Float64Array.from(initial);
      for (let r = 0; r < c.rows; r++) {
        for (let j = 0; j < c.cols; j++) {
          const o = r * c.outStride + c.outOffset + j;
          expected[o] = (c.accumulate ? initial[o] : 0) + dropped[r * c.cols + j];
        }
      }
      assertClose(await readF32(ctx, out, expected.length), expected, F32, "lora_dropout");
    },
  );
}

Deno.test("dropout mask: rate near p, fixed per (seed, stream), differs across streams", () => {
  const rows = 100, cols = 200, p = 0.25;
  let dropped = 0, differs = 0;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const keep = dropoutKeeps(7, 3, r, c, cols, p);
      assert.equal(keep, dropoutKeeps(7, 3, r, c, cols, p));
      if (!keep) dropped++;
      if (keep !== dropoutKeeps(7, 4, r, c, cols, p)) differs++;
    }
  }
  const rate = dropped / (rows * cols);
  // 20,000 Bernoulli(0.25) draws: std 0.003, so 0.02 is over six standard deviations.
  assert.ok(Math.abs(rate - p) < 0.02, `drop rate ${rate}`);
  assert.ok(differs > 0.2 * rows * cols, `streams 3 and 4 differ on only ${differs} elements`);
});
