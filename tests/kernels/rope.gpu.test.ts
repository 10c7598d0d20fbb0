import { createInvFreqUniform, Rope, type RopeOptions } from "../../src/engine/kernels/rope.ts";
import { RopeKvWrite } from "../../src/engine/kernels/rope_kv_write.ts";
import { ropeRows } from "../reference/training_ops.ts";
import { type ModelConfig, ropeInvFreq } from "../../src/engine/model/config.ts";
import { LLAMA32_1B, randomModelConfig } from "../../src/engine/model/random_model.ts";
import {
  createStorage,
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
import assert from "node:assert";

/** Llama-3.2-1B's config: llama3-scaled frequencies, theta 500000, head dim 64. */
const LLAMA3: ModelConfig = randomModelConfig(LLAMA32_1B);

/** Inverse frequencies (f32, as the GPU sees them) with theta 10000 and no scaling. */
function plainInvFreq(headDim: number): Float32Array {
  return ropeInvFreq({ ...LLAMA3, headDim, ropeTheta: 10000, ropeScaling: null });
}

Deno.test("ropeRows inverse is the backward of the rotation (finite differences)", () => {
  const layout = { heads: 2, headDim: 6, stride: 15, offset: 2 };
  const [rows, start] = [3, 5];
  const invFreq = plainInvFreq(6);
  const x = randn(rows * layout.stride, 1);
  const dy = randn(rows * layout.stride, 2);
  const loss = (xs: Float64Array) =>
    ropeRows(xs, rows, start, invFreq, { ...layout, inverse: false })
      .reduce((s, y, i) => s + y * dy[i], 0);
  assertClose(
    ropeRows(dy, rows, start, invFreq, { ...layout, inverse: true }),
    numericGradient(loss, x),
    FINITE_DIFFERENCE,
    "inverse rope vs finite differences",
  );
});

interface Case {
  name: string;
  layout: Omit<RopeOptions, "inverse">;
  rows: number;
  startPosition: number;
  invFreq: Float32Array;
}

// SmolLM2-135M's fused QKV row: 9 query heads, then 3 key heads, then 3 value heads of 64.
const QKV_STRIDE = (9 + 2 * 3) * 64;
const CASES: Case[] = [
  {
    name: "queries, theta 10000",
    layout: { heads: 9, headDim: 64, stride: QKV_STRIDE, offset: 0 },
    rows: 37,
    startPosition: 0,
    invFreq: plainInvFreq(64),
  },
  {
    name: "keys, llama3 scaling",
    layout: { heads: 3, headDim: 64, stride: QKV_STRIDE, offset: 9 * 64 },
    rows: 23,
    startPosition: 580,
    invFreq: ropeInvFreq(LLAMA3),
  },
  {
    name: "odd layout",
    layout: { heads: 5, headDim: 6, stride: 41, offset: 3 },
    rows: 7,
    startPosition: 597,
    invFreq: plainInvFreq(6),
  },
];

for (const c of CASES) {
  for (const inverse of [false, true]) {
    Deno.test({ name: `rope ${c.name} inverse=${inverse}`, ...gpuTest }, async () => {
      const ctx = await testContext();
      const options = { ...c.layout, inverse };
      const stride = c.layout.stride;
      // One spare row: rows past params.rows must stay untouched, as must other columns.
      const x0 = randn((c.rows + 1) * stride, c.rows * 31 + stride);
      const x = uploadStorage(ctx, x0, "x");
      const kernel = new Rope(ctx, options);
      const group = kernel.bind(
        createUniform(ctx, packUniform([["u32", c.rows], ["u32", c.startPosition]]), "params"),
        createInvFreqUniform(ctx, c.invFreq),
        x,
      );
      runPass(ctx, (pass) => kernel.encode(pass, group, c.rows));
      const expected = Float64Array.from(x0);
      expected.set(
        ropeRows(x0.subarray(0, c.rows * stride), c.rows, c.startPosition, c.invFreq, options),
      );
      assertClose(await readF32(ctx, x, (c.rows + 1) * stride), expected, F32, `rope ${c.name}`);
    });
  }
}

/** Rope's forward rotation of the query heads equals RopeKvWrite's, bit for bit. */
for (
  const [name, invFreq] of [["theta 10000", plainInvFreq(64)], [
    "llama3",
    ropeInvFreq(LLAMA3),
  ]] as const
) {
  Deno.test(
    { name: `rope equals rope_kv_write's query rotation (${name})`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const [H, Hkv, hd, bs] = [9, 3, 64, 16];
      const [tokens, start] = [20, 590];
      const qkvData = randn(tokens * QKV_STRIDE, 9);
      const blocks = Math.ceil((start + tokens) / bs);
      const serving = new RopeKvWrite(ctx, {
        numHeads: H,
        numKvHeads: Hkv,
        headDim: hd,
        blockSize: bs,
      });
      const qOut = createStorage(ctx, tokens * H * hd * 4, "q_out");
      const invFreqUniform = createInvFreqUniform(ctx, invFreq);
      const servingGroup = serving.bind(
        createUniform(ctx, packUniform([["u32", tokens]]), "params"),
        uploadStorage(ctx, qkvData, "qkv"),
        uploadStorage(ctx, Uint32Array.from({ length: tokens }, (_, t) => start + t), "positions"),
        uploadStorage(ctx, new Uint32Array(tokens), "token_seq"),
        // One sequence: block table at 0, contextLen, first token 0, numTokens.
        uploadStorage(ctx, Uint32Array.of(0, start + tokens, 0, tokens), "seqs"),
        uploadStorage(ctx, Uint32Array.from({ length: blocks }, (_, b) => b), "block_tables"),
        invFreqUniform,
        qOut,
        createStorage(ctx, blocks * Hkv * bs * hd * 4, "k_cache"),
        createStorage(ctx, blocks * Hkv * bs * hd * 4, "v_cache"),
      );
      const training = new Rope(ctx, {
        heads: H,
        headDim: hd,
        stride: QKV_STRIDE,
        offset: 0,
        inverse: false,
      });
      const x = uploadStorage(ctx, qkvData, "x");
      const trainingGroup = training.bind(
        createUniform(ctx, packUniform([["u32", tokens], ["u32", start]]), "params"),
        invFreqUniform,
        x,
      );
      runPass(ctx, (pass) => {
        serving.encode(pass, servingGroup, tokens);
        training.encode(pass, trainingGroup, tokens);
      });
      const q = await readF32(ctx, qOut, tokens * H * hd);
      const rotated = await readF32(ctx, x, tokens * QKV_STRIDE);
      let mismatches = 0;
      for (let t = 0; t < tokens; t++) {
        for (let j = 0; j < H * hd; j++) {
          if (!Object.is(q[t * H * hd + j], rotated[t * QKV_STRIDE + j])) mismatches++;
        }
      }
      assert.strictEqual(mismatches, 0, `${mismatches} of ${tokens * H * hd} values differ`);
    },
  );
}
