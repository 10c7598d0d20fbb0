import { RmsNorm } from "../../src/engine/kernels/rms_norm.ts";
import { rmsNorm } from "../reference/ops.ts";
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
import { randn } from "../helpers/random.ts";

for (const [rows, dim] of [[1, 64], [7, 173], [33, 576], [3, 1]]) {
  Deno.test(
    { name: `rms_norm matches reference rows=${rows} dim=${dim}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const x = randn(rows * dim, rows * 1000 + dim);
      const w = randn(dim, dim + 7);
      const kernel = new RmsNorm(ctx, dim, 1e-5);
      const y = createStorage(ctx, rows * dim * 4, "y");
      const group = kernel.bind(
        createUniform(ctx, packUniform([["u32", rows]]), "params"),
        uploadStorage(ctx, x, "x"),
        uploadStorage(ctx, w, "w"),
        y,
      );
      runPass(ctx, (pass) => kernel.encode(pass, group, rows));
      assertClose(await readF32(ctx, y, rows * dim), rmsNorm(x, w, rows, 1e-5), F32, "rms_norm");
    },
  );
}
