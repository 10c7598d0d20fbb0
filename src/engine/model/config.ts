/**
 * Model hyper-parameters, parsed from a Hugging Face config.json
 * (LlamaForCausalLM, Qwen2ForCausalLM), the RoPE inverse frequencies they
 * imply, and the exact tensor names/shapes a checkpoint must hold.
 */
import { ModelFormatError } from "../errors.ts";

export interface Llama3RopeScaling {
  type: "llama3";
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

export interface ModelConfig {
  architecture: "llama" | "qwen2";
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  maxPositionEmbeddings: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: null | Llama3RopeScaling;
  tieWordEmbeddings: boolean;
  /** q/k/v biases (Qwen2 always true). */
  attentionBias: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
}

const ARCHITECTURES: Record<string, ModelConfig["architecture"]> = {
  LlamaForCausalLM: "llama",
  Qwen2ForCausalLM: "qwen2",
};
const MODEL_TYPES: Record<string, ModelConfig["architecture"]> = { llama: "llama", qwen2: "qwen2" };

/** HF defaults that differ per architecture (transformers' LlamaConfig / Qwen2Config). */
const DEFAULTS = {
  llama: { maxPositionEmbeddings: 2048, bos: 1 as number | null, eos: [2] },
  qwen2: { maxPositionEmbeddings: 32768, bos: null as number | null, eos: [] as number[] },
};

type Json = Record<string, unknown>;

/** Parses a config.json object; `file` names it in errors. */
export function parseHfConfig(json: unknown, file: string): ModelConfig {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new ModelFormatError(file, "config must be a JSON object");
  }
  const c = json as Json;
  const fail = (detail: string): never => {
    throw new ModelFormatError(file, detail);
  };

  let architecture: ModelConfig["architecture"];
  const archs = c.architectures;
  if (Array.isArray(archs) && archs.length > 0) {
    const name = String(archs[0]);
    if (!(name in ARCHITECTURES)) {
      fail(`unknown architecture ${name}; supported: LlamaForCausalLM, Qwen2ForCausalLM`);
    }
    architecture = ARCHITECTURES[name];
  } else if (typeof c.model_type === "string" && c.model_type in MODEL_TYPES) {
    architecture = MODEL_TYPES[c.model_type];
  } else {
    architecture = fail(
      `unknown architecture ${String(c.model_type ?? '(no "architectures" or "model_type")')}; ` +
        "supported: LlamaForCausalLM, Qwen2ForCausalLM",
    );
  }

