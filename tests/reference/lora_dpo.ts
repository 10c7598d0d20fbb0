/**
 * Float64 CPU reference of LoRA DPO training: the ground truth the GPU trainer's loss and
 * adapter gradients are checked against.
 *
 * Forward: the math of llama.ts over a whole sequence (positions 0..T-1, no cache),
 * with every adapted projection W [out, in] computing
 *   y = x W^T (+ bias, Qwen2 q/k/v) + scale · (x A^T) B^T,   A [rank, in], B [out, rank],
 * scale = alpha / rank. LoraConfig.dropout is not applied: this is the dropout-free math, so
 * compare GPU training against it with dropout off.
 *
 * DPO (Rafailov et al.): with π = Σ log p(response tokens) under the adapter and ref the same
 * under the base model (adapter null),
 *   margin = β [(π_chosen − ref_chosen) − (π_rejected − ref_rejected)],  L = −log σ(margin).
 * The gradient dL/dA, dL/dB is analytic: the forward keeps a tape of the activations each
 * op's hand-written backward needs, and the backward runs the ops in reverse.
 */
import { InvalidRequestError, ModelFormatError } from "../../src/engine/errors.ts";
import {
  type LoraConfig,
  loraScale,
  type LoraTarget,
  targetModule,
} from "../../src/engine/lora/lora.ts";
import { type ReferenceConfig, ReferenceModel } from "./llama.ts";
import { linear } from "./matmul.ts";
import { rmsNorm } from "./ops.ts";

type Weight = Float32Array | Float64Array;

/** The "file" ModelFormatError names for adapter shape errors. */
const ADAPTER = "LoRA adapter";

/** LoraWeights with float32 or float64 matrices: A [rank, in], B [out, rank] per adapted target. */
export interface AdapterOf<T extends Weight> {
  config: LoraConfig;
  layers: Partial<Record<LoraTarget, { a: T; b: T }>>[];
}
/** Any adapter the reference accepts (a LoraWeights is one). */
export type Adapter = AdapterOf<Weight>;
/** dL/dA, dL/dB in the adapter's layout. */
export type LoraGrads = AdapterOf<Float64Array>;

/** A frozen projection W [out, in] (HF layout) and its optional bias [out]. */
interface Projection {
  weight: Weight;
  bias: Weight | null;
  in: number;
  out: number;
}

interface Layer {
  inputNorm: Weight; // [D]
  postNorm: Weight; // [D]
  proj: Record<LoraTarget, Projection>;
}

/** What one layer's backward needs from its forward (T tokens). */
interface LayerTape {
  x: Float64Array; // residual stream entering the layer [T, D]
  h: Float64Array; // RMSNorm(x), input of q/k/v [T, D]
  q: Float64Array; // rotated queries [T, H*d]
  k: Float64Array; // rotated keys [T, Hkv*d]
  v: Float64Array; // values [T, Hkv*d]
  probs: Float64Array; // attention probabilities [H, T, T] (zero above the diagonal)
  attn: Float64Array; // attention output, input of o [T, H*d]
  mid: Float64Array; // residual stream after attention [T, D]
  h2: Float64Array; // RMSNorm(mid), input of gate/up [T, D]
  gate: Float64Array; // gate pre-activation [T, I]
  up: Float64Array; // [T, I]
  act: Float64Array; // silu(gate) * up, input of down [T, I]
  /** x A^T [T, rank] per adapted target. */
  loraMid: Partial<Record<LoraTarget, Float64Array>>;
}

/** A sequence's forward: logits and the tape for backwardSequence. */
export interface SequenceTape {
  tokens: number[];
  layers: LayerTape[];
  final: Float64Array; // residual stream after the last layer [T, D]
  logits: Float64Array; // [T, V]
}

export class LoraDpoReference {
  readonly #embed: Weight; // [V, D]
  readonly #layers: Layer[];
  readonly #finalNorm: Weight; // [D]
  readonly #lmHead: Weight; // [V, D]

