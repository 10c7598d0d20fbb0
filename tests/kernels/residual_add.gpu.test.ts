import { ResidualAdd } from "../../src/engine/kernels/residual_add.ts";
import { residualAdd } from "../../src/engine/reference/elementwise.ts";
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

async function check(n: number, x: Float32Array, y0: Float32Array) {
  const ctx = await testContext();
  const kernel = new ResidualAdd(ctx);
  const y = uploadStorage(ctx, y0, "y");
  const group = kernel.bind(
    createUniform(ctx, packUniform([["u32", n]]), "params"),
    uploadStorage(ctx, x, "x"),
    y,
  );
  runPass(ctx, (pass) => kernel.encode(pass, group, n));
  // y has one element past n, which must stay untouched.
  const expected = Float64Array.from(y0);
  expected.set(residualAdd(y0.subarray(0, n), x.subarray(0, n)));
  assertClose(await readF32(ctx, y, n + 1), expected, F32, `residual_add n=${n}`);
}

Deno.test(
  { name: "residual_add matches reference, n in 1, 255, 256, 257, 4161", ...gpuTest },
  async () => {
    for (const n of [1, 255, 256, 257, 4161]) await check(n, randn(n + 1, n), randn(n + 1, n + 1));
  },
);

Deno.test(
  { name: "residual_add grid past 65535 workgroups per dimension", ...gpuTest },
  async () => {
    const ctx = await testContext();
    // 256 threads per workgroup; small integers keep the sums exact and the data cheap to make.
    const n = ctx.limits.maxComputeWorkgroupsPerDimension * 256 + 3;
    const x = new Float32Array(n + 1);
    const y0 = new Float32Array(n + 1);
    for (let i = 0; i <= n; i++) {
      x[i] = i % 5;
      y0[i] = (i % 7) - 3;
    }
    await check(n, x, y0);
  },
);
