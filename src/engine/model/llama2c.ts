/**
 * llama2.c checkpoints (the legacy "version 0" export that run.c reads):
 * 7 × int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 * vocab_size — negative when the classifier is not shared — seq_len), then
 * float32 weights in run.c's order:
 *   token_embedding [V, D], rms_att [L, D], wq [L, H*hd, D], wk [L, Hkv*hd, D],
 *   wv [L, Hkv*hd, D], wo [L, D, H*hd], rms_ffn [L, D], w1 [L, I, D],
 *   w2 [L, D, I], w3 [L, I, D], rms_final [D], freq_cis_real [seq_len, hd/2],
 *   freq_cis_imag [seq_len, hd/2] (skipped), wcls [V, D] if not shared.
 * Tensors come out under HF names (w1 = gate, w3 = up, w2 = down) with q/k
 * rows permuted from llama2.c's interleaved rotary pairs to HF's rotate_half.
 */
import { ModelFormatError } from "../errors.ts";
import type { ByteSource } from "./byte_source.ts";
import type { ModelConfig } from "./config.ts";
import { decodeToF32 } from "./dtype.ts";
import type { ModelSource, WeightTensor } from "./source.ts";

export interface Llama2cHeader {
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocabSize: number;
  sharedClassifier: boolean;
  seqLen: number;
}

const HEADER_BYTES = 28;
/** "ak42" as the little-endian u32 that llama2.c's versioned exports start with. */
const VERSIONED_MAGIC = 0x616b3432;

/** One contiguous group of per-layer (or single) tensors in the file. */
interface Section {
  /** HF name; "{l}" is replaced by the layer index. */
  name: string;
  /** Per-tensor shape (HF [out, in]). */
  shape: number[];
  /** Number of tensors stored back to back (layers, or 1). */
  count: number;
  /** Byte offset of the first. */
  offset: number;
  /** Rotary permutation: number of heads, or 0. */
  permuteHeads: number;
  skip?: boolean;
}

export function parseLlama2cHeader(bytes: Uint8Array, file: string): Llama2cHeader {
  if (bytes.byteLength < HEADER_BYTES) {
    throw new ModelFormatError(
      file,
      `file is ${bytes.byteLength} bytes, too short for the 28-byte llama2.c header`,
    );
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, HEADER_BYTES);
  if (v.getUint32(0, true) === VERSIONED_MAGIC) {
    throw new ModelFormatError(
      file,
      `llama2.c export version ${v.getInt32(4, true)} (magic "ak42") is not supported; ` +
        "export the legacy format (export.py --version 0) or convert the model to Hugging Face " +
        "safetensors",
    );
  }
  const ints = Array.from({ length: 7 }, (_, i) => v.getInt32(i * 4, true));
  const [dim, hiddenDim, nLayers, nHeads, nKvHeads, vocab, seqLen] = ints;
  const names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];
  ints.forEach((x, i) => {
    if (x === 0 || (x < 0 && i !== 5) || Math.abs(x) > 1 << 24) {
      throw new ModelFormatError(
        file,
        `bad llama2.c header: ${names[i]}=${x} (header: ${ints.join(", ")})`,
      );
    }
  });
  if (dim % nHeads !== 0) {
    throw new ModelFormatError(
      file,
      `bad llama2.c header: dim ${dim} not divisible by n_heads ${nHeads}`,
    );
  }
  if (nHeads % nKvHeads !== 0) {
    throw new ModelFormatError(
      file,
      `bad llama2.c header: n_heads ${nHeads} not a multiple of n_kv_heads ${nKvHeads}`,
    );
  }
  if ((dim / nHeads) % 2 !== 0) {
    throw new ModelFormatError(file, `bad llama2.c header: head size ${dim / nHeads} is odd`);
  }
  return {
    dim,
    hiddenDim,
    nLayers,
    nHeads,
    nKvHeads,
    vocabSize: Math.abs(vocab),
    sharedClassifier: vocab > 0,
    seqLen,
  };
}

export function llama2cConfig(h: Llama2cHeader): ModelConfig {
  return {
    architecture: "llama",
    hiddenSize: h.dim,
    intermediateSize: h.hiddenDim,
    numLayers: h.nLayers,
    numHeads: h.nHeads,
    numKvHeads: h.nKvHeads,
    headDim: h.dim / h.nHeads,
    vocabSize: h.vocabSize,
    maxPositionEmbeddings: h.seqLen,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    tieWordEmbeddings: h.sharedClassifier,
    attentionBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
  };
}

