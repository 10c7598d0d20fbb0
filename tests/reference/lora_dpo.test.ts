/**
 * The float64 LoRA DPO reference: its analytic adapter gradient must match central finite
 * differences of its loss, its adapted forward must equal the base reference run on merged
 * weights W + scale·B·A, and a zero-B adapter (policy = reference) must give loss log 2.
 */
import assert from "node:assert/strict";
import { InvalidRequestError, ModelFormatError } from "../../src/engine/errors.ts";
import {
  LORA_TARGETS,
  type LoraConfig,
  loraScale,
  type LoraTarget,
  type LoraWeights,
  targetModule,
} from "../../src/engine/lora/lora.ts";
import { type ReferenceConfig, ReferenceModel } from "./llama.ts";
import {
  type Adapter,
  dpoLossAndGrad,
  LoraDpoReference,
  perturbAdapter,
  type PreferencePair,
  sequenceLogprob,
} from "./lora_dpo.ts";
import { randInts, randn, rng } from "../helpers/random.ts";

type Weights = Map<string, Float32Array | Float64Array>;

const invFreq = (headDim: number) =>
  Float64Array.from({ length: headDim / 2 }, (_, i) => 1e4 ** (-2 * i / headDim));

/** Llama with GQA 2:1, untied head; q width 24 != hidden 16 so transposition slips show. */
const LLAMA: ReferenceConfig = {
  hiddenSize: 16,
  intermediateSize: 24,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 6,
  vocabSize: 37,
  rmsNormEps: 1e-5,
  tieWordEmbeddings: false,
  attentionBias: false,
  invFreq: invFreq(6),
};

/** Qwen2-like: q/k/v biases, tied embeddings, as many kv heads as query heads. */
const QWEN2: ReferenceConfig = {
  hiddenSize: 12,
  intermediateSize: 20,
  numLayers: 2,
  numHeads: 3,
  numKvHeads: 3,
  headDim: 4,
  vocabSize: 29,
  rmsNormEps: 1e-6,
  tieWordEmbeddings: true,
  attentionBias: true,
  invFreq: invFreq(4),
};

/** [out, in] of each target's projection. */
function shapeOf(c: ReferenceConfig, target: LoraTarget): { in: number; out: number } {
  const D = c.hiddenSize, I = c.intermediateSize;
  const q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  return {
    q: { in: D, out: q },
    k: { in: D, out: kv },
    v: { in: D, out: kv },
    o: { in: q, out: D },
    gate: { in: D, out: I },
    up: { in: D, out: I },
    down: { in: I, out: D },
  }[target];
}

/** HF weight name of a target's projection matrix. */
const weightName = (layer: number, target: LoraTarget) => `${targetModule(layer, target)}.weight`;

/** Random weights: norms 1 + N(0, 0.1), matrices N(0, 0.4), biases N(0, 0.2). */
function randomWeights(c: ReferenceConfig, seed: number): Weights {
  const D = c.hiddenSize, V = c.vocabSize;
  const weights: Weights = new Map();
  let s = seed * 1000;
  const norm = () => randn(D, s++, 0.1).map((x) => 1 + x);
  weights.set("model.embed_tokens.weight", randn(V * D, s++, 0.4));
  if (!c.tieWordEmbeddings) weights.set("lm_head.weight", randn(V * D, s++, 0.4));
  weights.set("model.norm.weight", norm());
  for (let l = 0; l < c.numLayers; l++) {
    weights.set(`model.layers.${l}.input_layernorm.weight`, norm());
    weights.set(`model.layers.${l}.post_attention_layernorm.weight`, norm());
    for (const target of LORA_TARGETS) {
      const { in: inF, out } = shapeOf(c, target);
      weights.set(weightName(l, target), randn(out * inF, s++, 0.4));
    }
    if (c.attentionBias) {
      for (const target of ["q", "k", "v"] as const) {
        const bias = randn(shapeOf(c, target).out, s++, 0.2);
        weights.set(`${targetModule(l, target)}.bias`, bias);
      }
    }
  }
  return weights;
}

/** An adapter with random A [rank, in] and B [out, rank] (B zero when bStd is 0). */
function randomAdapter(
  c: ReferenceConfig,
  config: LoraConfig,
  seed: number,
  bStd = 0.2,
): LoraWeights {
  let s = seed * 1000;
  return {
    config,
    layers: Array.from({ length: c.numLayers }, () => {
      const pairs: LoraWeights["layers"][number] = {};
      for (const target of config.targets) {
        const { in: inF, out } = shapeOf(c, target);
        pairs[target] = {
          a: randn(config.rank * inF, s++, 0.2),
          b: bStd === 0 ? new Float32Array(out * config.rank) : randn(out * config.rank, s++, bStd),
        };
      }
      return pairs;
    }),
  };
}

