/**
 * Float64 CPU reference forward pass of LlamaForCausalLM and Qwen2ForCausalLM
 * (Qwen2 = Llama + q/k/v biases). The GPU engine's logits are checked against
 * it, and greedy decoding with it reproduces golden texts.
 *
 * Per layer, for T new tokens at positions p0..p0+T-1 (D hidden, H query heads,
 * Hkv key/value heads, d head dim, I intermediate):
 *   h = RMSNorm(x)                         x [T, D]
 *   q = h Wq^T + bq  [T, H*d];  k, v = h Wk^T + bk, h Wv^T + bv  [T, Hkv*d]
 *   q, k rotated (HF rotate_half: pairs (i, i + d/2), angle = pos * invFreq[i])
 *   k, v appended to the float64 KV cache [pos, Hkv*d]
 *   a = causal softmax(q k^T / sqrt(d)) v, query head h reading kv head h / (H/Hkv)
 *   x += a Wo^T;  x += Wdown (silu(Wgate RMSNorm(x)) * Wup RMSNorm(x))
 * then logits = RMSNorm(x) lm_head^T  [T, V]  (lm_head = embed_tokens when tied).
 */
import { InvalidRequestError, ModelFormatError } from "../../src/engine/errors.ts";
import { linear } from "./matmul.ts";
import { rmsNorm } from "./ops.ts";

export interface ReferenceConfig {
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  rmsNormEps: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections have biases (Qwen2). */
  attentionBias: boolean;
  /** [headDim/2] rotary inverse frequencies (scaling already applied). */
  invFreq: Float64Array | Float32Array;
}

type Weight = Float32Array | Float64Array;

interface LayerWeights {
  inputNorm: Weight; // [D]
  q: Weight; // [H*d, D]
  k: Weight; // [Hkv*d, D]
  v: Weight; // [Hkv*d, D]
  qBias: Weight | null; // [H*d]
  kBias: Weight | null; // [Hkv*d]
  vBias: Weight | null; // [Hkv*d]
  o: Weight; // [D, H*d]
  postNorm: Weight; // [D]
  gate: Weight; // [I, D]
  up: Weight; // [I, D]
  down: Weight; // [D, I]
}

/** A growable float64 cache of rows [pos, width]. */
class RowCache {
  data: Float64Array;
  constructor(readonly width: number) {
    this.data = new Float64Array(width * 16);
  }
  /** Writes rows [T, width] at row `start`, growing by doubling. */
  write(rows: Float64Array, start: number) {
    const needed = start * this.width + rows.length;
    if (needed > this.data.length) {
      const grown = new Float64Array(Math.max(needed, this.data.length * 2));
      grown.set(this.data);
      this.data = grown;
    }
    this.data.set(rows, start * this.width);
  }
}

const WEIGHTS_FILE = "reference weights";

export class ReferenceModel {
  readonly #embed: Weight; // [V, D]
  readonly #layers: LayerWeights[];
  readonly #finalNorm: Weight; // [D]
  readonly #lmHead: Weight; // [V, D]
  readonly #keys: RowCache[]; // per layer [pos, Hkv*d], rotated
  readonly #values: RowCache[]; // per layer [pos, Hkv*d]
  #length = 0;

