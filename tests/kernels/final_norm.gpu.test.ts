import { FinalNorm } from "../../src/engine/kernels/final_norm.ts";
import { finalNorm } from "../reference/final_norm.ts";
import {
  createStorage,
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randInts, randn } from "../helpers/random.ts";

// [T tokens in the step, D hidden size, S gathered rows]: D not a multiple of the
// workgroup size, S > T (a row gathered twice), a single row, D = 1.
const cases = [[5, 64, 3], [9, 173, 4], [33, 576, 7], [2, 1, 3], [1, 130, 1]];

for (const [tokens, dim, rows] of cases) {
  Deno.test(
    { name: `final_norm matches reference T=${tokens} D=${dim} S=${rows}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const seed = tokens * 1000 + dim * 10 + rows;
      const x = randn(tokens * dim, seed);
      const w = randn(dim, seed + 1);
      const rowIndex = randInts(rows, tokens, seed + 2);
      rowIndex[rows - 1] = tokens - 1; // the usual case: the last token of the step
      const kernel = new FinalNorm(ctx, dim, 1e-5);
      const y = createStorage(ctx, rows * dim * 4, "y");
      const group = kernel.bind(
        createUniform(ctx, packUniform([["u32", rows]]), "params"),
        uploadStorage(ctx, x, "x"),
        uploadStorage(ctx, rowIndex, "rowIndex"),
        uploadStorage(ctx, w, "w"),
        y,
      );
      runPass(ctx, (pass) => kernel.encode(pass, group, rows));
      const expected = finalNorm(x, rowIndex, w, 1e-5);
      assertClose(await readF32(ctx, y, rows * dim), expected, F32, "final_norm");
    },
  );
}

Deno.test({ name: "final_norm writes only the first params.rows rows", ...gpuTest }, async () => {
  const ctx = await testContext();
  const [tokens, dim, capacity, rows] = [6, 96, 5, 2];
  const x = randn(tokens * dim, 77);
  const w = randn(dim, 78);
  const rowIndex = Uint32Array.from([4, 1, 0, 0, 0]);
  const kernel = new FinalNorm(ctx, dim, 1e-6);
  const y = uploadStorage(ctx, new Float32Array(capacity * dim).fill(7), "y");
  const group = kernel.bind(
    createUniform(ctx, packUniform([["u32", rows]]), "params"),
    uploadStorage(ctx, x, "x"),
    uploadStorage(ctx, rowIndex, "rowIndex"),
    uploadStorage(ctx, w, "w"),
    y,
  );
  runPass(ctx, (pass) => kernel.encode(pass, group, rows));
  const out = await readF32(ctx, y, capacity * dim);
  const expected = new Float64Array(capacity * dim).fill(7);
  expected.set(finalNorm(x, rowIndex.subarray(0, rows), w, 1e-6));
  assertClose(out, expected, F32, "final_norm prefix");
});
