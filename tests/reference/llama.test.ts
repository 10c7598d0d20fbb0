/**
 * The float64 reference forward pass: it must reproduce llama2.c's golden
 * greedy text for stories260K, give the same logits however the tokens are
 * split into forward() calls, and implement the Qwen2 / GQA / untied variants
 * consistently.
 */
import assert from "node:assert/strict";
import { InvalidRequestError, ModelFormatError } from "../../src/engine/errors.ts";
import { ropeInvFreq } from "../../src/engine/model/config.ts";
import { openModel } from "../../src/engine/model/open_model.ts";
import { greedyReference, type ReferenceConfig, ReferenceModel } from "./llama.ts";
import { loadTokenizerDir } from "../../src/engine/tokenizer/tokenizer.ts";
import { randInts, randn } from "../helpers/random.ts";
import { assertClose } from "../helpers/tolerance.ts";

const DIR = new URL("../../models/stories260K", import.meta.url).pathname;
/** Float64 everywhere, the same operations in the same order: only rounding noise may differ. */
const F64 = { rtol: 1e-12 };

type Weights = Map<string, Float32Array | Float64Array>;

async function loadStories(): Promise<{ model: ReferenceModel; eosIds: number[]; bosId: number }> {
  const source = await openModel(DIR);
  const weights: Weights = new Map();
  for await (const t of source.tensors()) weights.set(t.name, t.data);
  const config = source.config;
  const model = new ReferenceModel({ ...config, invFreq: ropeInvFreq(config) }, weights);
  return { model, eosIds: config.eosTokenIds, bosId: config.bosTokenId! };
}

Deno.test("stories260K: 200 greedy steps from BOS reproduce greedy_200.txt", async () => {
  const { model, eosIds, bosId } = await loadStories();
  const tokenizer = await loadTokenizerDir(DIR);
  const generated = greedyReference(model, [bosId], 200, eosIds);
  assert.equal(generated.length, 200);
  // The file is the text plus the newline that ends its last line.
  const golden = (await Deno.readTextFile(`${DIR}/greedy_200.txt`)).replace(/\n$/, "");
  assert.equal(tokenizer.decode(generated), golden);
});