  /**
   * `weights`: HF tensor names, matrices [out, in] row-major, q/k rows in HF's rotate_half layout.
   */
  constructor(readonly config: ReferenceConfig, weights: Map<string, Weight>) {
    const c = config;
    for (
      const key of [
        "hiddenSize",
        "intermediateSize",
        "numLayers",
        "numHeads",
        "numKvHeads",
        "headDim",
        "vocabSize",
      ] as const
    ) {
      if (!Number.isInteger(c[key]) || c[key] <= 0) {
        throw new ModelFormatError(
          WEIGHTS_FILE,
          `config.${key} must be a positive integer, got ${c[key]}`,
        );
      }
    }
    if (c.headDim % 2 !== 0) {
      throw new ModelFormatError(
        WEIGHTS_FILE,
        `headDim ${c.headDim} must be even for rotary embeddings`,
      );
    }
    if (c.numHeads % c.numKvHeads !== 0) {
      throw new ModelFormatError(
        WEIGHTS_FILE,
        `numHeads ${c.numHeads} is not a multiple of numKvHeads ${c.numKvHeads}`,
      );
    }
    if (c.invFreq.length !== c.headDim / 2) {
      throw new ModelFormatError(
        WEIGHTS_FILE,
        `invFreq has ${c.invFreq.length} entries, expected headDim/2 = ${c.headDim / 2}`,
      );
    }

    const D = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize;
    const qWidth = c.numHeads * c.headDim, kvWidth = c.numKvHeads * c.headDim;
    const take = (name: string, length: number): Weight => {
      const w = weights.get(name);
      if (w === undefined) throw new ModelFormatError(WEIGHTS_FILE, "missing tensor", name);
      if (w.length !== length) {
        throw new ModelFormatError(
          WEIGHTS_FILE,
          `has ${w.length} values, expected ${length}`,
          name,
        );
      }
      return w;
    };

    this.#embed = take("model.embed_tokens.weight", V * D);
    this.#layers = Array.from({ length: c.numLayers }, (_, i) => {
      const p = `model.layers.${i}.`;
      const bias = (name: string, length: number) => (c.attentionBias ? take(name, length) : null);
      return {
        inputNorm: take(`${p}input_layernorm.weight`, D),
        q: take(`${p}self_attn.q_proj.weight`, qWidth * D),
        k: take(`${p}self_attn.k_proj.weight`, kvWidth * D),
        v: take(`${p}self_attn.v_proj.weight`, kvWidth * D),
        qBias: bias(`${p}self_attn.q_proj.bias`, qWidth),
        kBias: bias(`${p}self_attn.k_proj.bias`, kvWidth),
        vBias: bias(`${p}self_attn.v_proj.bias`, kvWidth),
        o: take(`${p}self_attn.o_proj.weight`, D * qWidth),
        postNorm: take(`${p}post_attention_layernorm.weight`, D),
        gate: take(`${p}mlp.gate_proj.weight`, I * D),
        up: take(`${p}mlp.up_proj.weight`, I * D),
        down: take(`${p}mlp.down_proj.weight`, D * I),
      };
    });
    this.#finalNorm = take("model.norm.weight", D);
    this.#lmHead = c.tieWordEmbeddings ? this.#embed : take("lm_head.weight", V * D);
    this.#keys = this.#layers.map(() => new RowCache(kvWidth));
    this.#values = this.#layers.map(() => new RowCache(kvWidth));
  }

  /** Tokens already in the KV cache. */
  get length(): number {
    return this.#length;
  }

  /** Empties the KV cache. */
  reset(): void {
    this.#length = 0;
  }

  /** Appends tokens to the cache and returns logits [tokens.length, V] (float64). */
  forward(tokens: number[]): Float64Array {
    const c = this.config;
    const D = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize, T = tokens.length;
    const qWidth = c.numHeads * c.headDim, kvWidth = c.numKvHeads * c.headDim;
    const start = this.#length;

    // x [T, D]: embedding rows.
    const x = new Float64Array(T * D);
    tokens.forEach((token, t) => {
      if (!Number.isInteger(token) || token < 0 || token >= V) {
        throw new InvalidRequestError(`token id ${token} is outside the vocabulary [0, ${V})`);
      }
      for (let i = 0; i < D; i++) x[t * D + i] = this.#embed[token * D + i];
    });

    this.#layers.forEach((w, layer) => {
      const h = rmsNorm(x, w.inputNorm, T, c.rmsNormEps);
      const q = linear(h, w.q, w.qBias, T, D, qWidth);
      const k = linear(h, w.k, w.kBias, T, D, kvWidth);
      const v = linear(h, w.v, w.vBias, T, D, kvWidth);
      rotateHalf(q, T, c.numHeads, c.headDim, start, c.invFreq);
      rotateHalf(k, T, c.numKvHeads, c.headDim, start, c.invFreq);
      this.#keys[layer].write(k, start);
      this.#values[layer].write(v, start);
      const a = causalAttention(q, this.#keys[layer].data, this.#values[layer].data, T, start, c);
      addInPlace(x, linear(a, w.o, null, T, qWidth, D));

      const h2 = rmsNorm(x, w.postNorm, T, c.rmsNormEps);
      const gate = linear(h2, w.gate, null, T, D, I);
      const up = linear(h2, w.up, null, T, D, I);
      for (let i = 0; i < gate.length; i++) gate[i] = (gate[i] / (1 + Math.exp(-gate[i]))) * up[i];
      addInPlace(x, linear(gate, w.down, null, T, I, D));
    });

    this.#length = start + T;
    return linear(rmsNorm(x, this.#finalNorm, T, c.rmsNormEps), this.#lmHead, null, T, D, V);
  }
}

