/**
 * The GPU DPO trainer end to end on random-weight tiny models (Llama with GQA and untied head;
 * Qwen2 with q/k/v biases and tied embeddings), adapters with non-zero A and B on every target:
 *  - its accumulated LoRA gradient matches the float64 CPU reference (rtol 1e-3 of each
 *    tensor's scale) and central finite differences of its own float32 DPO loss (relative
 *    error < 1e-2 per tensor, the bound);
 *  - its loss and log-probs match the reference;
 *  - one SGD step without clipping writes exactly init - lr * grad (checked against the
 *    reference gradient), and sliced training gives bit-identical parameters to unsliced.
 */
import assert from "node:assert/strict";
import { openModel } from "../../src/engine/model/open_model.ts";
import { type RandomModelSpec, writeRandomHfModel } from "../../src/engine/model/random_model.ts";
import { type ModelConfig, ropeInvFreq } from "../../src/engine/model/config.ts";
import { uploadWeights } from "../../src/engine/model/gpu_weights.ts";
import type { LoraConfig, LoraTarget, LoraWeights } from "../../src/engine/lora/lora.ts";
import { targetShape } from "../../src/engine/lora/lora.ts";
import { dpoLossAndGrad, LoraDpoReference } from "../reference/lora_dpo.ts";
import { DpoTrainer, type TrainingPair } from "../../src/engine/training/dpo_trainer.ts";
import { gpuTest, testBackend, testContext } from "../helpers/gpu.ts";
import { assertClose, maxRelativeError, type Tolerance } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";

/**
 * f32 GPU gradient vs the float64 reference: 1e-4 of each tensor's scale, two orders tighter
 * than the finite-difference bound (measured errors are 2e-7..3e-6 on these models).
 */
const GRADIENT: Tolerance = { rtol: 1e-4 };

/**
 * Finite-difference check of one tensor's gradient g: directional derivatives of the f32 loss
 * along d = g/|g| and along a random unit direction, by central differences. Probing whole
 * directions gives the largest signal (|g|) against the loss's f32 round-off (~1e-6). The step
 * moves the loss by about 1e-3 (h = 1e-3 / |g|, at most 0.2): small enough that the loss is
 * nearly linear over it, large enough that round-off stays ~1e-3 of |g|. Returns
 * max |FD - g.d| / |g| over both directions: the tensor's relative error.
 */
async function directionalError(
  g: Float32Array,
  lossAlong: (direction: Float64Array, step: number) => Promise<number>,
  seed: number,
): Promise<{ relative: number; detail: string }> {
  const norm = Math.hypot(...g);
  const random = randn(g.length, seed);
  const randomNorm = Math.hypot(...random);
  const directions = [
    Float64Array.from(g, (x) => x / norm),
    Float64Array.from(random, (x) => x / randomNorm),
  ];
  let relative = 0;
  const parts: string[] = [];
  for (const d of directions) {
    const central = async (h: number) =>
      ((await lossAlong(d, h)) - (await lossAlong(d, -h))) / (2 * h);
    const fd = await central(Math.min(0.2, 1e-3 / norm));
    const exact = d.reduce((sum, x, i) => sum + x * g[i], 0);
    relative = Math.max(relative, Math.abs(fd - exact) / norm);
    parts.push(`fd ${fd.toExponential(4)} vs g.d ${exact.toExponential(4)}`);
  }
  return { relative, detail: `${parts.join("; ")}; |g| ${norm.toExponential(3)}` };
}

/** A copy of `w` with one tensor moved by step * direction. */
function moved(
  w: LoraWeights,
  layer: number,
  target: LoraTarget,
  m: "a" | "b",
  direction: Float64Array,
  step: number,
) {
  const copy = structuredClone(w);
  const values = copy.layers[layer][target]![m];
  for (let i = 0; i < values.length; i++) values[i] += step * direction[i];
  return copy;
}

const LLAMA_GQA: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 24,
  intermediateSize: 40,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 8,
  vocabSize: 67,
  tieWordEmbeddings: false,
  seed: 21,
};
const QWEN2_BIAS: RandomModelSpec = {
  architecture: "qwen2",
  hiddenSize: 20,
  intermediateSize: 36,
  numLayers: 2,
  numHeads: 5,
  numKvHeads: 1,
  vocabSize: 71,
  tieWordEmbeddings: true,
  seed: 22,
  bosTokenId: 1,
  eosTokenIds: [2],
};
const ALL_TARGETS: LoraTarget[] = ["q", "k", "v", "o", "gate", "up", "down"];

