import { SwiGluBackward } from "../../src/engine/kernels/swiglu_backward.ts";
import { swiglu } from "../reference/elementwise.ts";
import { swigluBackward } from "../reference/training_ops.ts";
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

Deno.test("swigluBackward reference matches finite differences of swiglu", () => {
  const [rows, I] = [3, 7];
  const gu = randn(rows * 2 * I, 1, 3);
  const dAct = randn(rows * I, 2);
  const loss = (g: Float64Array) => swiglu(g, rows, I).reduce((s, h, i) => s + h * dAct[i], 0);
  assertClose(
    swigluBackward(gu, dAct, rows, I),
    numericGradient(loss, gu),
    FINITE_DIFFERENCE,
    "swigluBackward vs finite differences",
  );
});

for (const I of [1, 172, 257]) {
  Deno.test(
    { name: `swiglu_backward matches reference I=${I}, rows in 1, 3, 17, 130`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const kernel = new SwiGluBackward(ctx, { intermediate: I });
      for (const rows of [1, 3, 17, 130]) {
        const gu = randn(rows * 2 * I, rows * 1000 + I, 3);
        // Saturating gates: exp(-g) overflows to +inf for the negative one.
        gu[0] = -100;
        if (rows * 2 * I > 2) gu[1] = 40;
        const dAct = randn(rows * I, rows + 3 * I);
        // One spare row in dGateUp: rows past params.rows must stay untouched.
        const d0 = randn((rows + 1) * 2 * I, 5);
        const dGateUp = uploadStorage(ctx, d0, "d_gate_up");
        const group = kernel.bind(
          createUniform(ctx, packUniform([["u32", rows]]), "params"),
          uploadStorage(ctx, gu, "gate_up"),
          uploadStorage(ctx, dAct, "d_act"),
          dGateUp,
        );
        runPass(ctx, (pass) => kernel.encode(pass, group, rows));
        const expected = Float64Array.from(d0);
        expected.set(swigluBackward(gu, dAct, rows, I));
        assertClose(
          await readF32(ctx, dGateUp, (rows + 1) * 2 * I),
          expected,
          F32,
          `swiglu_backward rows=${rows} I=${I}`,
        );
      }
    },
  );
}
