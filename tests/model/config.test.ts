import assert from "node:assert/strict";
import { ModelFormatError } from "../../src/engine/errors.ts";
import {
  expectedTensors,
  hfConfigJson,
  type ModelConfig,
  parameterCount,
  parseHfConfig,
  ropeInvFreq,
} from "../../src/engine/model/config.ts";

const LLAMA32_1B_INSTRUCT = {
  architectures: ["LlamaForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  head_dim: 64,
  hidden_act: "silu",
  hidden_size: 2048,
  initializer_range: 0.02,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: "llama",
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  pretraining_tp: 1,
  rms_norm_eps: 1e-05,
  rope_scaling: {
    factor: 32.0,
    high_freq_factor: 4.0,
    low_freq_factor: 1.0,
    original_max_position_embeddings: 8192,
    rope_type: "llama3",
  },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  use_cache: true,
  vocab_size: 128256,
};

const QWEN25_05B_INSTRUCT = {
  architectures: ["Qwen2ForCausalLM"],
  attention_dropout: 0.0,
  bos_token_id: 151643,
  eos_token_id: 151645,
  hidden_act: "silu",
  hidden_size: 896,
  initializer_range: 0.02,
  intermediate_size: 4864,
  max_position_embeddings: 32768,
  max_window_layers: 21,
  model_type: "qwen2",
  num_attention_heads: 14,
  num_hidden_layers: 24,
  num_key_value_heads: 2,
  rms_norm_eps: 1e-06,
  rope_theta: 1000000.0,
  sliding_window: 32768,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

function assertFormatError(fn: () => unknown, file: string, pattern: RegExp) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ModelFormatError, `expected ModelFormatError, got ${e}`);
    assert.equal(e.file, file);
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("config: bundled stories260K config.json", async () => {
  const json = JSON.parse(await Deno.readTextFile("models/stories260K/config.json"));
  const c = parseHfConfig(json, "config.json");
  const expected: ModelConfig = {
    architecture: "llama",
    hiddenSize: 64,
    intermediateSize: 172,
    numLayers: 5,
    numHeads: 8,
    numKvHeads: 4,
    headDim: 8,
    vocabSize: 512,
    maxPositionEmbeddings: 512,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    tieWordEmbeddings: true,
    attentionBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
  };
  assert.deepEqual(c, expected);
  // hfConfigJson writes the same fields back.
  assert.deepEqual(hfConfigJson(c), json);
  assert.equal(parameterCount(c), 260032);
});

Deno.test("config: Llama-3.2-1B-Instruct (head_dim given, eos list, llama3 rope scaling)", () => {
  const c = parseHfConfig(LLAMA32_1B_INSTRUCT, "c.json");
  assert.equal(c.headDim, 64);
  assert.deepEqual(c.eosTokenIds, [128001, 128008, 128009]);
  assert.equal(c.bosTokenId, 128000);
  assert.deepEqual(c.ropeScaling, {
    type: "llama3",
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  });
  assert.equal(c.tieWordEmbeddings, true);
  assert.equal(parameterCount(c), 1_235_814_400); // the published parameter count of Llama-3.2-1B
  // The older "type" key works too, and round-trips through hfConfigJson.
  const { rope_type: _, ...rest } = LLAMA32_1B_INSTRUCT.rope_scaling;
  const c2 = parseHfConfig(
    { ...LLAMA32_1B_INSTRUCT, rope_scaling: { ...rest, type: "llama3" } },
    "c.json",
  );
  assert.deepEqual(c2, c);
  assert.deepEqual(parseHfConfig(hfConfigJson(c), "x"), c);
});

Deno.test("config: Qwen2.5-0.5B-Instruct (biases, tie from config, defaults)", () => {
  const c = parseHfConfig(QWEN25_05B_INSTRUCT, "q.json");
  assert.equal(c.architecture, "qwen2");
  assert.equal(c.headDim, 64);
  assert.equal(c.attentionBias, true);
  assert.equal(c.tieWordEmbeddings, true);
  assert.deepEqual(c.eosTokenIds, [151645]);
  assert.equal(c.rmsNormEps, 1e-6);
  assert.equal(parameterCount(c), 494_032_768); // Qwen2.5-0.5B's published count
  const names = expectedTensors(c).map((t) => t.name);
  assert.ok(names.includes("model.layers.0.self_attn.q_proj.bias"));
  assert.ok(!names.includes("lm_head.weight"));
  // Without tie_word_embeddings, Qwen2 (like Llama) defaults to an untied lm_head.
  const { tie_word_embeddings: _, ...untied } = QWEN25_05B_INSTRUCT;
  const u = parseHfConfig(untied, "q.json");
  assert.equal(u.tieWordEmbeddings, false);
  assert.deepEqual(expectedTensors(u).at(-1), { name: "lm_head.weight", shape: [151936, 896] });
  assert.deepEqual(parseHfConfig(hfConfigJson(c), "x"), c);
});

Deno.test("config: defaults (kv heads = heads, head_dim = hidden/heads, llama bos/eos)", () => {
  const c = parseHfConfig({
    architectures: ["LlamaForCausalLM"],
    hidden_size: 96,
    intermediate_size: 200,
    num_hidden_layers: 2,
    num_attention_heads: 6,
    vocab_size: 100,
  }, "c.json");
  assert.equal(c.numKvHeads, 6);
  assert.equal(c.headDim, 16);
  assert.equal(c.ropeTheta, 10000);
  assert.equal(c.rmsNormEps, 1e-6);
  assert.equal(c.bosTokenId, 1);
  assert.deepEqual(c.eosTokenIds, [2]);
  assert.equal(c.tieWordEmbeddings, false);
  assert.equal(c.attentionBias, false);
  assert.equal(c.maxPositionEmbeddings, 2048);
  // model_type alone is enough when "architectures" is absent.
  assert.equal(
    parseHfConfig({
      model_type: "qwen2",
      hidden_size: 64,
      intermediate_size: 8,
      num_hidden_layers: 1,
      num_attention_heads: 4,
      vocab_size: 10,
    }, "c").architecture,
    "qwen2",
  );
});

Deno.test("config: errors name the file and say what is supported", () => {
  assertFormatError(
    () =>
      parseHfConfig(
        { ...LLAMA32_1B_INSTRUCT, architectures: ["MistralForCausalLM"] },
        "dir/config.json",
      ),
    "dir/config.json",
    /unknown architecture MistralForCausalLM; supported: LlamaForCausalLM, Qwen2ForCausalLM/,
  );
  assertFormatError(
    () =>
      parseHfConfig(
        { ...LLAMA32_1B_INSTRUCT, rope_scaling: { rope_type: "yarn", factor: 4 } },
        "c.json",
      ),
    "c.json",
    /rope_scaling type "yarn" is not supported/,
  );
  assertFormatError(
    () =>
      parseHfConfig(
        { ...LLAMA32_1B_INSTRUCT, rope_scaling: { type: "linear", factor: 4 } },
        "c.json",
      ),
    "c.json",
    /"linear" is not supported/,
  );
  assertFormatError(
    () => parseHfConfig({ ...LLAMA32_1B_INSTRUCT, hidden_size: undefined }, "c.json"),
    "c.json",
    /hidden_size/,
  );
  assertFormatError(
    () => parseHfConfig({ ...LLAMA32_1B_INSTRUCT, num_key_value_heads: 7 }, "c.json"),
    "c.json",
    /multiple/,
  );
  assertFormatError(
    () => parseHfConfig({ ...LLAMA32_1B_INSTRUCT, hidden_act: "gelu" }, "c.json"),
    "c.json",
    /silu/,
  );
  assertFormatError(
    () => parseHfConfig({ ...LLAMA32_1B_INSTRUCT, eos_token_id: "x" }, "c.json"),
    "c.json",
    /eos_token_id/,
  );
  assertFormatError(() => parseHfConfig([], "c.json"), "c.json", /object/);
});

Deno.test("ropeInvFreq: plain theta^(-2i/d)", () => {
  const c = parseHfConfig({ ...QWEN25_05B_INSTRUCT }, "q");
  const f = ropeInvFreq(c);
  assert.equal(f.length, 32);
  for (let i = 0; i < 32; i++) {
    const ref = 1 / 1e6 ** ((2 * i) / 64);
    assert.ok(Math.abs(f[i] - ref) <= 1e-6 * ref, `i=${i} ${f[i]} vs ${ref}`);
  }
});

Deno.test("ropeInvFreq: llama3 scaling against a direct float64 formula", () => {
  const c = parseHfConfig(LLAMA32_1B_INSTRUCT, "c");
  const f = ropeInvFreq(c);
  const [factor, low, high, orig, theta, d] = [32, 1, 4, 8192, 500000, 64];
  let scaled = 0, kept = 0, smoothed = 0;
  for (let i = 0; i < d / 2; i++) {
    const base = 1 / theta ** ((2 * i) / d);
    const wavelen = 2 * Math.PI / base;
    let ref: number;
    if (wavelen < orig / high) {
      ref = base;
      kept++;
    } else if (wavelen > orig / low) {
      ref = base / factor;
      scaled++;
    } else {
      const s = (orig / wavelen - low) / (high - low);
      ref = (1 - s) * base / factor + s * base;
      smoothed++;
    }
    assert.ok(Math.abs(f[i] - ref) <= 2e-6 * ref, `i=${i}: ${f[i]} vs ${ref}`);
  }
  // Llama-3's frequencies fall in all three bands.
  assert.ok(scaled > 0 && kept > 0 && smoothed > 0, `${scaled} ${kept} ${smoothed}`);
});