function addInPlace(x: Float64Array, y: Float64Array) {
  for (let i = 0; i < x.length; i++) x[i] += y[i];
}

/**
 * HF rotate_half rotary embedding in place. x [T, heads*d]; token t is at
 * position start + t; element i < d/2 of a head pairs with element i + d/2.
 */
function rotateHalf(
  x: Float64Array,
  T: number,
  heads: number,
  headDim: number,
  start: number,
  invFreq: ArrayLike<number>,
) {
  const half = headDim / 2;
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < half; i++) {
      const angle = (start + t) * invFreq[i];
      const cos = Math.cos(angle), sin = Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * headDim;
        const x1 = x[base + i], x2 = x[base + i + half];
        x[base + i] = x1 * cos - x2 * sin;
        x[base + i + half] = x2 * cos + x1 * sin;
      }
    }
  }
}

/**
 * q [T, H*d] at positions start..start+T-1; keys/values [start+T, Hkv*d]
 * (cache rows). Returns [T, H*d]: each query attends to positions <= its own.
 */
function causalAttention(
  q: Float64Array,
  keys: Float64Array,
  values: Float64Array,
  T: number,
  start: number,
  c: ReferenceConfig,
): Float64Array {
  const d = c.headDim, H = c.numHeads, kvWidth = c.numKvHeads * d;
  const group = H / c.numKvHeads;
  const scale = 1 / Math.sqrt(d);
  const out = new Float64Array(T * H * d);
  const scores = new Float64Array(start + T);
  for (let t = 0; t < T; t++) {
    const visible = start + t + 1;
    for (let h = 0; h < H; h++) {
      const kvOffset = Math.floor(h / group) * d;
      const qOffset = (t * H + h) * d;
      let max = -Infinity;
      for (let p = 0; p < visible; p++) {
        let dot = 0;
        for (let i = 0; i < d; i++) dot += q[qOffset + i] * keys[p * kvWidth + kvOffset + i];
        scores[p] = dot * scale;
        max = Math.max(max, scores[p]);
      }
      let sum = 0;
      for (let p = 0; p < visible; p++) {
        scores[p] = Math.exp(scores[p] - max);
        sum += scores[p];
      }
      for (let p = 0; p < visible; p++) {
        const weight = scores[p] / sum;
        for (let i = 0; i < d; i++) out[qOffset + i] += weight * values[p * kvWidth + kvOffset + i];
      }
    }
  }
  return out;
}

/** Index of the largest value in row `row` of logits [rows, V] (first one on ties). */
function argmaxRow(logits: Float64Array, row: number, V: number): number {
  let best = 0;
  for (let i = 1; i < V; i++) if (logits[row * V + i] > logits[row * V + best]) best = i;
  return best;
}

/**
 * Greedy decoding from `prompt` on a fresh cache: up to `steps` new tokens,
 * stopping after the first one in `eosIds` (which is included). Returns the
 * new tokens only.
 */
export function greedyReference(
  model: ReferenceModel,
  prompt: number[],
  steps: number,
  eosIds: number[],
): number[] {
  if (prompt.length === 0) {
    throw new InvalidRequestError("greedy decoding needs a non-empty prompt (e.g. [BOS])");
  }
  const V = model.config.vocabSize;
  model.reset();
  let logits = model.forward(prompt);
  let lastRow = prompt.length - 1;
  const generated: number[] = [];
  while (generated.length < steps) {
    const next = argmaxRow(logits, lastRow, V);
    generated.push(next);
    if (eosIds.includes(next) || generated.length === steps) break;
    logits = model.forward([next]);
    lastRow = 0;
  }
  return generated;
}