  /** Same inputs as ReferenceModel: HF tensor names, matrices [out, in] row-major. */
  constructor(readonly config: ReferenceConfig, weights: Map<string, Weight>) {
    // ReferenceModel's constructor validates the config and every tensor's presence and size.
    new ReferenceModel(config, weights);
    const c = config;
    const D = c.hiddenSize, I = c.intermediateSize;
    const qWidth = c.numHeads * c.headDim, kvWidth = c.numKvHeads * c.headDim;
    const get = (name: string) => weights.get(name)!;
    this.#embed = get("model.embed_tokens.weight");
    this.#layers = Array.from({ length: c.numLayers }, (_, l) => {
      const p = `model.layers.${l}.`;
      const proj = (name: string, inF: number, outF: number, hasBias = false): Projection => ({
        weight: get(`${p}${name}.weight`),
        bias: hasBias && c.attentionBias ? get(`${p}${name}.bias`) : null,
        in: inF,
        out: outF,
      });
      return {
        inputNorm: get(`${p}input_layernorm.weight`),
        postNorm: get(`${p}post_attention_layernorm.weight`),
        proj: {
          q: proj("self_attn.q_proj", D, qWidth, true),
          k: proj("self_attn.k_proj", D, kvWidth, true),
          v: proj("self_attn.v_proj", D, kvWidth, true),
          o: proj("self_attn.o_proj", qWidth, D),
          gate: proj("mlp.gate_proj", D, I),
          up: proj("mlp.up_proj", D, I),
          down: proj("mlp.down_proj", I, D),
        },
      };
    });
    this.#finalNorm = get("model.norm.weight");
    this.#lmHead = c.tieWordEmbeddings ? this.#embed : get("lm_head.weight");
  }

  /**
   * Throws ModelFormatError unless `adapter` has every configured target with this model's shapes.
   */
  checkAdapter(adapter: Adapter): void {
    const { rank, targets } = adapter.config;
    if (!Number.isInteger(rank) || rank <= 0) {
      throw new ModelFormatError(ADAPTER, `rank must be a positive integer, got ${rank}`);
    }
    if (adapter.layers.length !== this.config.numLayers) {
      throw new ModelFormatError(
        ADAPTER,
        `has ${adapter.layers.length} layers, the model has ${this.config.numLayers}`,
      );
    }
    adapter.layers.forEach((pairs, l) => {
      for (const target of targets) {
        const pair = pairs[target];
        const module = targetModule(l, target);
        if (pair === undefined) throw new ModelFormatError(ADAPTER, "missing target", module);
        const { in: inF, out: outF } = this.#layers[l].proj[target];
        if (pair.a.length !== rank * inF) {
          throw new ModelFormatError(
            ADAPTER,
            `A has ${pair.a.length} values, expected rank*in = ${rank * inF}`,
            `${module}.lora_A.weight`,
          );
        }
        if (pair.b.length !== outF * rank) {
          throw new ModelFormatError(
            ADAPTER,
            `B has ${pair.b.length} values, expected out*rank = ${outF * rank}`,
            `${module}.lora_B.weight`,
          );
        }
      }
    });
  }

  /** Forward of `tokens` at positions 0..T-1; adapter null = base model. */
  forward(adapter: Adapter | null, tokens: number[]): SequenceTape {
    const c = this.config;
    const D = c.hiddenSize, V = c.vocabSize, T = tokens.length;
    if (adapter) this.checkAdapter(adapter);
    const scale = adapter ? loraScale(adapter.config) : 0;

    let x: Float64Array = new Float64Array(T * D);
    tokens.forEach((token, t) => {
      if (!Number.isInteger(token) || token < 0 || token >= V) {
        throw new InvalidRequestError(`token id ${token} is outside the vocabulary [0, ${V})`);
      }
      for (let i = 0; i < D; i++) x[t * D + i] = this.#embed[token * D + i];
    });

    const adapted = new Set(adapter?.config.targets);
    const layers = this.#layers.map((w, l) => {
      const loraMid: LayerTape["loraMid"] = {};
      const project = (target: LoraTarget, input: Float64Array) => {
        const pair = adapted.has(target) ? adapter!.layers[l][target] : undefined;
        const { y, mid } = adaptedLinear(input, w.proj[target], pair, scale, T);
        if (mid) loraMid[target] = mid;
        return y;
      };
      const h = rmsNorm(x, w.inputNorm, T, c.rmsNormEps);
      const q = ropeForward(project("q", h), T, c.numHeads, c.headDim, c.invFreq);
      const k = ropeForward(project("k", h), T, c.numKvHeads, c.headDim, c.invFreq);
      const v = project("v", h);
      const { out: attn, probs } = attentionForward(q, k, v, T, c);
      const mid = add(x, project("o", attn));
      const h2 = rmsNorm(mid, w.postNorm, T, c.rmsNormEps);
      const gate = project("gate", h2);
      const up = project("up", h2);
      const act = swigluForward(gate, up);
      const tape: LayerTape = { x, h, q, k, v, probs, attn, mid, h2, gate, up, act, loraMid };
      x = add(mid, project("down", act));
      return tape;
    });

    const normed = rmsNorm(x, this.#finalNorm, T, c.rmsNormEps);
    const logits = linear(normed, this.#lmHead, null, T, D, V);
    return { tokens, layers, final: x, logits };
  }

  /**
   * Accumulates into `grads` the adapter gradient of a scalar whose gradient with respect to
   * the logits [T, V] of `tape` is `dLogits`. `adapter` must be the one `tape` was made with.
   */
  backward(adapter: Adapter, tape: SequenceTape, dLogits: Float64Array, grads: LoraGrads): void {
    const c = this.config;
    const D = c.hiddenSize, V = c.vocabSize, T = tape.tokens.length;
    const scale = loraScale(adapter.config);

    // logits = RMSNorm(final) lmHead^T: lmHead [V, D] is frozen, only the input gradient flows.
    const dNormed = matmul(dLogits, this.#lmHead, T, V, D);
    let dx = rmsNormBackward(tape.final, this.#finalNorm, dNormed, T, c.rmsNormEps);

    for (let l = this.#layers.length - 1; l >= 0; l--) {
      const w = this.#layers[l], s = tape.layers[l];
      const pairs = adapter.layers[l], layerGrads = grads.layers[l];
      const back = (target: LoraTarget, input: Float64Array, dy: Float64Array) =>
        adaptedLinearBackward(
          input,
          w.proj[target],
          pairs[target],
          s.loraMid[target],
          scale,
          dy,
          T,
          layerGrads[target],
        );

      // x_out = mid + down(silu(gate(h2)) * up(h2)), h2 = RMSNorm(mid).
      const dAct = back("down", s.act, dx);
      const { dGate, dUp } = swigluBackward(s.gate, s.up, dAct);
      const dh2 = add(back("gate", s.h2, dGate), back("up", s.h2, dUp));
      const dMid = add(dx, rmsNormBackward(s.mid, w.postNorm, dh2, T, c.rmsNormEps));

      // mid = x + o(attention(rope(q(h)), rope(k(h)), v(h))), h = RMSNorm(x).
      const dAttn = back("o", s.attn, dMid);
      const { dq, dk, dv } = attentionBackward(s.q, s.k, s.v, s.probs, dAttn, T, c);
      const dqIn = ropeBackward(dq, T, c.numHeads, c.headDim, c.invFreq);
      const dkIn = ropeBackward(dk, T, c.numKvHeads, c.headDim, c.invFreq);
      const dh = add(add(back("q", s.h, dqIn), back("k", s.h, dkIn)), back("v", s.h, dv));
      // Layer 0's dx would reach the frozen embedding rows: nothing to accumulate there.
      if (l > 0) dx = add(dMid, rmsNormBackward(s.x, w.inputNorm, dh, T, c.rmsNormEps));
    }
  }
}

/**
 * Σ_{t = responseStart}^{T−1} log softmax(logits[t−1])[tokens[t]]: the response's log-probability.
 */
export function sequenceLogprob(
  model: LoraDpoReference,
  adapter: Adapter | null,
  tokens: number[],
  responseStart: number,
): number {
  checkResponseStart(tokens, responseStart);
  const tape = model.forward(adapter, tokens);
  return logSoftmaxGather(tape.logits, tokens, responseStart, model.config.vocabSize);
}

/** A preference pair: full token sequences sharing their first promptLength tokens. */
export interface PreferencePair {
  chosen: number[];
  rejected: number[];
  promptLength: number;
}

export interface DpoResult {
  /** −log σ(margin). */
  loss: number;
  policyChosen: number;
  policyRejected: number;
  refChosen: number;
  refRejected: number;
  /** β [(policyChosen − refChosen) − (policyRejected − refRejected)]. */
  margin: number;
  /** dLoss/dA, dLoss/dB for every adapted target of every layer. */
  grads: LoraGrads;
}

/**
 * DPO loss of one pair and its analytic adapter gradient. `ref` (the base model's response
 * log-probs) is computed with adapter null when not given.
 */
export function dpoLossAndGrad(
  model: LoraDpoReference,
  adapter: Adapter,
  pair: PreferencePair,
  beta: number,
  ref?: { chosen: number; rejected: number },
): DpoResult {
  const { chosen, rejected, promptLength } = pair;
  checkResponseStart(chosen, promptLength);
  checkResponseStart(rejected, promptLength);
  for (let t = 0; t < promptLength; t++) {
    if (chosen[t] !== rejected[t]) {
      throw new InvalidRequestError(
        `chosen and rejected differ at token ${t}, inside the shared prompt of ${promptLength}`,
      );
    }
  }
  const V = model.config.vocabSize;
  const refChosen = ref?.chosen ?? sequenceLogprob(model, null, chosen, promptLength);
  const refRejected = ref?.rejected ?? sequenceLogprob(model, null, rejected, promptLength);
  const chosenTape = model.forward(adapter, chosen);
  const rejectedTape = model.forward(adapter, rejected);
  const policyChosen = logSoftmaxGather(chosenTape.logits, chosen, promptLength, V);
  const policyRejected = logSoftmaxGather(rejectedTape.logits, rejected, promptLength, V);
  const margin = beta * ((policyChosen - refChosen) - (policyRejected - refRejected));

  // dL/dmargin = −σ(−margin); dmargin/dπ_chosen = β, dmargin/dπ_rejected = −β.
  const dMargin = -sigmoid(-margin);
  const grads = zeroGrads(adapter);
  model.backward(
    adapter,
    chosenTape,
    logSoftmaxGatherBackward(chosenTape.logits, chosen, promptLength, V, dMargin * beta),
    grads,
  );
  model.backward(
    adapter,
    rejectedTape,
    logSoftmaxGatherBackward(rejectedTape.logits, rejected, promptLength, V, -dMargin * beta),
    grads,
  );
  return {
    loss: softplus(-margin),
    policyChosen,
    policyRejected,
    refChosen,
    refRejected,
    margin,
    grads,
  };
}

function checkResponseStart(tokens: number[], responseStart: number) {
  if (!Number.isInteger(responseStart) || responseStart < 1 || responseStart >= tokens.length) {
    throw new InvalidRequestError(
      `response start ${responseStart} must be in [1, ${tokens.length - 1}] for ${tokens.length} ` +
        "tokens (at least one prompt and one response token)",
    );
  }
}

/** A float64 copy of an adapter (finite differences need steps finer than float32 resolution). */
export function toFloat64Adapter(adapter: Adapter): AdapterOf<Float64Array> {
  return {
    config: adapter.config,
    layers: adapter.layers.map((pairs) => {
      const out: LoraGrads["layers"][number] = {};
      for (const target of adapter.config.targets) {
        const pair = pairs[target]!;
        out[target] = { a: Float64Array.from(pair.a), b: Float64Array.from(pair.b) };
      }
      return out;
    }),
  };
}

/**
 * Which adapter entry: layer, target, matrix ("a" = A [rank, in], "b" = B [out, rank]), flat index.
 */
export interface AdapterEntry {
  layer: number;
  target: LoraTarget;
  matrix: "a" | "b";
  index: number;
}

/** A float64 copy of `adapter` with one entry increased by `delta`. */
export function perturbAdapter(
  adapter: Adapter,
  entry: AdapterEntry,
  delta: number,
): AdapterOf<Float64Array> {
  const copy = toFloat64Adapter(adapter);
  const pair = copy.layers[entry.layer][entry.target];
  if (pair === undefined) {
    throw new InvalidRequestError(`layer ${entry.layer} has no ${entry.target} adapter`);
  }
  const m = pair[entry.matrix];
  if (!Number.isInteger(entry.index) || entry.index < 0 || entry.index >= m.length) {
    throw new InvalidRequestError(`index ${entry.index} outside ${entry.matrix} [${m.length}]`);
  }
  m[entry.index] += delta;
  return copy;
}

/** Zero gradients shaped like `adapter`. */
export function zeroGrads(adapter: Adapter): LoraGrads {
  const grads = toFloat64Adapter(adapter);
  for (const pairs of grads.layers) {
    for (const pair of Object.values(pairs)) {
      pair.a.fill(0);
      pair.b.fill(0);
    }
  }
  return grads;
}

// ---- Per-op forwards and backwards. Row-major, token-major [T, width] activations. ----

function add(a: Float64Array, b: Float64Array): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i] + b[i];
  return out;
}

