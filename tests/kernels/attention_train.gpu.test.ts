import {
  AttentionTrainBackward,
  AttentionTrainForward,
  type AttentionTrainShape,
} from "../../src/engine/kernels/attention_train.ts";
import {
  attentionTrainBackward,
  attentionTrainForward,
  qkvStride,
} from "../reference/attention_train.ts";
import type { HeadLayout } from "../reference/attention.ts";
import {
  createStorage,
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32, type Tolerance } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";

const CONFIGS: { layout: HeadLayout; tokens: number[] }[] = [
  { layout: { numHeads: 4, numKvHeads: 2, headDim: 8 }, tokens: [1, 5, 37, 130] },
  { layout: { numHeads: 3, numKvHeads: 3, headDim: 16 }, tokens: [1, 5, 37, 130] },
  { layout: { numHeads: 9, numKvHeads: 3, headDim: 64 }, tokens: [1, 5, 37, 70] },
];

/**
 * lse is stored with rows of maxTokens: a few more than the config's longest sequence, so every
 * test checks the stride. One maxTokens per config also compiles its kernels once.
 */
function shapeOf(layout: HeadLayout, tokenCounts: number[]): AttentionTrainShape {
  return { ...layout, maxTokens: Math.max(...tokenCounts) + 3 };
}

/** Columns 0..tokens-1 of each row of a [rows, stride] matrix. */
function leadingColumns(x: Float32Array, rows: number, stride: number, tokens: number) {
  const dense = new Float32Array(rows * tokens);
  for (let r = 0; r < rows; r++) dense.set(x.subarray(r * stride, r * stride + tokens), r * tokens);
  return dense;
}

// Central differences of sum(out * R) in float64: the error is O(EPS^2) truncation plus
// O(1e-16 / EPS) rounding, far below this tolerance, so it checks the reference backward.
const EPS = 1e-5;
const FINITE_DIFFERENCE: Tolerance = { rtol: 1e-7, atol: 1e-9 };

for (
  const { layout, tokens } of [
    { layout: { numHeads: 4, numKvHeads: 2, headDim: 8 }, tokens: 5 },
    { layout: { numHeads: 6, numKvHeads: 2, headDim: 4 }, tokens: 9 },
  ]
) {
  const name = `H=${layout.numHeads} Hkv=${layout.numKvHeads} hd=${layout.headDim} T=${tokens}`;
  Deno.test(`attention_train reference backward matches finite differences ${name}`, () => {
    const qkv = Float64Array.from(randn(tokens * qkvStride(layout), tokens * 31 + 7));
    const r = randn(tokens * layout.numHeads * layout.headDim, tokens * 31 + 8);
    const loss = (x: Float64Array) =>
      attentionTrainForward(x, tokens, layout).out.reduce((sum, o, i) => sum + o * r[i], 0);
    const numeric = qkv.map((_, i) => {
      const x = qkv.slice();
      x[i] = qkv[i] + EPS;
      const up = loss(x);
      x[i] = qkv[i] - EPS;
      return (up - loss(x)) / (2 * EPS);
    });
    assertClose(attentionTrainBackward(qkv, r, tokens, layout), numeric, FINITE_DIFFERENCE, name);
  });
}