function randomAdapter(model: ModelConfig, config: LoraConfig, seed: number): LoraWeights {
  return {
    config,
    layers: Array.from({ length: model.numLayers }, (_, l) => {
      const row: LoraWeights["layers"][number] = {};
      config.targets.forEach((t, i) => {
        const s = targetShape(model, t);
        row[t] = {
          a: randn(config.rank * s.in, seed + 100 * l + 10 * i, 0.1),
          b: randn(s.out * config.rank, seed + 100 * l + 10 * i + 1, 0.1),
        };
      });
      return row;
    }),
  };
}

/** A pair sharing a 5-token prompt, responses of 4 and 6 tokens (last = EOS 2). */
function testPair(vocab: number, seed: number): TrainingPair {
  const ids = (n: number, s: number) =>
    Array.from({ length: n }, (_, i) => 3 + ((i * 17 + s * 29) % (vocab - 3)));
  return {
    prompt: [1, ...ids(4, seed)],
    chosen: [...ids(3, seed + 1), 2],
    rejected: [...ids(5, seed + 2), 2],
  };
}

async function setUp(spec: RandomModelSpec, lora: LoraConfig) {
  const ctx = await testContext();
  const dir = await Deno.makeTempDir({ prefix: "mace-dpo-" });
  await writeRandomHfModel(dir, spec, "F32");
  const source = await openModel(dir);
  const host = new Map<string, Float32Array>();
  for await (const t of source.tensors()) host.set(t.name, t.data);
  const weights = await uploadWeights(ctx, source, "f32");
  const config = source.config;
  const reference = new LoraDpoReference({ ...config, invFreq: ropeInvFreq(config) }, host);
  await Deno.remove(dir, { recursive: true });
  const newTrainer = (options: ConstructorParameters<typeof DpoTrainer>[4]) =>
    new DpoTrainer(ctx, config, weights, lora, { maxLength: 16, ...options });
  return { config, reference, newTrainer };
}

const CASES = [
  {
    name: "llama GQA untied, all targets",
    spec: LLAMA_GQA,
    lora: { rank: 3, alpha: 5, targets: ALL_TARGETS, dropout: 0 },
  },
  {
    name: "qwen2 biases tied, q and v",
    spec: QWEN2_BIAS,
    lora: { rank: 2, alpha: 4, targets: ["q", "v"] as LoraTarget[], dropout: 0 },
  },
];

for (const { name, spec, lora } of CASES) {
  Deno.test({
    name: `DPO LoRA gradient matches the float64 reference and finite differences: ${name}`,
    ...gpuTest,
  }, async () => {
    const { config, reference, newTrainer } = await setUp(spec, lora);
    const beta = 0.7;
    const trainer = newTrainer({ beta });
    const adapter = randomAdapter(config, lora, spec.seed);
    trainer.load(adapter);
    const pair = testPair(config.vocabSize, spec.seed);
    const refPair = {
      chosen: [...pair.prompt, ...pair.chosen],
      rejected: [...pair.prompt, ...pair.rejected],
      promptLength: pair.prompt.length,
    };
    const expected = dpoLossAndGrad(reference, adapter, refPair, beta);

    const [stats] = await trainer.accumulateGradients([pair]);
    assertClose(
      [stats.loss, stats.chosenLogp, stats.rejectedLogp],
      [
        expected.loss,
        expected.policyChosen,
        expected.policyRejected,
      ],
      { rtol: 1e-4 },
      "loss and log-probs",
    );
    const grads = await trainer.params.readGrads();
    let worstReference = 0, worstFd = 0;
    for (let l = 0; l < config.numLayers; l++) {
      for (const t of lora.targets) {
        for (const m of ["a", "b"] as const) {
          assertClose(
            grads.layers[l][t]![m],
            expected.grads.layers[l][t]![m],
            GRADIENT,
            `layer ${l} ${t}.${m}`,
          );
          const { relative } = maxRelativeError(
            grads.layers[l][t]![m],
            expected.grads.layers[l][t]![m],
          );
          worstReference = Math.max(worstReference, relative);
        }
      }
    }

    // Finite differences of the GPU's own f32 loss, every tensor. On wgpu only: Dawn's readback
    // spin starves SwiftShader (4 readbacks per tensor took 12 minutes there); Dawn's gradient is
    // held to the float64 reference above, at 1e-4.
    const lossAt = async (w: LoraWeights) => {
      trainer.load(w);
      return (await trainer.evaluate([pair])).loss;
    };
    for (let l = 0; l < (testBackend() === "wgpu" ? config.numLayers : 0); l++) {
      for (const t of lora.targets) {
        for (const m of ["a", "b"] as const) {
          const { relative, detail } = await directionalError(
            grads.layers[l][t]![m],
            (d, step) => lossAt(moved(adapter, l, t, m, d, step)),
            7 * l + 3,
          );
          assert.ok(
            relative < 1e-2,
            `layer ${l} ${t}.${m}: relative error ${relative.toExponential(2)} (${detail})`,
          );
          worstFd = Math.max(worstFd, relative);
        }
      }
    }
    console.log(
      `worst relative error per tensor: vs float64 reference ${worstReference.toExponential(2)}` +
        (testBackend() === "wgpu" ? `, vs finite differences ${worstFd.toExponential(2)}` : ""),
    );
    trainer.destroy();
  });
}

