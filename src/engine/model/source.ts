/**
 * What every model loader produces: the config plus a one-pass stream of
 * float32 weights under Hugging Face names and HF's rotary (rotate_half) layout.
 */
import type { ModelConfig } from "./config.ts";

/** HF names, e.g. "model.layers.0.self_attn.q_proj.weight"; matrices [out, in] row-major. */
export interface WeightTensor {
  name: string;
  shape: number[];
  data: Float32Array;
}

export interface GenerationDefaults {
  eosTokenIds?: number[];
  temperature?: number;
  topK?: number;
  topP?: number;
}

export interface ModelSource {
  config: ModelConfig;
  /** e.g. the path it was opened from. */
  description: string;
  /** Folder with tokenizer.json etc., if any. */
  tokenizerDir: string | null;
  /** llama2.c tokenizer (tok512.bin / tokenizer.bin), if any. */
  llama2cTokenizerPath: string | null;
  generationConfig: GenerationDefaults | null;
  /**
   * Streams every tensor the config implies (see expectedTensors) exactly once,
   * as float32; one tensor in memory at a time. Each call starts a new pass.
   */
  tensors(): AsyncIterable<WeightTensor>;
}