for (const { layout, tokens: tokenCounts } of CONFIGS) {
  const shape = shapeOf(layout, tokenCounts);
  for (const tokens of tokenCounts) {
    const name = `H=${layout.numHeads} Hkv=${layout.numKvHeads} hd=${layout.headDim} T=${tokens}`;
    const { numHeads: H, headDim: hd, maxTokens } = shape;
    const stride = qkvStride(layout);
    const seed = tokens * 100 + H * 10 + hd;

    Deno.test(
      { name: `attention_train_forward matches reference ${name}`, ...gpuTest },
      async () => {
        const ctx = await testContext();
        const qkv = randn(tokens * stride, seed);
        const kernel = new AttentionTrainForward(ctx, shape);
        const out = createStorage(ctx, tokens * H * hd * 4, "out");
        const lse = createStorage(ctx, H * maxTokens * 4, "lse");
        const group = kernel.bind(
          createUniform(ctx, packUniform([["u32", tokens]]), "params"),
          uploadStorage(ctx, qkv, "qkv"),
          out,
          lse,
        );
        runPass(ctx, (pass) => kernel.encode(pass, group, tokens));
        const expected = attentionTrainForward(qkv, tokens, layout);
        assertClose(await readF32(ctx, out, tokens * H * hd), expected.out, F32, `out ${name}`);
        const lseRows = leadingColumns(
          await readF32(ctx, lse, H * maxTokens),
          H,
          maxTokens,
          tokens,
        );
        assertClose(lseRows, expected.lse, F32, `lse ${name}`);
      },
    );

    Deno.test(
      { name: `attention_train_backward matches reference ${name}`, ...gpuTest },
      async () => {
        const ctx = await testContext();
        const qkv = randn(tokens * stride, seed);
        const dOut = randn(tokens * H * hd, seed + 1);
        const { out, lse } = attentionTrainForward(qkv, tokens, layout);
        const lseRows = new Float32Array(H * maxTokens);
        for (let h = 0; h < H; h++) {
          lseRows.set(lse.subarray(h * tokens, (h + 1) * tokens), h * maxTokens);
        }
        const kernel = new AttentionTrainBackward(ctx, shape);
        // Pre-filled with large values: every element must be overwritten.
        const dQkv = uploadStorage(ctx, randn(tokens * stride, seed + 2, 1e3), "dQkv");
        const groups = kernel.bind(
          createUniform(ctx, packUniform([["u32", tokens]]), "params"),
          uploadStorage(ctx, qkv, "qkv"),
          uploadStorage(ctx, Float32Array.from(out), "out"),
          uploadStorage(ctx, lseRows, "lse"),
          uploadStorage(ctx, dOut, "dOut"),
          dQkv,
        );
        runPass(ctx, (pass) => kernel.encode(pass, groups, tokens));
        const expected = attentionTrainBackward(qkv, dOut, tokens, layout);
        assertClose(await readF32(ctx, dQkv, tokens * stride), expected, F32, `dQkv ${name}`);
        kernel.destroy();
      },
    );
  }
}

Deno.test(
  { name: "attention_train forward then backward in one pass", ...gpuTest },
  async () => {
    const ctx = await testContext();
    const { layout, tokens: tokenCounts } = CONFIGS[2];
    const shape = shapeOf(layout, tokenCounts);
    const { numHeads: H, headDim: hd, maxTokens } = shape;
    const tokens = 61;
    const stride = qkvStride(layout);
    const qkv = randn(tokens * stride, 11);
    const dOut = randn(tokens * H * hd, 12);
    const forward = new AttentionTrainForward(ctx, shape);
    const backward = new AttentionTrainBackward(ctx, shape);
    const params = createUniform(ctx, packUniform([["u32", tokens]]), "params");
    const qkvBuffer = uploadStorage(ctx, qkv, "qkv");
    const out = createStorage(ctx, tokens * H * hd * 4, "out");
    const lse = createStorage(ctx, H * maxTokens * 4, "lse");
    const dQkv = createStorage(ctx, tokens * stride * 4, "dQkv");
    const forwardGroup = forward.bind(params, qkvBuffer, out, lse);
    const backwardGroups = backward.bind(
      params,
      qkvBuffer,
      out,
      lse,
      uploadStorage(ctx, dOut, "dOut"),
      dQkv,
    );
    runPass(ctx, (pass) => {
      forward.encode(pass, forwardGroup, tokens);
      backward.encode(pass, backwardGroups, tokens);
    });
    const expected = attentionTrainBackward(qkv, dOut, tokens, layout);
    assertClose(await readF32(ctx, dQkv, tokens * stride), expected, F32, "dQkv");
    backward.destroy();
  },
);