/** a [m, k] · b [k, n] -> [m, n]. */
function matmul(a: ArrayLike<number>, b: ArrayLike<number>, m: number, k: number, n: number) {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let p = 0; p < k; p++) {
      const aip = a[i * k + p];
      if (aip === 0) continue;
      for (let j = 0; j < n; j++) out[i * n + j] += aip * b[p * n + j];
    }
  }
  return out;
}

/** out [m, n] += alpha · a^T b for a [k, m], b [k, n] (weight gradients: k = tokens). */
function addMatmulTN(
  out: Float64Array,
  alpha: number,
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  k: number,
  m: number,
  n: number,
) {
  for (let p = 0; p < k; p++) {
    for (let i = 0; i < m; i++) {
      const api = alpha * a[p * m + i];
      if (api === 0) continue;
      for (let j = 0; j < n; j++) out[i * n + j] += api * b[p * n + j];
    }
  }
}

/**
 * y = x W^T + bias + scale · (x A^T) B^T for x [T, in]; returns y [T, out] and, when adapted,
 * mid = x A^T [T, rank] for the backward.
 */
function adaptedLinear(
  x: Float64Array,
  p: Projection,
  pair: { a: Weight; b: Weight } | undefined,
  scale: number,
  T: number,
): { y: Float64Array; mid: Float64Array | null } {
  const y = linear(x, p.weight, p.bias, T, p.in, p.out);
  if (!pair) return { y, mid: null };
  const rank = pair.a.length / p.in;
  const mid = linear(x, pair.a, null, T, p.in, rank);
  const lora = linear(mid, pair.b, null, T, rank, p.out);
  for (let i = 0; i < y.length; i++) y[i] += scale * lora[i];
  return { y, mid };
}