const ALL_TARGETS: LoraConfig = { rank: 3, alpha: 5, targets: [...LORA_TARGETS], dropout: 0 };
const QV_ONLY: LoraConfig = { rank: 2, alpha: 7, targets: ["q", "v"], dropout: 0 };

/** Prompt of 4 tokens, chosen response 5 tokens, rejected response 3 tokens. */
function randomPair(V: number, seed: number): PreferencePair {
  const t = Array.from(randInts(12, V, seed));
  const prompt = t.slice(0, 4);
  return {
    chosen: [...prompt, ...t.slice(4, 9)],
    rejected: [...prompt, ...t.slice(9)],
    promptLength: 4,
  };
}

/**
 * Central differences (h = 1e-5) of the loss at 10 random entries of every A and B, against
 * the analytic gradient. Truncation error ~h²·|L'''| and rounding ~1e-16/h keep the
 * difference near 1e-10 of the gradient's scale; 1e-6 leaves room for curvature.
 */
function checkGradient(c: ReferenceConfig, adapter: Adapter, seed: number) {
  const model = new LoraDpoReference(c, randomWeights(c, seed));
  const pair = randomPair(c.vocabSize, seed);
  const beta = 0.7;
  const result = dpoLossAndGrad(model, adapter, pair, beta);
  const ref = { chosen: result.refChosen, rejected: result.refRejected };
  assert.ok(Math.abs(result.margin) > 1e-3, "a non-trivial margin (loss away from log 2)");
  const h = 1e-5;
  const pick = rng(seed);
  adapter.layers.forEach((pairs, layer) => {
    for (const target of adapter.config.targets) {
      for (const matrix of ["a", "b"] as const) {
        const grad = result.grads.layers[layer][target]![matrix];
        assert.equal(grad.length, pairs[target]![matrix].length);
        const scale = grad.reduce((m, g) => Math.max(m, Math.abs(g)), 0);
        assert.ok(scale > 0, `${layer}.${target}.${matrix}: zero gradient`);
        for (let n = 0; n < 10; n++) {
          const index = Math.floor(pick() * grad.length);
          const entry = { layer, target, matrix, index };
          const up = dpoLossAndGrad(model, perturbAdapter(adapter, entry, h), pair, beta, ref);
          const down = dpoLossAndGrad(model, perturbAdapter(adapter, entry, -h), pair, beta, ref);
          const numeric = (up.loss - down.loss) / (2 * h);
          const error = Math.abs(numeric - grad[index]) / scale;
          assert.ok(
            error < 1e-6,
            `layer ${layer} ${target}.${matrix}[${index}]: analytic ${grad[index]}, ` +
              `numeric ${numeric}, error ${error.toExponential(2)} of max |grad| ${scale}`,
          );
        }
      }
    }
  });
}

Deno.test("LoRA DPO gradient matches finite differences: Llama GQA, all seven targets", () => {
  checkGradient(LLAMA, randomAdapter(LLAMA, ALL_TARGETS, 11), 1);
});

Deno.test("LoRA DPO gradient matches finite differences: Llama GQA, q and v only", () => {
  checkGradient(LLAMA, randomAdapter(LLAMA, QV_ONLY, 12), 2);
});

Deno.test("LoRA DPO gradient matches finite differences: Qwen2 biases, tied head", () => {
  checkGradient(QWEN2, randomAdapter(QWEN2, ALL_TARGETS, 13), 3);
});

/** Base weights with every adapted W replaced by W + scale · B A (float64). */
function mergedWeights(c: ReferenceConfig, base: Weights, adapter: LoraWeights): Weights {
  const merged = new Map(base);
  const { rank } = adapter.config, scale = loraScale(adapter.config);
  adapter.layers.forEach((pairs, layer) => {
    for (const target of adapter.config.targets) {
      const { a, b } = pairs[target]!;
      const { in: inF, out } = shapeOf(c, target);
      const w = Float64Array.from(base.get(weightName(layer, target))!);
      for (let o = 0; o < out; o++) {
        for (let i = 0; i < inF; i++) {
          let ba = 0;
          for (let r = 0; r < rank; r++) ba += b[o * rank + r] * a[r * inF + i];
          w[o * inF + i] += scale * ba;
        }
      }
      merged.set(weightName(layer, target), w);
    }
  });
  return merged;
}

