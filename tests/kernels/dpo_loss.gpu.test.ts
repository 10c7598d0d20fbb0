import { DPO_OUT_FLOATS, DpoLoss, dpoLossParams } from "../../src/engine/kernels/dpo_loss.ts";
import { dpoLoss } from "../reference/optim.ts";
import {
  createStorage,
  createUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import type { GpuContext } from "../../src/engine/gpu/context.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn, rng } from "../helpers/random.ts";

const GRAD_SCALE = 0.25;

/** n per-token log-probs, −U(0, 8); with `grid`, rounded to multiples of 1/grid. */
function logProbs(n: number, seed: number, grid = 0): Float32Array {
  const next = rng(seed);
  return Float32Array.from({ length: n }, () => {
    const x = -8 * next();
    return grid ? Math.round(x * grid) / grid : x;
  });
}

function sum(x: ArrayLike<number>, from: number, to: number): number {
  let s = 0;
  for (let i = from; i < to; i++) s += x[i];
  return s;
}

async function runDpo(
  ctx: GpuContext,
  logp: Float32Array,
  chosenCount: number,
  rejectedCount: number,
  refSums: Float32Array,
  beta: number,
): Promise<Float32Array> {
  const kernel = new DpoLoss(ctx);
  const out = createStorage(ctx, DPO_OUT_FLOATS * 4, "out");
  const params = dpoLossParams({ chosenCount, rejectedCount, beta, gradScale: GRAD_SCALE });
  const group = kernel.bind(
    createUniform(ctx, params, "params"),
    uploadStorage(ctx, logp, "logp"),
    uploadStorage(ctx, refSums, "refSums"),
    out,
  );
  runPass(ctx, (pass) => kernel.encode(pass, group));
  return await readF32(ctx, out, DPO_OUT_FLOATS);
}

// [chosenCount, rejectedCount]: single tokens, counts below, at and above the
// workgroup size (256), and a long pair (~1000 tokens).
const counts = [[1, 7], [7, 1], [300, 513], [513, 300], [1, 513], [513, 513]];

for (const [chosenCount, rejectedCount] of counts) {
  for (const beta of [0.1, 2.0]) {
    Deno.test(
      {
        name:
          `dpo_loss matches reference chosen=${chosenCount} rejected=${rejectedCount} β=${beta}`,
        ...gpuTest,
      },
      async () => {
        const ctx = await testContext();
        const seed = chosenCount * 1000 + rejectedCount + beta * 10;
        const logp = logProbs(chosenCount + rejectedCount, seed);
        // Reference sums near the policy's, so the margin z is O(1..10).
        const noise = randn(2, seed + 1, 3);
        const refSums = Float32Array.from([
          sum(logp, 0, chosenCount) + noise[0],
          sum(logp, chosenCount, chosenCount + rejectedCount) + noise[1],
        ]);
        const out = await runDpo(ctx, logp, chosenCount, rejectedCount, refSums, beta);
        const expected = dpoLoss(
          logp,
          chosenCount,
          rejectedCount,
          refSums,
          Math.fround(beta),
          GRAD_SCALE,
        );
        assertClose(out, expected, F32, "dpo_loss");
      },
    );
  }
}

// Log-probs on a 1/256 grid make every f32 partial sum (|sum| < 2^13) and every
// difference of sums exact, so the loss and gradients can be held to F32 at their
// own scale rather than that of the sums (~1e3), including |z| = 100, where a naive
// log(1 + exp(−z)) overflows f32.
for (const beta of [0.1, 2.0]) {
  for (const z of [-100, -80, -20, -3, -0.5, 0, 0.7, 4, 20, 80, 100]) {
    Deno.test({ name: `dpo_loss head is accurate at z=${z} β=${beta}`, ...gpuTest }, async () => {
      const ctx = await testContext();
      const [chosenCount, rejectedCount] = [300, 513];
      const logp = logProbs(chosenCount + rejectedCount, 4242 + z, 256);
      const chosen = sum(logp, 0, chosenCount);
      const rejected = sum(logp, chosenCount, chosenCount + rejectedCount);
      // Split the margin between both rewards: z/β = (chosen − refW) − (rejected − refL).
      const d = Math.round((z / beta) * 256) / 256;
      const refSums = Float32Array.from([chosen - d / 2 - 3.5, rejected + d / 2 - 3.5]);
      const out = await runDpo(ctx, logp, chosenCount, rejectedCount, refSums, beta);
      const expected = dpoLoss(
        logp,
        chosenCount,
        rejectedCount,
        refSums,
        Math.fround(beta),
        GRAD_SCALE,
      );
      assertClose(out, expected, F32, "dpo_loss");
      assertClose([out[7]], [expected[7]], F32, "margin z");
      ["loss", "dL/dπw", "dL/dπl"].forEach((label, k) => {
        assertClose([out[k]], [expected[k]], F32, label);
      });
    });
  }
}

Deno.test({ name: "dpo_loss: reference pass feeds the policy pass", ...gpuTest }, async () => {
  const ctx = await testContext();
  const [chosenCount, rejectedCount, beta] = [37, 301, 0.1];
  const refLogp = logProbs(chosenCount + rejectedCount, 901);
  const policyLogp = refLogp.map((x, i) => x + 0.05 * Math.sin(i));
  const kernel = new DpoLoss(ctx);
  const params = createUniform(
    ctx,
    dpoLossParams({ chosenCount, rejectedCount, beta, gradScale: GRAD_SCALE }),
    "params",
  );
  const refOut = createStorage(ctx, DPO_OUT_FLOATS * 4, "refOut");
  const refSums = uploadStorage(ctx, new Float32Array(2), "refSums");
  const out = createStorage(ctx, DPO_OUT_FLOATS * 4, "out");
  const refGroup = kernel.bind(params, uploadStorage(ctx, refLogp, "refLogp"), refSums, refOut);
  const policyGroup = kernel.bind(
    params,
    uploadStorage(ctx, policyLogp, "policyLogp"),
    refSums,
    out,
  );

  const encoder = ctx.device.createCommandEncoder();
  let pass = encoder.beginComputePass();
  kernel.encode(pass, refGroup);
  pass.end();
  encoder.copyBufferToBuffer(refOut, 3 * 4, refSums, 0, 2 * 4); // out[3..4] -> refSums
  pass = encoder.beginComputePass();
  kernel.encode(pass, policyGroup);
  pass.end();
  ctx.device.queue.submit([encoder.finish()]);

  const gpuRefSums = await readF32(ctx, refSums, 2);
  const expectedRef = dpoLoss(
    refLogp,
    chosenCount,
    rejectedCount,
    [0, 0],
    Math.fround(beta),
    GRAD_SCALE,
  );
  assertClose(gpuRefSums, expectedRef.subarray(3, 5), F32, "reference sums");
  const expected = dpoLoss(
    policyLogp,
    chosenCount,
    rejectedCount,
    gpuRefSums,
    Math.fround(beta),
    GRAD_SCALE,
  );
  assertClose(await readF32(ctx, out, DPO_OUT_FLOATS), expected, F32, "dpo_loss");
});