/** Backward of adaptedLinear: returns dx [T, in]; the frozen W and bias get no gradient. */
function adaptedLinearBackward(
  x: Float64Array,
  p: Projection,
  pair: { a: Weight; b: Weight } | undefined,
  mid: Float64Array | undefined,
  scale: number,
  dy: Float64Array,
  T: number,
  grad: { a: Float64Array; b: Float64Array } | undefined,
): Float64Array {
  const dx = matmul(dy, p.weight, T, p.out, p.in);
  if (pair && mid && grad) loraBackward(x, pair, mid, scale, dy, T, p, dx, grad);
  return dx;
}

/**
 * Backward of y += scale · (x A^T) B^T with mid = x A^T [T, rank], dy [T, out]:
 *   dB += scale · dy^T mid [out, rank];  dA += scale · (dy B)^T x [rank, in];
 *   dx += scale · (dy B) A [T, in].
 */
function loraBackward(
  x: Float64Array,
  pair: { a: Weight; b: Weight },
  mid: Float64Array,
  scale: number,
  dy: Float64Array,
  T: number,
  p: Projection,
  dx: Float64Array,
  grad: { a: Float64Array; b: Float64Array },
) {
  const rank = mid.length / T;
  const dMid = matmul(dy, pair.b, T, p.out, rank); // [T, rank]
  addMatmulTN(grad.b, scale, dy, mid, T, p.out, rank);
  addMatmulTN(grad.a, scale, dMid, x, T, rank, p.in);
  const dxLora = matmul(dMid, pair.a, T, rank, p.in);
  for (let i = 0; i < dx.length; i++) dx[i] += scale * dxLora[i];
}