/** Σ_{t ≥ start} log softmax(logits[t−1])[tokens[t]] from ReferenceModel logits [T, V]. */
function logprobFromLogits(logits: Float64Array, tokens: number[], start: number, V: number) {
  let total = 0;
  for (let t = start; t < tokens.length; t++) {
    const row = logits.subarray((t - 1) * V, t * V);
    const max = Math.max(...row);
    const logZ = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
    total += row[tokens[t]] - logZ;
  }
  return total;
}

Deno.test("sequenceLogprob with an adapter equals ReferenceModel on merged weights", () => {
  const cases: [ReferenceConfig, LoraConfig][] = [
    [LLAMA, ALL_TARGETS],
    [LLAMA, QV_ONLY],
    [QWEN2, ALL_TARGETS],
  ];
  cases.forEach(([c, loraConfig], n) => {
    const base = randomWeights(c, 20 + n);
    const adapter = randomAdapter(c, loraConfig, 30 + n);
    const tokens = Array.from(randInts(9, c.vocabSize, 40 + n));
    const model = new LoraDpoReference(c, base);
    for (
      const [weights, lora] of [[base, null], [mergedWeights(c, base, adapter), adapter]] as const
    ) {
      const logits = new ReferenceModel(c, weights).forward(tokens);
      const expected = logprobFromLogits(logits, tokens, 3, c.vocabSize);
      const actual = sequenceLogprob(model, lora, tokens, 3);
      assert.ok(
        Math.abs(actual - expected) < 1e-10,
        `case ${n} (${lora ? "adapter" : "base"}): ${actual} vs merged ${expected}`,
      );
    }
    assert.notEqual(
      sequenceLogprob(model, adapter, tokens, 3),
      sequenceLogprob(model, null, tokens, 3),
    );
  });
});

Deno.test("a zero-B adapter gives loss log 2, margin 0 and gradient only on B", () => {
  const adapter = randomAdapter(LLAMA, ALL_TARGETS, 50, 0);
  const model = new LoraDpoReference(LLAMA, randomWeights(LLAMA, 51));
  const result = dpoLossAndGrad(model, adapter, randomPair(LLAMA.vocabSize, 52), 0.3);
  assert.ok(Math.abs(result.loss - Math.LN2) < 1e-14, `loss ${result.loss}`);
  assert.equal(result.margin, 0);
  assert.equal(result.policyChosen, result.refChosen);
  assert.equal(result.policyRejected, result.refRejected);
  for (const pairs of result.grads.layers) {
    for (const target of ALL_TARGETS.targets) {
      assert.ok(pairs[target]!.a.every((g) => g === 0), `${target}: dA is zero when B is zero`);
      assert.ok(pairs[target]!.b.some((g) => g !== 0), `${target}: dB is not zero`);
    }
  }
});

Deno.test("bad pairs, tokens and adapters are rejected with named errors", () => {
  const model = new LoraDpoReference(QWEN2, randomWeights(QWEN2, 60));
  const adapter = randomAdapter(QWEN2, QV_ONLY, 61);
  const pair = randomPair(QWEN2.vocabSize, 62);
  const differentPrompt = { ...pair, rejected: [pair.rejected[0] + 1, ...pair.rejected.slice(1)] };
  assert.throws(() => dpoLossAndGrad(model, adapter, differentPrompt, 0.1), InvalidRequestError);
  assert.throws(
    () => dpoLossAndGrad(model, adapter, { ...pair, promptLength: 0 }, 0.1),
    InvalidRequestError,
  );
  assert.throws(
    () => sequenceLogprob(model, adapter, pair.chosen, pair.chosen.length),
    InvalidRequestError,
  );
  assert.throws(() => sequenceLogprob(model, null, [0, QWEN2.vocabSize], 1), InvalidRequestError);
  const short = {
    ...adapter,
    layers: adapter.layers.map((p) => ({ ...p, v: { a: p.v!.a, b: p.v!.b.subarray(1) } })),
  };
  assert.throws(() => sequenceLogprob(model, short, pair.chosen, 4), (e: unknown) => {
    assert.ok(e instanceof ModelFormatError);
    assert.equal(e.tensor, "model.layers.0.self_attn.v_proj.lora_B.weight");
    return true;
  });
  assert.throws(
    () => perturbAdapter(adapter, { layer: 0, target: "o", matrix: "a", index: 0 }, 1e-5),
    InvalidRequestError,
  );
});