  const has = (key: string) => c[key] !== undefined && c[key] !== null;
  const int = (key: string, fallback?: number): number => {
    const v = has(key) ? c[key] : fallback;
    if (v === undefined) return fail(`missing required field "${key}"`);
    if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
      return fail(`field "${key}" must be a positive integer, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const num = (key: string, fallback: number): number => {
    const v = has(key) ? c[key] : fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      return fail(`field "${key}" must be a positive number, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const bool = (key: string, fallback: boolean): boolean => {
    const v = has(key) ? c[key] : fallback;
    if (typeof v !== "boolean") {
      return fail(`field "${key}" must be true or false, got ${JSON.stringify(v)}`);
    }
    return v;
  };

  const hiddenSize = int("hidden_size");
  const numHeads = int("num_attention_heads");
  const numKvHeads = int("num_key_value_heads", numHeads);
  let headDim: number;
  if (has("head_dim")) {
    headDim = int("head_dim");
  } else {
    if (hiddenSize % numHeads !== 0) {
      fail(
        `hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numHeads}; set ` +
          `"head_dim"`,
      );
    }
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) fail(`head_dim ${headDim} must be even for rotary embeddings`);
  if (numHeads % numKvHeads !== 0) {
    fail(`num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`);
  }

  const act = c.hidden_act ?? "silu";
  if (act !== "silu") fail(`hidden_act "${String(act)}" is not supported; only "silu"`);
  if (has("mlp_bias") && bool("mlp_bias", false)) fail("mlp_bias=true is not supported");
  if (architecture === "qwen2" && has("use_sliding_window") && bool("use_sliding_window", false)) {
    fail("use_sliding_window=true (sliding-window attention) is not supported");
  }

  const defaults = DEFAULTS[architecture];
  const attentionBias = architecture === "qwen2" ? true : bool("attention_bias", false);

  let bosTokenId: number | null = defaults.bos;
  if ("bos_token_id" in c) {
    const v = c.bos_token_id;
    if (v === null) bosTokenId = null;
    else if (typeof v === "number" && Number.isInteger(v) && v >= 0) bosTokenId = v;
    else fail(`field "bos_token_id" must be a token id or null, got ${JSON.stringify(v)}`);
  }
  let eosTokenIds = defaults.eos;
  if ("eos_token_id" in c) eosTokenIds = parseEosIds(c.eos_token_id, file);

  const config: ModelConfig = {
    architecture,
    hiddenSize,
    intermediateSize: int("intermediate_size"),
    numLayers: int("num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim,
    vocabSize: int("vocab_size"),
    maxPositionEmbeddings: int("max_position_embeddings", defaults.maxPositionEmbeddings),
    rmsNormEps: num("rms_norm_eps", 1e-6),
    ropeTheta: num("rope_theta", 10000),
    ropeScaling: parseRopeScaling(c.rope_scaling, file),
    tieWordEmbeddings: bool("tie_word_embeddings", false),
    attentionBias,
    bosTokenId,
    eosTokenIds,
  };
  return config;
}

/** eos_token_id as HF writes it: a number, an array of numbers, or null. */
export function parseEosIds(v: unknown, file: string): number[] {
  if (v === null || v === undefined) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const id of list) {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
      throw new ModelFormatError(
        file,
        `eos_token_id must be a token id or a list of them, got ${JSON.stringify(v)}`,
      );
    }
  }
  return list as number[];
}

function parseRopeScaling(v: unknown, file: string): ModelConfig["ropeScaling"] {
  if (v === null || v === undefined) return null;
  if (typeof v !== "object" || Array.isArray(v)) {
    throw new ModelFormatError(
      file,
      `rope_scaling must be an object or null, got ${JSON.stringify(v)}`,
    );
  }
  const r = v as Json;
  const type = r.rope_type ?? r.type;
  if (type === "default") return null;
  if (type !== "llama3") {
    throw new ModelFormatError(
      file,
      `rope_scaling type ${JSON.stringify(type)} is not supported; supported: "llama3" (or none)`,
    );
  }
  const num = (key: string): number => {
    const x = r[key];
    if (typeof x !== "number" || !Number.isFinite(x) || x <= 0) {
      throw new ModelFormatError(
        file,
        `rope_scaling.${key} must be a positive number, got ${JSON.stringify(x)}`,
      );
    }
    return x;
  };
  const scaling: Llama3RopeScaling = {
    type: "llama3",
    factor: num("factor"),
    lowFreqFactor: num("low_freq_factor"),
    highFreqFactor: num("high_freq_factor"),
    originalMaxPositionEmbeddings: num("original_max_position_embeddings"),
  };
  if (scaling.highFreqFactor <= scaling.lowFreqFactor) {
    throw new ModelFormatError(
      file,
      "rope_scaling.high_freq_factor must be greater than low_freq_factor",
    );
  }
  return scaling;
}

/**
 * RoPE inverse frequencies [headDim/2]: theta^(-2i/headDim), with llama3
 * scaling applied as in HF's `_compute_llama3_parameters` (long wavelengths
 * divided by `factor`, short ones kept, a smooth blend in between).
 */
export function ropeInvFreq(config: ModelConfig): Float32Array {
  const half = config.headDim / 2;
  const out = new Float32Array(half);
  const s = config.ropeScaling;
  for (let i = 0; i < half; i++) {
    // HF computes the base frequencies in float32; round like it does.
    let f = Math.fround(1 / Math.fround(config.ropeTheta ** ((2 * i) / config.headDim)));
    if (s) {
      const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
      const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
      const wavelen = (2 * Math.PI) / f;
      if (wavelen > lowWavelen) {
        f = f / s.factor;
      } else if (wavelen >= highWavelen) {
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) /
          (s.highFreqFactor - s.lowFreqFactor);
        f = (1 - smooth) * (f / s.factor) + smooth * f;
      }
    }
    out[i] = f;
  }
  return out;
}