/**
 * Backward of y = x · r · w with r = (mean(x²) + eps)^(-1/2) per row, x [rows, dim]:
 *   dx_i = r w_i dy_i − r³ x_i Σ_j dy_j w_j x_j / dim.
 */
function rmsNormBackward(
  x: Float64Array,
  w: Weight,
  dy: Float64Array,
  rows: number,
  eps: number,
): Float64Array {
  const dim = w.length;
  const dx = new Float64Array(rows * dim);
  for (let t = 0; t < rows; t++) {
    const o = t * dim;
    let ss = 0, dot = 0;
    for (let i = 0; i < dim; i++) {
      ss += x[o + i] ** 2;
      dot += dy[o + i] * w[i] * x[o + i];
    }
    const r = 1 / Math.sqrt(ss / dim + eps);
    const c = (r * r * r * dot) / dim;
    for (let i = 0; i < dim; i++) dx[o + i] = r * w[i] * dy[o + i] - c * x[o + i];
  }
  return dx;
}

function sigmoid(z: number): number {
  if (z >= 0) return 1 / (1 + Math.exp(-z));
  const e = Math.exp(z);
  return e / (1 + e);
}

/** log(1 + e^z) without overflow. */
function softplus(z: number): number {
  return Math.max(z, 0) + Math.log1p(Math.exp(-Math.abs(z)));
}