Deno.test({
  name: "one SGD step without clipping writes init - lr * grad; sliced equals unsliced",
  ...gpuTest,
}, async () => {
  const lora: LoraConfig = { rank: 3, alpha: 6, targets: ALL_TARGETS, dropout: 0 };
  const { config, reference, newTrainer } = await setUp(LLAMA_GQA, lora);
  const adapter = randomAdapter(config, lora, 5);
  const pair = testPair(config.vocabSize, 9);
  const lr = 0.05, beta = 0.3;
  const expected = dpoLossAndGrad(reference, adapter, {
    chosen: [...pair.prompt, ...pair.chosen],
    rejected: [...pair.prompt, ...pair.rejected],
    promptLength: pair.prompt.length,
  }, beta);

  const unsliced = newTrainer({ optimizer: "sgd", learningRate: lr, maxGradNorm: 0, beta });
  unsliced.load(adapter);
  await unsliced.step([pair]);
  const after = await unsliced.params.read();
  for (let l = 0; l < config.numLayers; l++) {
    for (const t of lora.targets) {
      for (const m of ["a", "b"] as const) {
        const init = adapter.layers[l][t]![m];
        const want = init.map((x, i) => x - lr * expected.grads.layers[l][t]![m][i]);
        // The update's error is lr times the gradient's: scale the gradient tolerance by the step.
        const stepScale = Math.max(...expected.grads.layers[l][t]![m].map(Math.abs)) * lr;
        assertClose(after.layers[l][t]![m], want, {
          rtol: 0,
          atol: GRADIENT.rtol * stepScale + 1e-7,
        }, `layer ${l} ${t}.${m}`);
      }
    }
  }

  // AdamW over two steps of two pairs: one backward slice per layer vs all layers at once.
  const pairs = [pair, testPair(config.vocabSize, 13)];
  const run = async (layersPerSlice: number) => {
    const trainer = newTrainer({ optimizer: "adamw", learningRate: 0.01, beta });
    trainer.load(adapter);
    await trainer.step(pairs, layersPerSlice);
    await trainer.step(pairs, layersPerSlice);
    const out = await trainer.params.read();
    trainer.destroy();
    return out;
  };
  const whole = await run(config.numLayers), sliced = await run(1);
  for (let l = 0; l < config.numLayers; l++) {
    for (const t of lora.targets) {
      for (const m of ["a", "b"] as const) {
        assert.deepEqual(sliced.layers[l][t]![m], whole.layers[l][t]![m], `layer ${l} ${t}.${m}`);
      }
    }
  }
  unsliced.destroy();
});

// wgpu only, like the finite differences above (Dawn's readback spin); the dropout kernel itself
// is tested on both backends (tests/kernels/lora_dropout.gpu.test.ts).
Deno.test({
  name: "with LoRA dropout the gradient matches finite differences of the training loss",
  ignore: testBackend() !== "wgpu",
  ...gpuTest,
}, async () => {
  const lora: LoraConfig = { rank: 2, alpha: 4, targets: ["q", "o", "down"], dropout: 0.3 };
  const { config, newTrainer } = await setUp(LLAMA_GQA, lora);
  const trainer = newTrainer({ beta: 0.5 });
  const adapter = randomAdapter(config, lora, 31);
  const pair = testPair(config.vocabSize, 4);
  // The same seed and step give the same masks, so the training loss is a function of the weights.
  const training = async (w: LoraWeights) => {
    trainer.load(w, 77);
    return (await trainer.accumulateGradients([pair]))[0].loss;
  };
  const plain = await trainer.evaluate([pair]);
  const loss = await training(adapter);
  assert.notEqual(loss, plain.loss, "dropout must change the training loss");
  const grads = await trainer.params.readGrads();
  for (let l = 0; l < config.numLayers; l++) {
    for (const t of lora.targets) {
      for (const m of ["a", "b"] as const) {
        const { relative, detail } = await directionalError(
          grads.layers[l][t]![m],
          (d, step) => training(moved(adapter, l, t, m, d, step)),
          5 * l + 1,
        );
        assert.ok(
          relative < 1e-2,
          `layer ${l} ${t}.${m}: relative error ${relative.toExponential(2)} (${detail})`,
        );
      }
    }
  }
  trainer.destroy();
});
