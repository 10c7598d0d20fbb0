/**
 * Whole-model check: the GPU forward pass (chunked prefill, then decode steps)
 * gives the same logits as the float64 CPU reference, on random-weight tiny
 * models written to disk in the HF layout: a Llama with GQA and untied
 * embeddings, a Qwen2 with q/k/v biases, a BF16 Llama, a Llama with llama3 rope
 * scaling; and with f16 weights on the GPU.
 */
import { openModel } from "../../src/engine/model/open_model.ts";
import { type RandomModelSpec, writeRandomHfModel } from "../../src/engine/model/random_model.ts";
import type { WeightDtype } from "../../src/engine/model/dtype.ts";
import { ropeInvFreq } from "../../src/engine/model/config.ts";
import { f16ToF32, f32ToF16Bits } from "../../src/engine/model/dtype.ts";
import { ReferenceModel } from "../reference/llama.ts";
import { ModelRunner } from "../../src/engine/runner/model_runner.ts";
import { GREEDY, type SequenceWork } from "../../src/engine/step.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, type Tolerance } from "../helpers/tolerance.ts";

/** The bound for f32 logits against a float64 reference: 1e-4 relative error. */
const LOGITS: Tolerance = { rtol: 1e-4 };

const LLAMA_GQA: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 48,
  intermediateSize: 101,
  numLayers: 2,
  numHeads: 6,
  numKvHeads: 2,
  vocabSize: 97,
  tieWordEmbeddings: false,
  seed: 11,
};
const QWEN2_BIAS: RandomModelSpec = {
  architecture: "qwen2",
  hiddenSize: 40,
  intermediateSize: 72,
  numLayers: 2,
  numHeads: 5,
  numKvHeads: 1,
  vocabSize: 131,
  tieWordEmbeddings: true,
  seed: 12,
  bosTokenId: 1,
  eosTokenIds: [2],
};
const LLAMA3_ROPE: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 64,
  intermediateSize: 96,
  numLayers: 1,
  numHeads: 4,
  numKvHeads: 4,
  headDim: 16,
  vocabSize: 80,
  tieWordEmbeddings: true,
  seed: 13,
  ropeTheta: 500000,
  ropeScaling: {
    type: "llama3",
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 64,
  },
};

const CASES: {
  name: string;
  spec: RandomModelSpec;
  fileDtype: WeightDtype;
  gpuWeights: "f32" | "f16";
}[] = [
  { name: "llama GQA untied", spec: LLAMA_GQA, fileDtype: "F32", gpuWeights: "f32" },
  { name: "qwen2 q/k/v bias", spec: QWEN2_BIAS, fileDtype: "F32", gpuWeights: "f32" },
  { name: "llama BF16 file", spec: LLAMA_GQA, fileDtype: "BF16", gpuWeights: "f32" },
  { name: "llama3 rope scaling", spec: LLAMA3_ROPE, fileDtype: "F32", gpuWeights: "f32" },
  { name: "llama GQA, f16 weights on GPU", spec: LLAMA_GQA, fileDtype: "F32", gpuWeights: "f16" },
];

const roundToF16 = (data: Float32Array) => data.map((x) => f16ToF32(f32ToF16Bits(x)));

for (const { name, spec, fileDtype, gpuWeights } of CASES) {
  Deno.test(
    { name: `forward logits match the float64 reference: ${name}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const dir = await Deno.makeTempDir({ prefix: "mace-logits-" });
      try {
        await writeRandomHfModel(dir, spec, fileDtype);
        const source = await openModel(dir);
        const weights = new Map<string, Float32Array>();
        const isMatrix = (n: string) =>
          n.endsWith("proj.weight") || n.endsWith("embed_tokens.weight") || n === "lm_head.weight";
        for await (const t of source.tensors()) {
          // The f16 case compares with a reference on the f16-rounded matrices, so the
          // only remaining difference is f32 arithmetic and the same bound applies.
          weights.set(
            t.name,
            gpuWeights === "f16" && isMatrix(t.name) ? roundToF16(t.data) : t.data,
          );
        }
        const c = source.config;
        const reference = new ReferenceModel({ ...c, invFreq: ropeInvFreq(c) }, weights);

        // 11 prompt tokens in chunks of 4 (prefill with earlier cached context), then 5 decode
        // steps.
        const runner = await ModelRunner.create(ctx, source, {
          weightDtype: gpuWeights,
          maxSeqs: 1,
          maxTokens: 4,
          maxContext: 32,
          blockSize: 5,
        });
        const prompt = Array.from({ length: 11 }, (_, i) => (i * 37 + 5) % c.vocabSize);
        const blockTable = [3, 0, 6, 1, 2, 5, 4]; // non-contiguous on purpose
        const work = (tokens: number[], startPosition: number): SequenceWork => ({
          seqId: 0,
          tokens,
          startPosition,
          blockTable,
          sample: true,
          sampling: GREEDY,
        });
        let position = 0;
        let next = -1;
        for (let start = 0; start < prompt.length; start += 4) {
          const chunk = prompt.slice(start, start + 4);
          next = (await runner.execute({ sequences: [work(chunk, position)] })).sampled[0];
          const expected = reference.forward(chunk);
          assertClose(
            await runner.readLogits(1),
            expected.subarray((chunk.length - 1) * c.vocabSize),
            LOGITS,
            `prefill chunk at ${position}`,
          );
          position += chunk.length;
        }
        for (let i = 0; i < 5; i++) {
          const expected = reference.forward([next]);
          next = (await runner.execute({ sequences: [work([next], position++)] })).sampled[0];
          assertClose(await runner.readLogits(1), expected, LOGITS, `decode at ${position - 1}`);
        }
        runner.destroy();
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  );
}