/** act = silu(gate) · up, elementwise [T, I]. */
function swigluForward(gate: Float64Array, up: Float64Array): Float64Array {
  const act = new Float64Array(gate.length);
  for (let i = 0; i < act.length; i++) act[i] = gate[i] * sigmoid(gate[i]) * up[i];
  return act;
}

/** silu'(g) = σ(g) (1 + g (1 − σ(g))): dGate = dAct · up · silu'(gate), dUp = dAct · silu(gate). */
function swigluBackward(gate: Float64Array, up: Float64Array, dAct: Float64Array) {
  const dGate = new Float64Array(gate.length), dUp = new Float64Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i], s = sigmoid(g);
    dUp[i] = dAct[i] * g * s;
    dGate[i] = dAct[i] * up[i] * s * (1 + g * (1 - s));
  }
  return { dGate, dUp };
}

/**
 * HF rotate_half rotation of x [T, heads*d], token t at position t, by angle sign·t·invFreq[i]
 * on the pair (i, i + d/2). sign −1 is the inverse (= transpose) rotation.
 */
function rotate(
  x: Float64Array,
  T: number,
  heads: number,
  headDim: number,
  invFreq: ArrayLike<number>,
  sign: 1 | -1,
): Float64Array {
  const half = headDim / 2;
  const out = new Float64Array(x.length);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < half; i++) {
      const angle = t * invFreq[i];
      const cos = Math.cos(angle), sin = sign * Math.sin(angle);
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * headDim;
        const x1 = x[base + i], x2 = x[base + i + half];
        out[base + i] = x1 * cos - x2 * sin;
        out[base + i + half] = x2 * cos + x1 * sin;
      }
    }
  }
  return out;
}

function ropeForward(x: Float64Array, T: number, heads: number, d: number, f: ArrayLike<number>) {
  return rotate(x, T, heads, d, f, 1);
}

/** The rotation is orthogonal: its backward is the inverse rotation of the gradient. */
function ropeBackward(dy: Float64Array, T: number, heads: number, d: number, f: ArrayLike<number>) {
  return rotate(dy, T, heads, d, f, -1);
}

/**
 * Causal GQA attention over positions 0..T-1: q [T, H*d], k, v [T, Hkv*d]; query head h reads
 * kv head h / (H/Hkv). Returns out [T, H*d] and probs [H, T, T] = softmax(q k^T / sqrt(d)).
 */
function attentionForward(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  T: number,
  c: ReferenceConfig,
): { out: Float64Array; probs: Float64Array } {
  const d = c.headDim, H = c.numHeads, Hkv = c.numKvHeads, group = H / Hkv;
  const scale = 1 / Math.sqrt(d);
  const out = new Float64Array(T * H * d);
  const probs = new Float64Array(H * T * T);
  for (let h = 0; h < H; h++) {
    const g = Math.floor(h / group);
    for (let t = 0; t < T; t++) {
      const row = (h * T + t) * T, qo = (t * H + h) * d;
      let max = -Infinity;
      for (let p = 0; p <= t; p++) {
        let dot = 0;
        for (let i = 0; i < d; i++) dot += q[qo + i] * k[(p * Hkv + g) * d + i];
        probs[row + p] = dot * scale;
        max = Math.max(max, probs[row + p]);
      }
      let sum = 0;
      for (let p = 0; p <= t; p++) sum += probs[row + p] = Math.exp(probs[row + p] - max);
      for (let p = 0; p <= t; p++) {
        const weight = probs[row + p] /= sum;
        for (let i = 0; i < d; i++) out[qo + i] += weight * v[(p * Hkv + g) * d + i];
      }
    }
  }
  return { out, probs };
}

