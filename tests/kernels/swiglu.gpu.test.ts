import { SwiGlu } from "../../src/engine/kernels/swiglu.ts";
import { swiglu } from "../reference/elementwise.ts";
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

for (const I of [1, 172, 257]) {
  Deno.test(
    { name: `swiglu matches reference I=${I}, rows in 1, 3, 17, 130`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const kernel = new SwiGlu(ctx, I);
      for (const rows of [1, 3, 17, 130]) {
        const gu = randn(rows * 2 * I, rows * 1000 + I, 3);
        // Saturating gates: exp(-g) overflows to +inf for the negative one.
        gu[0] = -100;
        if (rows * 2 * I > 2) gu[1] = 40;
        // One spare row in h: rows past params.rows must stay untouched.
        const h0 = randn((rows + 1) * I, 5);
        const h = uploadStorage(ctx, h0, "h");
        const group = kernel.bind(
          createUniform(ctx, packUniform([["u32", rows]]), "params"),
          uploadStorage(ctx, gu, "gu"),
          h,
        );
        runPass(ctx, (pass) => kernel.encode(pass, group, rows));
        const expected = new Float64Array(h0);
        expected.set(swiglu(gu, rows, I));
        assertClose(
          await readF32(ctx, h, (rows + 1) * I),
          expected,
          F32,
          `swiglu rows=${rows} I=${I}`,
        );
      }
    },
  );
}