function layout(h: Llama2cHeader): { sections: Section[]; totalBytes: number } {
  const D = h.dim, I = h.hiddenDim, L = h.nLayers, V = h.vocabSize;
  const hd = D / h.nHeads;
  const q = h.nHeads * hd, kv = h.nKvHeads * hd;
  const sections: Section[] = [];
  let at = HEADER_BYTES;
  const add = (name: string, shape: number[], count: number, permuteHeads = 0, skip = false) => {
    sections.push({ name, shape, count, offset: at, permuteHeads, skip });
    at += shape.reduce((a, b) => a * b, 1) * count * 4;
  };
  const p = "model.layers.{l}.";
  add("model.embed_tokens.weight", [V, D], 1);
  add(`${p}input_layernorm.weight`, [D], L);
  add(`${p}self_attn.q_proj.weight`, [q, D], L, h.nHeads);
  add(`${p}self_attn.k_proj.weight`, [kv, D], L, h.nKvHeads);
  add(`${p}self_attn.v_proj.weight`, [kv, D], L);
  add(`${p}self_attn.o_proj.weight`, [D, q], L);
  add(`${p}post_attention_layernorm.weight`, [D], L);
  add(`${p}mlp.gate_proj.weight`, [I, D], L);
  add(`${p}mlp.down_proj.weight`, [D, I], L);
  add(`${p}mlp.up_proj.weight`, [I, D], L);
  add("model.norm.weight", [D], 1);
  add("freq_cis_real", [h.seqLen, hd / 2], 1, 0, true);
  add("freq_cis_imag", [h.seqLen, hd / 2], 1, 0, true);
  if (!h.sharedClassifier) add("lm_head.weight", [V, D], 1);
  return { sections, totalBytes: at };
}

/**
 * Reorders the rows of a q/k projection [heads*hd, in] from llama2.c's
 * interleaved rotary pairs (2i, 2i+1) to HF's halves (i, i+hd/2), per head;
 * the permute of HF's convert_llama_weights_to_hf.py.
 */
export function permuteRotaryRows(w: Float32Array, heads: number, cols: number): Float32Array {
  const rows = w.length / cols;
  const hd = rows / heads;
  const half = hd / 2;
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      for (let t = 0; t < 2; t++) {
        const src = (h * hd + 2 * i + t) * cols;
        const dst = (h * hd + t * half + i) * cols;
        out.set(w.subarray(src, src + cols), dst);
      }
    }
  }
  return out;
}

/** Opens a llama2.c checkpoint: header and file size are checked here, weights stream later. */
export async function openLlama2c(
  source: ByteSource,
  options: { tokenizerPath?: string | null } = {},
): Promise<ModelSource> {
  const header = parseLlama2cHeader(
    await source.read(0, Math.min(HEADER_BYTES, source.size)),
    source.name,
  );
  const { sections, totalBytes } = layout(header);
  if (source.size !== totalBytes) {
    const h = header;
    const what =
      `header dim=${h.dim} hidden_dim=${h.hiddenDim} n_layers=${h.nLayers} n_heads=${h.nHeads} ` +
      `n_kv_heads=${h.nKvHeads} vocab_size=${
        h.sharedClassifier ? "" : "-"
      }${h.vocabSize} seq_len=${h.seqLen} ` +
      `implies ${totalBytes} bytes`;
    throw new ModelFormatError(
      source.name,
      source.size < totalBytes
        ? `truncated: the file has ${source.size} bytes but the ${what}`
        : `the file has ${source.size} bytes, ${source.size - totalBytes} more than the ${what} ` +
          "(not a legacy llama2.c checkpoint?)",
    );
  }
  return {
    config: llama2cConfig(header),
    description: source.name,
    tokenizerDir: null,
    llama2cTokenizerPath: options.tokenizerPath ?? null,
    generationConfig: { eosTokenIds: [2] },
    async *tensors(): AsyncIterable<WeightTensor> {
      for (const s of sections) {
        if (s.skip) continue;
        const bytes = s.shape.reduce((a, b) => a * b, 1) * 4;
        for (let l = 0; l < s.count; l++) {
          const name = s.name.replace("{l}", String(l));
          let data = decodeToF32(await source.read(s.offset + l * bytes, bytes), "F32");
          if (s.permuteHeads) data = permuteRotaryRows(data, s.permuteHeads, s.shape[1]);
          yield { name, shape: s.shape.slice(), data };
        }
      }
    },
  };
}