/**
 * Backward of attentionForward given dOut [T, H*d]. Per query t and head h (kv head g):
 *   dP_p = dOut_t · v_p;  dv_p += P_p dOut_t;  dS_p = P_p (dP_p − Σ_j P_j dP_j);
 *   dq_t += dS_p k_p / sqrt(d);  dk_p += dS_p q_t / sqrt(d).
 * The H/Hkv query heads sharing a kv head sum into its dk, dv.
 */
function attentionBackward(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  probs: Float64Array,
  dOut: Float64Array,
  T: number,
  c: ReferenceConfig,
) {
  const d = c.headDim, H = c.numHeads, Hkv = c.numKvHeads, group = H / Hkv;
  const scale = 1 / Math.sqrt(d);
  const dq = new Float64Array(q.length), dk = new Float64Array(k.length);
  const dv = new Float64Array(v.length);
  const dP = new Float64Array(T);
  for (let h = 0; h < H; h++) {
    const g = Math.floor(h / group);
    for (let t = 0; t < T; t++) {
      const row = (h * T + t) * T, qo = (t * H + h) * d;
      let pdp = 0;
      for (let p = 0; p <= t; p++) {
        const kvo = (p * Hkv + g) * d, prob = probs[row + p];
        let dot = 0;
        for (let i = 0; i < d; i++) {
          dot += dOut[qo + i] * v[kvo + i];
          dv[kvo + i] += prob * dOut[qo + i];
        }
        dP[p] = dot;
        pdp += prob * dot;
      }
      for (let p = 0; p <= t; p++) {
        const kvo = (p * Hkv + g) * d;
        const dS = probs[row + p] * (dP[p] - pdp) * scale;
        for (let i = 0; i < d; i++) {
          dq[qo + i] += dS * k[kvo + i];
          dk[kvo + i] += dS * q[qo + i];
        }
      }
    }
  }
  return { dq, dk, dv };
}

/** out [V] = log softmax of row `row` of logits [T, V]. */
function logSoftmaxRow(logits: Float64Array, row: number, V: number, out: Float64Array) {
  let max = -Infinity;
  for (let j = 0; j < V; j++) max = Math.max(max, logits[row * V + j]);
  let sum = 0;
  for (let j = 0; j < V; j++) sum += Math.exp(logits[row * V + j] - max);
  const logZ = max + Math.log(sum);
  for (let j = 0; j < V; j++) out[j] = logits[row * V + j] - logZ;
}

/** Σ_{t ≥ responseStart} log softmax(logits[t−1])[tokens[t]]; logits [T, V]. */
function logSoftmaxGather(
  logits: Float64Array,
  tokens: number[],
  responseStart: number,
  V: number,
): number {
  const logp = new Float64Array(V);
  let total = 0;
  for (let t = responseStart; t < tokens.length; t++) {
    logSoftmaxRow(logits, t - 1, V, logp);
    total += logp[tokens[t]];
  }
  return total;
}

/**
 * Gradient [T, V] of coef · logSoftmaxGather with respect to the logits: row t−1 (t ≥
 * responseStart) gets coef · (onehot(tokens[t]) − softmax(logits[t−1])); other rows are zero.
 */
function logSoftmaxGatherBackward(
  logits: Float64Array,
  tokens: number[],
  responseStart: number,
  V: number,
  coef: number,
): Float64Array {
  const dLogits = new Float64Array(tokens.length * V);
  const logp = new Float64Array(V);
  for (let t = responseStart; t < tokens.length; t++) {
    const row = t - 1;
    logSoftmaxRow(logits, row, V, logp);
    for (let j = 0; j < V; j++) dLogits[row * V + j] = -coef * Math.exp(logp[j]);
    dLogits[row * V + tokens[t]] += coef;
  }
  return dLogits;
}