/** One weight the model needs: HF name and [out, in] (or [n]) shape. */
export interface TensorSpec {
  name: string;
  shape: number[];
}

/**
 * Every tensor the config implies, in HF's usual file order (embeddings, layers, norm, lm_head).
 */
export function expectedTensors(config: ModelConfig): TensorSpec[] {
  const { hiddenSize: d, intermediateSize: ff, vocabSize: v, headDim: hd } = config;
  const qOut = config.numHeads * hd;
  const kvOut = config.numKvHeads * hd;
  const out: TensorSpec[] = [{ name: "model.embed_tokens.weight", shape: [v, d] }];
  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}.`;
    out.push({ name: `${p}input_layernorm.weight`, shape: [d] });
    out.push({ name: `${p}self_attn.q_proj.weight`, shape: [qOut, d] });
    if (config.attentionBias) out.push({ name: `${p}self_attn.q_proj.bias`, shape: [qOut] });
    out.push({ name: `${p}self_attn.k_proj.weight`, shape: [kvOut, d] });
    if (config.attentionBias) out.push({ name: `${p}self_attn.k_proj.bias`, shape: [kvOut] });
    out.push({ name: `${p}self_attn.v_proj.weight`, shape: [kvOut, d] });
    if (config.attentionBias) out.push({ name: `${p}self_attn.v_proj.bias`, shape: [kvOut] });
    out.push({ name: `${p}self_attn.o_proj.weight`, shape: [d, qOut] });
    out.push({ name: `${p}post_attention_layernorm.weight`, shape: [d] });
    out.push({ name: `${p}mlp.gate_proj.weight`, shape: [ff, d] });
    out.push({ name: `${p}mlp.up_proj.weight`, shape: [ff, d] });
    out.push({ name: `${p}mlp.down_proj.weight`, shape: [d, ff] });
  }
  out.push({ name: "model.norm.weight", shape: [d] });
  if (!config.tieWordEmbeddings) out.push({ name: "lm_head.weight", shape: [v, d] });
  return out;
}

/** Number of parameters (elements of expectedTensors). */
export function parameterCount(config: ModelConfig): number {
  return expectedTensors(config).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
}

/**
 * config.json text for a config (the fields of models/stories260K/config.json, plus what
 * qwen2/llama3 need).
 */
export function hfConfigJson(config: ModelConfig, torchDtype = "float32"): Record<string, unknown> {
  const out: Record<string, unknown> = {
    architectures: [config.architecture === "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"],
    model_type: config.architecture,
    hidden_size: config.hiddenSize,
    intermediate_size: config.intermediateSize,
    num_hidden_layers: config.numLayers,
    num_attention_heads: config.numHeads,
    num_key_value_heads: config.numKvHeads,
    vocab_size: config.vocabSize,
    max_position_embeddings: config.maxPositionEmbeddings,
    rms_norm_eps: config.rmsNormEps,
    rope_theta: config.ropeTheta,
    hidden_act: "silu",
    tie_word_embeddings: config.tieWordEmbeddings,
    bos_token_id: config.bosTokenId,
    eos_token_id: config.eosTokenIds.length === 1 ? config.eosTokenIds[0] : config.eosTokenIds,
    attention_bias: config.attentionBias,
    mlp_bias: false,
    torch_dtype: torchDtype,
    head_dim: config.headDim,
  };
  if (config.architecture === "qwen2") out.use_sliding_window = false;
  if (config.ropeScaling) {
    const s = config.ropeScaling;
    out.rope_scaling = {
      rope_type: "llama3",
      factor: s.factor,
      low_freq_factor: s.lowFreqFactor,
      high_freq_factor: s.highFreqFactor,
      original_max_position_embeddings: s.originalMaxPositionEmbeddings,
    };
  }
  return out;
}