/** Logits of `tokens` fed to a fresh cache in chunks of the given sizes, concatenated [T, V]. */
function chunkedLogits(
  model: ReferenceModel,
  tokens: number[],
  chunkSizes: number[],
): Float64Array {
  model.reset();
  const parts: Float64Array[] = [];
  let at = 0;
  for (const size of chunkSizes) {
    parts.push(model.forward(tokens.slice(at, at + size)));
    at += size;
  }
  assert.equal(at, tokens.length);
  assert.equal(model.length, tokens.length);
  const out = new Float64Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

function assertIncrementalMatchesOneShot(model: ReferenceModel, tokens: number[], label: string) {
  const oneShot = chunkedLogits(model, tokens, [tokens.length]);
  assert.equal(oneShot.length, tokens.length * model.config.vocabSize);
  const oneByOne = chunkedLogits(model, tokens, tokens.map(() => 1));
  assertClose(oneByOne, oneShot, F64, `${label}: token by token`);
  // Uneven chunks, as chunked prefill then decode would feed them.
  const chunks = [5, 1, 7, tokens.length - 13];
  assertClose(chunkedLogits(model, tokens, chunks), oneShot, F64, `${label}: chunks ${chunks}`);
}

Deno.test("stories260K: incremental forward equals one-shot forward", async () => {
  const { model, eosIds, bosId } = await loadStories();
  const tokens = [bosId, ...greedyReference(model, [bosId], 40, eosIds)];
  assertIncrementalMatchesOneShot(model, tokens, "stories260K");
});

/** A random Qwen2-style model: odd sizes, 3 query heads per KV head, q width != hidden size. */
const TINY: ReferenceConfig = {
  hiddenSize: 20,
  intermediateSize: 37,
  numLayers: 2,
  numHeads: 6,
  numKvHeads: 2,
  headDim: 6,
  vocabSize: 53,
  rmsNormEps: 1e-6,
  tieWordEmbeddings: false,
  attentionBias: true,
  invFreq: Float64Array.from({ length: 3 }, (_, i) => 1e4 ** (-2 * i / 6)),
};

function tinyWeights(c: ReferenceConfig, seed: number): Weights {
  const D = c.hiddenSize,
    I = c.intermediateSize,
    q = c.numHeads * c.headDim,
    kv = c.numKvHeads * c.headDim;
  const shapes: [string, number][] = [["model.embed_tokens.weight", c.vocabSize * D], [
    "model.norm.weight",
    D,
  ]];
  if (!c.tieWordEmbeddings) shapes.push(["lm_head.weight", c.vocabSize * D]);
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`;
    shapes.push(
      [`${p}input_layernorm.weight`, D],
      [`${p}self_attn.q_proj.weight`, q * D],
      [`${p}self_attn.k_proj.weight`, kv * D],
      [`${p}self_attn.v_proj.weight`, kv * D],
      [`${p}self_attn.o_proj.weight`, D * q],
      [`${p}post_attention_layernorm.weight`, D],
      [`${p}mlp.gate_proj.weight`, I * D],
      [`${p}mlp.up_proj.weight`, I * D],
      [`${p}mlp.down_proj.weight`, D * I],
    );
    if (c.attentionBias) {
      shapes.push([`${p}self_attn.q_proj.bias`, q], [`${p}self_attn.k_proj.bias`, kv], [
        `${p}self_attn.v_proj.bias`,
        kv,
      ]);
    }
  }
  return new Map(shapes.map(([name, n], i) => [name, randn(n, seed * 1000 + i, 0.5)]));
}

const TINY_TOKENS = Array.from(randInts(23, TINY.vocabSize, 7));

function logitsOf(config: ReferenceConfig, weights: Weights): Float64Array {
  return new ReferenceModel(config, weights).forward(TINY_TOKENS);
}

Deno.test("Qwen2-style model (biases, untied head, GQA 3:1): incremental equals one-shot", () => {
  assertIncrementalMatchesOneShot(
    new ReferenceModel(TINY, tinyWeights(TINY, 1)),
    TINY_TOKENS,
    "tiny qwen2",
  );
});

Deno.test("zero q/k/v biases equal none; an untied head equal to the embeddings ties", () => {
  const weights = tinyWeights(TINY, 2);
  const zeroBias = new Map(weights);
  for (const name of weights.keys()) {
    if (name.endsWith(".bias")) zeroBias.set(name, new Float32Array(weights.get(name)!.length));
  }
  const noBias = new Map([...weights].filter(([name]) => !name.endsWith(".bias")));
  assertClose(
    logitsOf({ ...TINY, attentionBias: false }, noBias),
    logitsOf(TINY, zeroBias),
    F64,
    "biases",
  );
  const withBias = logitsOf(TINY, weights);
  assert.ok(Math.abs(withBias[0] - logitsOf(TINY, zeroBias)[0]) > 1e-6, "biases change the logits");

  const untied = new Map(weights);
  untied.set("lm_head.weight", weights.get("model.embed_tokens.weight")!);
  const tied = new Map(weights);
  tied.delete("lm_head.weight");
  assertClose(
    logitsOf({ ...TINY, tieWordEmbeddings: true }, tied),
    logitsOf(TINY, untied),
    F64,
    "tied head",
  );
});

Deno.test("grouped-query attention equals multi-head attention with each KV head repeated", () => {
  // Query head h reads KV head floor(h / group): copying KV head j's k/v rows to
  // heads j*group .. j*group+group-1 of an H-KV-head model must change nothing.
  const weights = tinyWeights(TINY, 3);
  const group = TINY.numHeads / TINY.numKvHeads, d = TINY.headDim, D = TINY.hiddenSize;
  const repeated = new Map(weights);
  for (let l = 0; l < TINY.numLayers; l++) {
    for (const proj of ["k_proj", "v_proj"]) {
      const w = weights.get(`model.layers.${l}.self_attn.${proj}.weight`)!;
      const b = weights.get(`model.layers.${l}.self_attn.${proj}.bias`)!;
      const wOut = new Float32Array(TINY.numHeads * d * D);
      const bOut = new Float32Array(TINY.numHeads * d);
      for (let h = 0; h < TINY.numHeads; h++) {
        const src = Math.floor(h / group);
        wOut.set(w.subarray(src * d * D, (src + 1) * d * D), h * d * D);
        bOut.set(b.subarray(src * d, (src + 1) * d), h * d);
      }
      repeated.set(`model.layers.${l}.self_attn.${proj}.weight`, wOut);
      repeated.set(`model.layers.${l}.self_attn.${proj}.bias`, bOut);
    }
  }
  assertClose(
    logitsOf({ ...TINY, numKvHeads: TINY.numHeads }, repeated),
    logitsOf(TINY, weights),
    F64,
    "GQA",
  );
});

Deno.test("greedy decoding stops after an EOS id and includes it", async () => {
  const { model, bosId } = await loadStories();
  const free = greedyReference(model, [bosId], 12, []);
  const stopAt = free[4];
  const firstStop = free.indexOf(stopAt);
  assert.deepEqual(greedyReference(model, [bosId], 12, [stopAt]), free.slice(0, firstStop + 1));
  assert.throws(() => greedyReference(model, [], 5, []), InvalidRequestError);
});

Deno.test("bad weights, configs and tokens are rejected with named errors", () => {
  const weights = tinyWeights(TINY, 4);
  const missing = new Map(weights);
  missing.delete("model.layers.1.mlp.up_proj.weight");
  assert.throws(() => new ReferenceModel(TINY, missing), (e: unknown) => {
    assert.ok(e instanceof ModelFormatError);
    assert.equal(e.tensor, "model.layers.1.mlp.up_proj.weight");
    return true;
  });
  const wrongSize = new Map(weights);
  wrongSize.set("model.norm.weight", new Float32Array(3));
  assert.throws(() => new ReferenceModel(TINY, wrongSize), /has 3 values, expected 20/);
  assert.throws(() => new ReferenceModel({ ...TINY, numKvHeads: 4 }, weights), ModelFormatError);
  assert.throws(
    () => new ReferenceModel({ ...TINY, invFreq: new Float64Array(2) }, weights),
    ModelFormatError,
  );

  const model = new ReferenceModel(TINY, weights);
  assert.throws(() => model.forward([0, TINY.vocabSize]), InvalidRequestError);
});
