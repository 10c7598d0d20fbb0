import { GradSquareSum, gradSquareSumParams } from "../../src/engine/kernels/grad_norm.ts";
import { AdamW, adamwParams, Sgd, sgdParams } from "../../src/engine/kernels/optimizer.ts";
import {
  adamwStep,
  clipFactor,
  gradSquareSum,
  type OptimizerState,
  sgdStep,
} from "../reference/optim.ts";
import {
  createStorage,
  createUniform,
  readF32,
  uploadStorage,
  writeBuffer,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import type { GpuContext } from "../../src/engine/gpu/context.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";
import { AssertionError } from "node:assert";

/** Parameter tensors of odd sizes: one element, below / above the workgroup size (256). */
const SIZES = [1, 7, 1000, 4099];
const f32 = Math.fround;

/** The global gradient norm (before scaling) of randn gradients is ~sqrt(5107) ≈ 71. */
const CLIP_MODES = [
  ["active", 1], // norm ≈ 0.5 · 71 > 1: gradients scaled down
  ["inactive", 1000],
  ["off", 0],
] as const;

interface Tensor {
  size: number;
  g: GPUBuffer;
  p: GPUBuffer;
  m: GPUBuffer;
  v: GPUBuffer;
}

function makeTensors(ctx: GpuContext, seed: number): { tensors: Tensor[]; p0: Float32Array[] } {
  const p0 = SIZES.map((n, k) => randn(n, seed + k));
  const tensors = SIZES.map((size, k) => ({
    size,
    g: createStorage(ctx, size * 4, "g"),
    p: uploadStorage(ctx, p0[k], "p"),
    m: createStorage(ctx, size * 4, "m"),
    v: createStorage(ctx, size * 4, "v"),
  }));
  return { tensors, p0 };
}

/**
 * Uploads new gradients, fills partials with real GradSquareSum dispatches and
 * checks them against the float64 sums of squares; returns the GPU partials.
 */
async function gradientsAndNorm(
  ctx: GpuContext,
  tensors: Tensor[],
  partials: GPUBuffer,
  seed: number,
): Promise<{ grads: Float32Array[]; partials: Float32Array }> {
  const grads = tensors.map((t, k) => randn(t.size, seed + 100 * k));
  tensors.forEach((t, k) => writeBuffer(ctx, t.g, 0, grads[k]));
  const kernel = new GradSquareSum(ctx);
  const groups = tensors.map((t, index) =>
    kernel.bind(
      createUniform(ctx, gradSquareSumParams({ count: t.size, index }), "params"),
      t.g,
      partials,
    )
  );
  runPass(ctx, (pass) => groups.forEach((group) => kernel.encode(pass, group)));
  const got = await readF32(ctx, partials, tensors.length);
  assertClose(got, grads.map(gradSquareSum), F32, "grad square sums");
  return { grads, partials: got };
}

function assertClipping(mode: string, partials: Float32Array, gradScale: number, max: number) {
  const clip = clipFactor(partials, gradScale, max);
  if ((mode === "active") !== (clip < 1)) {
    throw new AssertionError({ message: `clipping ${mode} expected, clip factor ${clip}` });
  }
}

Deno.test({ name: "grad_norm writes only its own partials slot", ...gpuTest }, async () => {
  const ctx = await testContext();
  const grad = randn(20000, 5);
  const partials = uploadStorage(ctx, new Float32Array([7, 7, 7, 7]), "partials");
  const kernel = new GradSquareSum(ctx);
  const group = kernel.bind(
    createUniform(ctx, gradSquareSumParams({ count: 20000, index: 2 }), "params"),
    uploadStorage(ctx, grad, "grad"),
    partials,
  );
  runPass(ctx, (pass) => kernel.encode(pass, group));
  assertClose(await readF32(ctx, partials, 4), [7, 7, gradSquareSum(grad), 7], F32, "partials");
});

for (const [mode, maxGradNorm] of CLIP_MODES) {
  for (const weightDecay of [0, 0.01]) {
    Deno.test(
      {
        name: `adamw matches reference over 3 steps, clipping ${mode}, wd=${weightDecay}`,
        ...gpuTest,
      },
      async () => {
        const ctx = await testContext();
        const seed = maxGradNorm * 7 + weightDecay * 1000;
        const { tensors, p0 } = makeTensors(ctx, seed);
        const partials = createStorage(ctx, tensors.length * 4, "partials");
        const adamw = new AdamW(ctx);
        // lr large enough that each update (~lr) and the decay (lr·wd·|p|) are far
        // above F32's tolerance at the parameters' scale.
        const hyper = {
          lr: f32(0.1),
          beta1: f32(0.9),
          beta2: f32(0.999),
          eps: f32(1e-8),
          weightDecay: f32(weightDecay),
          gradScale: 0.5,
          maxGradNorm: f32(maxGradNorm),
        };
        let expected: OptimizerState[] = p0.map((p) => ({
          p: Float64Array.from(p),
          m: new Float64Array(p.length),
          v: new Float64Array(p.length),
        }));
        for (let step = 1; step <= 3; step++) {
          const norm = await gradientsAndNorm(ctx, tensors, partials, seed + step);
          assertClipping(mode, norm.partials, hyper.gradScale, hyper.maxGradNorm);
          const groups = tensors.map((t) =>
            adamw.bind(
              createUniform(
                ctx,
                adamwParams({ ...hyper, count: t.size, step, numPartials: tensors.length }),
                "params",
              ),
              partials,
              t.g,
              t.p,
              t.m,
              t.v,
            )
          );
          runPass(ctx, (pass) => groups.forEach((g, k) => adamw.encode(pass, g, tensors[k].size)));
          const options = { ...hyper, step };
          expected = expected.map((s, k) => adamwStep(s, norm.grads[k], norm.partials, options));
          for (const [k, t] of tensors.entries()) {
            const at = `step ${step} size ${t.size}`;
            assertClose(await readF32(ctx, t.p, t.size), expected[k].p, F32, `p ${at}`);
            assertClose(await readF32(ctx, t.m, t.size), expected[k].m, F32, `m ${at}`);
            assertClose(await readF32(ctx, t.v, t.size), expected[k].v, F32, `v ${at}`);
          }
        }
      },
    );
  }
}

for (const [mode, maxGradNorm] of CLIP_MODES) {
  Deno.test(
    { name: `sgd matches reference over 2 steps, clipping ${mode}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const seed = 31 + maxGradNorm;
      const { tensors, p0 } = makeTensors(ctx, seed);
      const partials = createStorage(ctx, tensors.length * 4, "partials");
      const sgd = new Sgd(ctx);
      const hyper = { lr: f32(0.1), gradScale: 0.5, maxGradNorm: f32(maxGradNorm) };
      let expected: Float64Array[] = p0.map((p) => Float64Array.from(p));
      for (let step = 1; step <= 2; step++) {
        const norm = await gradientsAndNorm(ctx, tensors, partials, seed + step);
        assertClipping(mode, norm.partials, hyper.gradScale, hyper.maxGradNorm);
        const groups = tensors.map((t) =>
          sgd.bind(
            createUniform(
              ctx,
              sgdParams({ ...hyper, count: t.size, numPartials: tensors.length }),
              "params",
            ),
            partials,
            t.g,
            t.p,
          )
        );
        runPass(ctx, (pass) => groups.forEach((g, k) => sgd.encode(pass, g, tensors[k].size)));
        expected = expected.map((p, k) => sgdStep(p, norm.grads[k], norm.partials, hyper));
        for (const [k, t] of tensors.entries()) {
          assertClose(
            await readF32(ctx, t.p, t.size),
            expected[k],
            F32,
            `p step ${step} size ${t.size}`,
          );
        }
      }
    },
  );
}

// A late step (bias corrections 1 − β^t far from both 0 and 1) from nonzero moments,
// with more partials than threads per workgroup (the norm reduction loops) and
// clipping active.
for (const step of [1000, 12345]) {
  Deno.test({ name: `adamw and sgd at step ${step} with 300 partials`, ...gpuTest }, async () => {
    const ctx = await testContext();
    const n = 1000;
    const [p, g, m] = [randn(n, step), randn(n, step + 1), randn(n, step + 2, 0.1)];
    const v = randn(n, step + 3, 0.1).map((x) => x * x);
    const partialValues = randn(300, step + 4).map((x) => x * x);
    const hyper = {
      step,
      lr: f32(0.01),
      beta1: f32(0.9),
      beta2: f32(0.999),
      eps: f32(1e-8),
      weightDecay: f32(0.01),
      gradScale: 0.5,
      maxGradNorm: f32(1),
    };
    assertClipping("active", partialValues, hyper.gradScale, hyper.maxGradNorm);
    const partials = uploadStorage(ctx, partialValues, "partials");
    const [pAdam, pSgd, mBuf, vBuf] = [p, p, m, v].map((x) => uploadStorage(ctx, x, "state"));
    const gBuf = uploadStorage(ctx, g, "g");
    const adamw = new AdamW(ctx);
    const sgd = new Sgd(ctx);
    const adamwGroup = adamw.bind(
      createUniform(ctx, adamwParams({ ...hyper, count: n, numPartials: 300 }), "params"),
      partials,
      gBuf,
      pAdam,
      mBuf,
      vBuf,
    );
    const sgdGroup = sgd.bind(
      createUniform(ctx, sgdParams({ ...hyper, count: n, numPartials: 300 }), "params"),
      partials,
      gBuf,
      pSgd,
    );
    runPass(ctx, (pass) => {
      adamw.encode(pass, adamwGroup, n);
      sgd.encode(pass, sgdGroup, n);
    });
    const expected = adamwStep({ p, m, v }, g, partialValues, hyper);
    assertClose(await readF32(ctx, pAdam, n), expected.p, F32, "adamw p");
    assertClose(await readF32(ctx, mBuf, n), expected.m, F32, "adamw m");
    assertClose(await readF32(ctx, vBuf, n), expected.v, F32, "adamw v");
    assertClose(await readF32(ctx, pSgd, n), sgdStep(p, g, partialValues, hyper), F32, "sgd p");
  });
}
