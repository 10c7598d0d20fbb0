import { RmsNormBackward } from "../../src/engine/kernels/rms_norm_backward.ts";
import { rmsNorm } from "../reference/ops.ts";
import { rmsNormBackward } from "../reference/training_ops.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { FINITE_DIFFERENCE, numericGradient } from "../helpers/finite_difference.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";

Deno.test("rmsNormBackward reference matches finite differences of rmsNorm", () => {
  const [rows, dim, eps] = [3, 11, 1e-2];
  const x = randn(rows * dim, 1);
  const w = randn(dim, 2);
  const dy = randn(rows * dim, 3);
  const loss = (xs: Float64Array) =>
    rmsNorm(xs, w, rows, eps).reduce((s, y, i) => s + y * dy[i], 0);
  assertClose(
    rmsNormBackward(x, w, dy, rows, eps),
    numericGradient(loss, x),
    FINITE_DIFFERENCE,
    "rmsNormBackward vs finite differences",
  );
  const dx0 = randn(rows * dim, 4);
  const accumulated = rmsNormBackward(x, w, dy, rows, eps, dx0).map((v, i) => v - dx0[i]);
  assertClose(accumulated, rmsNormBackward(x, w, dy, rows, eps), FINITE_DIFFERENCE, "accumulate");
});

for (const [rows, dim] of [[1, 64], [7, 173], [33, 576], [3, 1]]) {
  for (const accumulate of [false, true]) {
    Deno.test({
      name: `rms_norm_backward rows=${rows} dim=${dim} accumulate=${accumulate}`,
      ...gpuTest,
    }, async () => {
      const ctx = await testContext();
      const eps = 1e-5;
      const x = randn(rows * dim, rows * 1000 + dim);
      const w = randn(dim, dim + 7);
      const dy = randn(rows * dim, dim + 11);
      // One spare row in dx: rows past params.rows must stay untouched.
      const dx0 = randn((rows + 1) * dim, 5);
      const dx = uploadStorage(ctx, dx0, "dx");
      const kernel = new RmsNormBackward(ctx, { dim, eps, accumulate });
      const group = kernel.bind(
        createUniform(ctx, packUniform([["u32", rows]]), "params"),
        uploadStorage(ctx, x, "x"),
        uploadStorage(ctx, w, "w"),
        uploadStorage(ctx, dy, "dy"),
        dx,
      );
      runPass(ctx, (pass) => kernel.encode(pass, group, rows));
      const expected = Float64Array.from(dx0);
      expected.set(rmsNormBackward(x, w, dy, rows, eps, accumulate ? dx0 : undefined));
      assertClose(await readF32(ctx, dx, (rows + 1) * dim), expected, F32, "rms_norm_backward");
    });
  }
}
