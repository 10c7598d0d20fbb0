/**
 * The training forward and backward of one sequence on the GPU, LoRA on the frozen base.
 *
 * Two sequence slots (0 = chosen, 1 = rejected) hold what survives between slices: token ids,
 * the residual stream at every layer boundary (checkpoints x_0..x_L, f32 [T, D] each), the
 * per-token log-probs and the gradient of the residual stream dHidden [T, D]. Everything else
 * is recomputed: the backward of layer l re-runs its forward from x_l (one extra forward per
 * sequence) instead of keeping every activation, so memory is (L + 1)·T·D floats per sequence
 * plus one layer's work buffers.
 *
 * Forward (per slot, T tokens at positions 0..T-1):
 *   x_0 = embed(tokens);  x_{l+1} = layer_l(x_l) (with the adapter, or without for the reference)
 *   per 64-row chunk of the response rows r (r predicts token r+1):
 *     logits[64, V] = rmsnorm(x_L[r]) Wlm^T;  logp[r] = logits[r, tokens[r+1]] - logsumexp
 * Backward (per slot; g = dL/d(sum of the response log-probs), from the DPO loss kernel):
 *   dHidden = 0; per chunk: dlogits = g (onehot - softmax), prompt rows zeroed;
 *   dHidden[r] = rmsnorm_backward(x_L[r], dlogits Wlm)
 *   per layer l = L-1..0: recompute layer l from x_l, then
 *     down, swiglu, gate/up, post-norm, o, attention, rope, q/k/v, input-norm backward,
 *     each LoRA projection adding dA, dB into the gradient buffers and its share to dx.
 * Chunks start at multiples of 64 rows so their bindings sit at 256-byte offsets (64·D·4).
 */
import { createStorage, packUniform, writeBuffer } from "../gpu/buffers.ts";
import type { GpuContext } from "../gpu/context.ts";
import type { BindingResource } from "../gpu/kernel.ts";
import { type ModelConfig, ropeInvFreq } from "../model/config.ts";
import type { GpuMatrix, GpuWeights } from "../model/gpu_weights.ts";
import type { LoraTarget } from "../lora/lora.ts";
import { Embedding } from "../kernels/embedding.ts";
import { RmsNorm } from "../kernels/rms_norm.ts";
import { chunkLinears } from "../kernels/matmul.ts";
import { SwiGlu } from "../kernels/swiglu.ts";
import { createInvFreqUniform } from "../kernels/rope_kv_write.ts";
import { MatMulNN } from "../kernels/matmul_nn.ts";
import { MatMulTN } from "../kernels/matmul_tn.ts";
import { RmsNormBackward } from "../kernels/rms_norm_backward.ts";
import { SwiGluBackward } from "../kernels/swiglu_backward.ts";
import { Rope } from "../kernels/rope.ts";
import { TokenLogprobs } from "../kernels/token_logprobs.ts";
import { AttentionTrainBackward, AttentionTrainForward } from "../kernels/attention_train.ts";
import { LoraExpand, LoraShrink } from "../kernels/lora.ts";
import { LoraDropout } from "../kernels/lora_dropout.ts";
import { LORA_TARGETS } from "../lora/lora.ts";
import type { AdaptedProjection, LoraParams } from "./lora_params.ts";

/** Logit rows per chunk of the head; a multiple of 64 keeps chunk bindings 256-byte aligned. */
export const HEAD_CHUNK_ROWS = 64;

/** A [rows, stride] f32 region: columns [offset, offset + width) of each row of `buffer`. */
interface Columns {
  buffer: GPUBuffer;
  stride: number;
  offset: number;
}

/** What a forward of a loaded slot runs (TrainingGraph.encodeForward). */
export interface ForwardOptions {
  /** Add the LoRA adapter's output (false: the frozen base, for the reference log-probs). */
  adapter: boolean;
  /** LoRA dropout on the adapter's inputs (training only; needs `adapter`). */
  dropout: boolean;
  /** Layers [fromLayer, toLayer) to record; default: all of them. */
  fromLayer?: number;
  toLayer?: number;
}

/** One layer's forward (#layerForward): ForwardOptions' switches, and where it may stop. */
interface LayerForwardOptions {
  adapter: boolean;
  dropout: boolean;
  /** Stop after the SwiGLU (the recompute for the backward needs no down projection). */
  stopAfterSwiglu: boolean;
}

export interface SequenceSlot {
  /** u32 [maxT]: token ids; targets[t] = tokens[t + 1]. */
  tokens: GPUBuffer;
  targets: GPUBuffer;
  /** x_0..x_L, f32 [maxT, D] each. */
  checkpoints: GPUBuffer[];
  /** f32 [maxT]: log-sum-exp and log-prob of the next token, per row. */
  lse: GPUBuffer;
  logp: GPUBuffer;
  /** f32 [maxT, D]: gradient of the residual stream. */
  dHidden: GPUBuffer;
  /** uniform { rows = T, startPosition = 0 }. */
  rows: GPUBuffer;
  /** uniform { rows = T, seed }: this sequence's LoRA dropout masks. */
  dropout: GPUBuffer;
  /** uniform per embedding chunk { tokens = T, rowStart, chunkRows }. */
  embedParams: GPUBuffer[];
  /** uniform per head chunk { rows, rowOffset, gIndex }. */
  chunkParams: GPUBuffer[];
  /** Length T and prompt length of the sequence now loaded. */
  length: number;
  promptLength: number;
}

export class TrainingGraph {
  readonly slots: [SequenceSlot, SequenceSlot];
  /** Bytes of all buffers this graph owns (activations, checkpoints, work buffers). */
  readonly bytes: number;
  readonly #owned: GPUBuffer[] = [];
  readonly #groups = new Map<string, unknown>();
  readonly #c: ModelConfig;
  readonly #qkvCols: number;
  readonly #rank: number;
  // Work buffers shared by both slots (used one sequence at a time), sized for maxT rows.
  readonly #normed1: GPUBuffer; // [T, D] input-norm output
  readonly #normed2: GPUBuffer; // [T, D] post-attention-norm output
  readonly #qkv: GPUBuffer; // [T, qkvCols] rotated q, k and v
  readonly #attn: GPUBuffer; // [T, H hd]
  readonly #attnLse: GPUBuffer; // [H, maxT]
  readonly #mid: GPUBuffer; // [T, D] residual after attention (recompute)
  readonly #gateUp: GPUBuffer; // [T, 2I]
  readonly #act: GPUBuffer; // [T, I]
  readonly #u: GPUBuffer; // [T, r] LoRA bottleneck x A^T
  readonly #g: GPUBuffer; // [T, r] LoRA bottleneck gradient dy B
  readonly #dNormed: GPUBuffer; // [T, D]
  readonly #dQkv: GPUBuffer; // [T, qkvCols]
  readonly #dAttn: GPUBuffer; // [T, H hd]
  readonly #dGateUp: GPUBuffer; // [T, 2I]
  readonly #dAct: GPUBuffer; // [T, I]
  readonly #last: GPUBuffer; // [64, D] normed rows of a head chunk
  readonly #dLast: GPUBuffer; // [64, D]
  readonly #logits: GPUBuffer; // [64, V]
  /** u32 [maxT] zeros: every row on pool slot 0 (the trained adapter). */
  readonly #zeroSlots: GPUBuffer;
  readonly #invFreq: GPUBuffer;
  /** LoRA dropout probability; with p > 0, [T, widest LoRA input] buffers for x and dx paths. */
  readonly #dropoutP: number;
  readonly #dropped: GPUBuffer | null;
  readonly #dxPath: GPUBuffer | null;
  /** uniform { id } per (layer, target): the mask stream of each LoRA path. */
  readonly #streams: GPUBuffer[];
  readonly #kernels: Kernels;
  /** Kernel wrappers by shape (each wrapper's constructor compiles or looks up pipelines). */
  readonly #wrappers = new Map<string, unknown>();

  constructor(
    private readonly ctx: GpuContext,
    config: ModelConfig,
    private readonly weights: GpuWeights,
    private readonly lora: LoraParams,
    readonly maxTokens: number,
  ) {
    const c = this.#c = config;
    const T = maxTokens, D = c.hiddenSize, I = c.intermediateSize, V = c.vocabSize;
    const hq = c.numHeads * c.headDim;
    this.#qkvCols = (c.numHeads + 2 * c.numKvHeads) * c.headDim;
    this.#rank = lora.config.rank;
    const buf = (floats: number, label: string) => {
      const b = createStorage(ctx, Math.max(floats, 1) * 4, label);
      this.#owned.push(b);
      return b;
    };
    this.#normed1 = buf(T * D, "train.normed1");
    this.#normed2 = buf(T * D, "train.normed2");
    this.#qkv = buf(T * this.#qkvCols, "train.qkv");
    this.#attn = buf(T * hq, "train.attn");
    this.#attnLse = buf(c.numHeads * T, "train.attn_lse");
    this.#mid = buf(T * D, "train.mid");
    this.#gateUp = buf(T * 2 * I, "train.gate_up");
    this.#act = buf(T * I, "train.act");
    this.#u = buf(T * this.#rank, "train.lora_u");
    this.#g = buf(T * this.#rank, "train.lora_g");
    this.#dNormed = buf(T * D, "train.d_normed");
    this.#dQkv = buf(T * this.#qkvCols, "train.d_qkv");
    this.#dAttn = buf(T * hq, "train.d_attn");
    this.#dGateUp = buf(T * 2 * I, "train.d_gate_up");
    this.#dAct = buf(T * I, "train.d_act");
    this.#last = buf(HEAD_CHUNK_ROWS * D, "train.last");
    this.#dLast = buf(HEAD_CHUNK_ROWS * D, "train.d_last");
    this.#logits = buf(HEAD_CHUNK_ROWS * V, "train.logits");
    this.#zeroSlots = buf(T, "train.zero_slots");
    this.#invFreq = createInvFreqUniform(ctx, ropeInvFreq(c));
    this.#owned.push(this.#invFreq);
    this.#dropoutP = lora.config.dropout;
    const widest = Math.max(D, I, hq);
    this.#dropped = this.#dropoutP > 0 ? buf(T * widest, "train.lora_dropped") : null;
    this.#dxPath = this.#dropoutP > 0 ? buf(T * widest, "train.lora_dx_path") : null;

    const uniform = (label: string) => {
      const b = ctx.device.createBuffer({
        size: 16,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
        label,
      });
      this.#owned.push(b);
      return b;
    };
    const chunks = Math.ceil(T / HEAD_CHUNK_ROWS);
    const slot = (s: number): SequenceSlot => ({
      tokens: buf(T, `train.${s}.tokens`),
      targets: buf(T, `train.${s}.targets`),
      checkpoints: Array.from(
        { length: c.numLayers + 1 },
        (_, l) => buf(T * D, `train.${s}.x${l}`),
      ),
      lse: buf(T, `train.${s}.lse`),
      logp: buf(T, `train.${s}.logp`),
      dHidden: buf(T * D, `train.${s}.d_hidden`),
      rows: uniform(`train.${s}.rows`),
      dropout: uniform(`train.${s}.dropout`),
      embedParams: weights.embedding.chunks.map((_, i) => uniform(`train.${s}.embed${i}`)),
      chunkParams: Array.from({ length: chunks }, (_, i) => uniform(`train.${s}.chunk${i}`)),
      length: 0,
      promptLength: 0,
    });
    this.slots = [slot(0), slot(1)];
    this.#streams = this.#dropoutP > 0
      ? Array.from({ length: c.numLayers * LORA_TARGETS.length }, (_, id) => {
        const b = uniform(`train.dropout_stream.${id}`);
        ctx.device.queue.writeBuffer(b, 0, packUniform([["u32", id]]));
        return b;
      })
      : [];
    this.#kernels = makeKernels(ctx, config, weights, maxTokens);
    // The attention backward's own scratch: f32 [H, maxT].
    this.bytes = this.#owned.reduce((sum, b) => sum + b.size, 0) + c.numHeads * T * 4;
  }

  /**
   * Loads a sequence into a slot: tokens (prompt + response), the prompt length, and the index
   * in the loss output buffer of dL/d(sum of this sequence's response log-probs), and the seed
   * of its LoRA dropout masks (used by the forward and the backward alike).
   */
  load(
    slotIndex: 0 | 1,
    tokens: number[],
    promptLength: number,
    gradIndex: number,
    dropoutSeed = 0,
  ): void {
    const s = this.slots[slotIndex];
    const T = tokens.length;
    if (T > this.maxTokens || promptLength < 1 || promptLength >= T) {
      throw new RangeError(
        `training sequence of ${T} tokens with prompt ${promptLength}: need 1 <= prompt < length ` +
          `<= ${this.maxTokens}`,
      );
    }
    s.length = T;
    s.promptLength = promptLength;
    writeBuffer(this.ctx, s.tokens, 0, Uint32Array.from(tokens));
    writeBuffer(this.ctx, s.targets, 0, Uint32Array.from(tokens.slice(1)));
    this.ctx.device.queue.writeBuffer(s.rows, 0, packUniform([["u32", T], ["u32", 0]]));
    this.ctx.device.queue.writeBuffer(
      s.dropout,
      0,
      packUniform([["u32", T], ["u32", dropoutSeed >>> 0]]),
    );
    this.weights.embedding.chunks.forEach((chunk, i) => {
      this.ctx.device.queue.writeBuffer(
        s.embedParams[i],
        0,
        packUniform([["u32", T], ["u32", chunk.rowStart], ["u32", chunk.rows]]),
      );
    });
    s.chunkParams.forEach((params, i) => {
      const rows = Math.max(0, Math.min(HEAD_CHUNK_ROWS, T - 1 - i * HEAD_CHUNK_ROWS));
      this.ctx.device.queue.writeBuffer(
        params,
        0,
        packUniform([["u32", rows], ["u32", i * HEAD_CHUNK_ROWS], ["u32", gradIndex]]),
      );
    });
  }

  /** Head chunks holding response rows (promptLength - 1 .. T - 2) of a loaded slot. */
  #headChunks(s: SequenceSlot): { index: number; rows: number; promptRows: number }[] {
    const out = [];
    const first = s.promptLength - 1;
    for (let i = Math.floor(first / HEAD_CHUNK_ROWS); i * HEAD_CHUNK_ROWS < s.length - 1; i++) {
      const start = i * HEAD_CHUNK_ROWS;
      out.push({
        index: i,
        rows: Math.min(HEAD_CHUNK_ROWS, s.length - 1 - start),
        promptRows: Math.max(0, first - start),
      });
    }
    return out;
  }

  /** One wrapper per (class, options): their constructors look pipelines up by full WGSL text. */
  #wrapper<O, W>(cls: new (ctx: GpuContext, options: O) => W, options: O): W {
    const key = `${cls.name}|${JSON.stringify(options)}`;
    let w = this.#wrappers.get(key) as W | undefined;
    if (!w) this.#wrappers.set(key, w = new cls(this.ctx, options));
    return w;
  }

  /** Bind groups are made once per (op, layer, slot) and reused by every later sequence. */
  #group<G>(key: string, make: () => G): G {
    let g = this.#groups.get(key) as G | undefined;
    if (!g) this.#groups.set(key, g = make());
    return g;
  }

  /** Where each target's output columns sit in the fused projection outputs. */
  #targetColumns(target: LoraTarget, which: "forward" | "grad"): Columns {
    const c = this.#c, hd = c.headDim, H = c.numHeads, Hkv = c.numKvHeads, I = c.intermediateSize;
    const qkv = which === "forward" ? this.#qkv : this.#dQkv;
    const gateUp = which === "forward" ? this.#gateUp : this.#dGateUp;
    switch (target) {
      case "q":
        return { buffer: qkv, stride: this.#qkvCols, offset: 0 };
      case "k":
        return { buffer: qkv, stride: this.#qkvCols, offset: H * hd };
      case "v":
        return { buffer: qkv, stride: this.#qkvCols, offset: (H + Hkv) * hd };
      case "gate":
        return { buffer: gateUp, stride: 2 * I, offset: 0 };
      case "up":
        return { buffer: gateUp, stride: 2 * I, offset: I };
      case "o":
      case "down":
        throw new Error(`${target} writes the residual stream, not a fused output`);
    }
  }

  /** The input columns of a target's projection. */
  #targetInput(target: LoraTarget): Columns {
    const c = this.#c;
    switch (target) {
      case "q":
      case "k":
      case "v":
        return { buffer: this.#normed1, stride: c.hiddenSize, offset: 0 };
      case "gate":
      case "up":
        return { buffer: this.#normed2, stride: c.hiddenSize, offset: 0 };
      case "o":
        return { buffer: this.#attn, stride: c.numHeads * c.headDim, offset: 0 };
      case "down":
        return { buffer: this.#act, stride: c.intermediateSize, offset: 0 };
    }
  }

  // ---- forward ----

  /** y (=|+=) x W^T (+ bias) for T rows, one dispatch per weight chunk. */
  #linear(
    pass: GPUComputePassEncoder,
    key: string,
    s: SequenceSlot,
    params: GPUBuffer,
    rows: number,
    x: BindingResource,
    m: GpuMatrix,
    bias: GPUBuffer | null,
    y: BindingResource,
    accumulate: boolean,
  ) {
    const linears = this.#group(
      `${key}.linears`,
      () => chunkLinears(this.ctx, m, bias, accumulate),
    );
    linears.forEach(({ chunk, matmul, bias: biasSlice }, i) => {
      const group = this.#group(
        `${key}.${i}.${s.rows.label}`,
        () => matmul.bind(params, x, chunk.buffer, biasSlice, y),
      );
      matmul.encode(pass, group, rows);
    });
  }

  /**
   * With dropout (training only): the dropped copy of x [T, in], made in #dropped, which the
   * LoRA path reads instead of x. Without: x itself.
   */
  #loraInput(
    pass: GPUComputePassEncoder,
    s: SequenceSlot,
    p: AdaptedProjection,
    x: Columns,
    dropout: boolean,
  ): Columns {
    if (!dropout || this.#dropped === null) return x;
    const drop = this.#wrapper(LoraDropout, {
      cols: p.in,
      inStride: x.stride,
      inOffset: x.offset,
      outStride: p.in,
      outOffset: 0,
      p: this.#dropoutP,
      accumulate: false,
    });
    const stream = this.#streams[p.layer * LORA_TARGETS.length + LORA_TARGETS.indexOf(p.target)];
    const dropped = this.#dropped;
    drop.encode(
      pass,
      this.#group(
        `drop.${p.layer}.${p.target}.${s.rows.label}`,
        () => drop.bind(s.dropout, stream, x.buffer, dropped),
      ),
      s.length,
    );
    return { buffer: dropped, stride: p.in, offset: 0 };
  }

  /** y[:, out columns] += scale (x A^T) B^T for every row (the trained adapter, pool slot 0). */
  #loraForward(
    pass: GPUComputePassEncoder,
    s: SequenceSlot,
    p: AdaptedProjection,
    input: Columns,
    y: Columns,
    dropout: boolean,
  ) {
    const x = this.#loraInput(pass, s, p, input, dropout);
    const r = this.#rank;
    const shrink = this.#wrapper(LoraShrink, {
      inFeatures: p.in,
      rank: r,
      inStride: x.stride,
      inOffset: x.offset,
    });
    const expand = this.#wrapper(LoraExpand, {
      outFeatures: p.out,
      rank: r,
      outStride: y.stride,
      outOffset: y.offset,
    });
    const key = `lora.${p.layer}.${p.target}.${s.rows.label}.${x.buffer.label}.${y.buffer.label}`;
    const g1 = this.#group(
      `${key}.shrink`,
      () => shrink.bind(s.rows, x.buffer, this.#zeroSlots, p.a.value, this.#u),
    );
    const g2 = this.#group(
      `${key}.expand`,
      () => expand.bind(s.rows, this.#u, this.#zeroSlots, p.b.value, this.lora.scales, y.buffer),
    );
    shrink.encode(pass, g1, s.length);
    expand.encode(pass, g2, s.length);
  }

  /**
   * Layer l's forward on `hidden` (holding x_l; updated in place): with `stopAfterSwiglu` it
   * stops after the SwiGLU, leaving hidden = the residual after attention.
   */
  #layerForward(
    pass: GPUComputePassEncoder,
    l: number,
    s: SequenceSlot,
    hidden: GPUBuffer,
    { adapter, dropout, stopAfterSwiglu }: LayerForwardOptions,
  ) {
    const k = this.#kernels, w = this.weights.layers[l], T = s.length;
    const key = `L${l}.${hidden.label}.${s.rows.label}`;
    const adapted = (t: LoraTarget) => (adapter ? this.lora.projection(l, t) : undefined);

    k.norm.encode(
      pass,
      this.#group(`${key}.norm1`, () => k.norm.bind(s.rows, hidden, w.inputNorm, this.#normed1)),
      T,
    );
    this.#linear(
      pass,
      `${key}.qkv`,
      s,
      s.rows,
      T,
      this.#normed1,
      w.qkv,
      w.qkvBias,
      this.#qkv,
      false,
    );
    for (const t of ["q", "k", "v"] as const) {
      const p = adapted(t);
      if (p) {
        this.#loraForward(
          pass,
          s,
          p,
          this.#targetInput(t),
          this.#targetColumns(t, "forward"),
          dropout,
        );
      }
    }
    const ropeQ = k.ropeQ, ropeK = k.ropeK;
    ropeQ.encode(
      pass,
      this.#group(`${key}.ropeq`, () => ropeQ.bind(s.rows, this.#invFreq, this.#qkv)),
      T,
    );
    ropeK.encode(
      pass,
      this.#group(`${key}.ropek`, () => ropeK.bind(s.rows, this.#invFreq, this.#qkv)),
      T,
    );
    k.attention.encode(
      pass,
      this.#group(
        `${key}.attn`,
        () => k.attention.bind(s.rows, this.#qkv, this.#attn, this.#attnLse),
      ),
      T,
    );
    this.#linear(pass, `${key}.o`, s, s.rows, T, this.#attn, w.o, null, hidden, true);
    const po = adapted("o");
    if (po) {
      this.#loraForward(pass, s, po, this.#targetInput("o"), {
        buffer: hidden,
        stride: this.#c.hiddenSize,
        offset: 0,
      }, dropout);
    }

    k.norm.encode(
      pass,
      this.#group(`${key}.norm2`, () => k.norm.bind(s.rows, hidden, w.postNorm, this.#normed2)),
      T,
    );
    this.#linear(
      pass,
      `${key}.gu`,
      s,
      s.rows,
      T,
      this.#normed2,
      w.gateUp,
      null,
      this.#gateUp,
      false,
    );
    for (const t of ["gate", "up"] as const) {
      const p = adapted(t);
      if (p) {
        this.#loraForward(
          pass,
          s,
          p,
          this.#targetInput(t),
          this.#targetColumns(t, "forward"),
          dropout,
        );
      }
    }
    k.swiglu.encode(
      pass,
      this.#group(`${key}.swiglu`, () => k.swiglu.bind(s.rows, this.#gateUp, this.#act)),
      T,
    );
    if (stopAfterSwiglu) return;
    this.#linear(pass, `${key}.down`, s, s.rows, T, this.#act, w.down, null, hidden, true);
    const pd = adapted("down");
    if (pd) {
      this.#loraForward(pass, s, pd, this.#targetInput("down"), {
        buffer: hidden,
        stride: this.#c.hiddenSize,
        offset: 0,
      }, dropout);
    }
  }

  /**
   * Records the forward of a loaded slot: checkpoints x_0..x_L and the log-prob of every
   * response token (slot.logp rows promptLength-1 .. T-2). A layer range [fromLayer, toLayer)
   * records part of it: the embedding when fromLayer = 0, layers fromLayer..toLayer-1 from
   * checkpoint x_fromLayer, the head when toLayer = L; ranges run in order give the full forward.
   */
  encodeForward(encoder: GPUCommandEncoder, slotIndex: 0 | 1, options: ForwardOptions): void {
    const { adapter, dropout, fromLayer = 0, toLayer = this.#c.numLayers } = options;
    const s = this.slots[slotIndex], k = this.#kernels, T = s.length, D = this.#c.hiddenSize;
    let pass: GPUComputePassEncoder;
    if (fromLayer === 0) {
      pass = encoder.beginComputePass();
      this.weights.embedding.chunks.forEach((chunk, i) => {
        const group = this.#group(
          `embed.${i}.${s.rows.label}`,
          () => k.embedding.bind(s.embedParams[i], s.tokens, chunk.buffer, s.checkpoints[0]),
        );
        k.embedding.encode(pass, group, T);
      });
      pass.end();
    }
    for (let l = fromLayer; l < toLayer; l++) {
      encoder.copyBufferToBuffer(s.checkpoints[l], 0, s.checkpoints[l + 1], 0, T * D * 4);
      pass = encoder.beginComputePass();
      this.#layerForward(pass, l, s, s.checkpoints[l + 1], {
        adapter,
        dropout,
        stopAfterSwiglu: false,
      });
      pass.end();
    }
    if (toLayer < this.#c.numLayers) return;
    pass = encoder.beginComputePass();
    for (const chunk of this.#headChunks(s)) {
      this.#headLogits(pass, s, chunk.index, chunk.rows);
      const params = s.chunkParams[chunk.index];
      const group = this.#group(
        `logp.fwd.${s.rows.label}.${chunk.index}`,
        () => k.logprobs.bindForward(params, this.#logits, s.targets, s.lse, s.logp),
      );
      k.logprobs.encodeForward(pass, group, chunk.rows);
    }
    pass.end();
  }

  /** logits[rows, V] of head chunk `index`: rmsnorm(x_L rows) Wlm^T. */
  #headLogits(pass: GPUComputePassEncoder, s: SequenceSlot, index: number, rows: number) {
    const k = this.#kernels;
    const params = s.chunkParams[index];
    const xL = this.#chunkRows(s.checkpoints[this.#c.numLayers], index);
    k.norm.encode(
      pass,
      this.#group(
        `head.norm.${s.rows.label}.${index}`,
        () => k.norm.bind(params, xL, this.weights.finalNorm, this.#last),
      ),
      rows,
    );
    this.#linear(
      pass,
      `head.lm.${index}`,
      s,
      params,
      rows,
      this.#last,
      this.weights.lmHead,
      null,
      this.#logits,
      false,
    );
  }

  /** Rows [64 index, 64 index + 64) of a [maxT, D] buffer, as a binding. */
  #chunkRows(buffer: GPUBuffer, index: number): BindingResource {
    const D = this.#c.hiddenSize;
    const start = index * HEAD_CHUNK_ROWS;
    const rows = Math.min(HEAD_CHUNK_ROWS, this.maxTokens - start);
    return { buffer, offset: start * D * 4, size: rows * D * 4 };
  }

  // ---- backward ----

  /**
   * dx (+)= dy W for a frozen [N, K] weight W (dy columns [offset, offset + N)), chunk by chunk.
   */
  #linearBackward(
    pass: GPUComputePassEncoder,
    key: string,
    params: GPUBuffer,
    rows: number,
    dy: Columns,
    m: GpuMatrix,
    dx: BindingResource,
    dxStride: number,
    accumulate: boolean,
  ) {
    m.chunks.forEach((chunk, i) => {
      const mm = this.#wrapper(MatMulNN, {
        n: chunk.rows,
        k: m.cols,
        xStride: dy.stride,
        xOffset: dy.offset + chunk.rowStart,
        yStride: dxStride,
        yOffset: 0,
        weight: m.dtype,
        accumulate: accumulate || i > 0,
        alpha: 1,
      });
      const group = this.#group(
        `${key}.${i}.${params.label}`,
        () => mm.bind(params, dy.buffer, chunk.buffer, dx),
      );
      mm.encode(pass, group, rows);
    });
  }

  /**
   * Backward of one LoRA path y += s (x A^T) B^T given dy:
   *   u = x A^T [T, r];  dB += s dy^T u;  g = dy B [T, r];  dA += s g^T x;  dx += s g A.
   */
  #loraBackward(
    pass: GPUComputePassEncoder,
    s: SequenceSlot,
    p: AdaptedProjection,
    input: Columns,
    dy: Columns,
    dxOut: Columns,
  ) {
    const r = this.#rank, scale = this.lora.scale, T = s.length;
    const key = `lorab.${p.layer}.${p.target}.${s.rows.label}`;
    // With dropout, x is the dropped input (same mask as the forward) and the dx path goes through
    // #dxPath, then back through the mask into dx.
    const x = this.#loraInput(pass, s, p, input, true);
    const dx: Columns = this.#dxPath ? { buffer: this.#dxPath, stride: p.in, offset: 0 } : dxOut;
    const shrink = this.#wrapper(LoraShrink, {
      inFeatures: p.in,
      rank: r,
      inStride: x.stride,
      inOffset: x.offset,
    });
    shrink.encode(
      pass,
      this.#group(
        `${key}.u`,
        () => shrink.bind(s.rows, x.buffer, this.#zeroSlots, p.a.value, this.#u),
      ),
      T,
    );
    const dB = this.#wrapper(MatMulTN, {
      m: p.out,
      n: r,
      pStride: dy.stride,
      pOffset: dy.offset,
      qStride: r,
      qOffset: 0,
      accumulate: true,
      alpha: scale,
    });
    dB.encode(pass, this.#group(`${key}.dB`, () => dB.bind(s.rows, dy.buffer, this.#u, p.b.grad)));
    const g = this.#wrapper(MatMulNN, {
      n: p.out,
      k: r,
      xStride: dy.stride,
      xOffset: dy.offset,
      yStride: r,
      yOffset: 0,
      weight: "f32",
      accumulate: false,
      alpha: 1,
    });
    g.encode(pass, this.#group(`${key}.g`, () => g.bind(s.rows, dy.buffer, p.b.value, this.#g)), T);
    const dA = this.#wrapper(MatMulTN, {
      m: r,
      n: p.in,
      pStride: r,
      pOffset: 0,
      qStride: x.stride,
      qOffset: x.offset,
      accumulate: true,
      alpha: scale,
    });
    dA.encode(pass, this.#group(`${key}.dA`, () => dA.bind(s.rows, this.#g, x.buffer, p.a.grad)));
    const dxPath = this.#wrapper(MatMulNN, {
      n: r,
      k: p.in,
      xStride: r,
      xOffset: 0,
      yStride: dx.stride,
      yOffset: dx.offset,
      weight: "f32",
      accumulate: this.#dxPath === null,
      alpha: scale,
    });
    dxPath.encode(
      pass,
      this.#group(`${key}.dx`, () => dxPath.bind(s.rows, this.#g, p.a.value, dx.buffer)),
      T,
    );
    if (this.#dxPath) {
      const drop = this.#wrapper(LoraDropout, {
        cols: p.in,
        inStride: p.in,
        inOffset: 0,
        outStride: dxOut.stride,
        outOffset: dxOut.offset,
        p: this.#dropoutP,
        accumulate: true,
      });
      const stream = this.#streams[p.layer * LORA_TARGETS.length + LORA_TARGETS.indexOf(p.target)];
      drop.encode(
        pass,
        this.#group(`${key}.dropdx`, () => drop.bind(s.dropout, stream, dx.buffer, dxOut.buffer)),
        T,
      );
    }
  }

  /**
   * Records the head's backward for a slot whose forward and loss ran: dHidden = d(loss)/d x_L
   * (zero outside the response rows).
   */
  encodeHeadBackward(encoder: GPUCommandEncoder, slotIndex: 0 | 1, lossOutput: GPUBuffer): void {
    const s = this.slots[slotIndex],
      k = this.#kernels,
      c = this.#c,
      D = c.hiddenSize,
      V = c.vocabSize;
    encoder.clearBuffer(s.dHidden, 0, s.length * D * 4);
    for (const chunk of this.#headChunks(s)) {
      const params = s.chunkParams[chunk.index];
      let pass = encoder.beginComputePass();
      this.#headLogits(pass, s, chunk.index, chunk.rows);
      const group = this.#group(
        `logp.bwd.${s.rows.label}.${chunk.index}`,
        () => k.logprobs.bindBackward(params, this.#logits, s.targets, s.lse, lossOutput),
      );
      k.logprobs.encodeBackward(pass, group, chunk.rows);
      pass.end();
      // Rows of the chunk that predict prompt tokens carry no loss.
      if (chunk.promptRows > 0) encoder.clearBuffer(this.#logits, 0, chunk.promptRows * V * 4);
      pass = encoder.beginComputePass();
      this.#linearBackward(
        pass,
        "head.dlast",
        params,
        chunk.rows,
        { buffer: this.#logits, stride: V, offset: 0 },
        this.weights.lmHead,
        this.#dLast,
        D,
        false,
      );
      const xL = this.#chunkRows(s.checkpoints[c.numLayers], chunk.index);
      const dx = this.#chunkRows(s.dHidden, chunk.index);
      k.normBackwardOverwrite.encode(
        pass,
        this.#group(
          `head.normb.${s.rows.label}.${chunk.index}`,
          () => k.normBackwardOverwrite.bind(params, xL, this.weights.finalNorm, this.#dLast, dx),
        ),
        chunk.rows,
      );
      pass.end();
    }
  }

  /**
   * Records the backward of layer l for a slot: on entry dHidden = dL/d x_{l+1}, on exit
   * dL/d x_l; the adapter's gradients accumulate.
   */
  encodeLayerBackward(encoder: GPUCommandEncoder, l: number, slotIndex: 0 | 1): void {
    const s = this.slots[slotIndex], k = this.#kernels, c = this.#c, w = this.weights.layers[l];
    const T = s.length, D = c.hiddenSize, I = c.intermediateSize, hq = c.numHeads * c.headDim;
    const key = `B${l}.${s.rows.label}`;
    encoder.copyBufferToBuffer(s.checkpoints[l], 0, this.#mid, 0, T * D * 4);
    const pass = encoder.beginComputePass();
    // The recompute runs as the training forward did: adapter and dropout on.
    this.#layerForward(pass, l, s, this.#mid, {
      adapter: true,
      dropout: true,
      stopAfterSwiglu: true,
    });
    const dHidden: Columns = { buffer: s.dHidden, stride: D, offset: 0 };
    const adapted = (t: LoraTarget) => this.lora.projection(l, t);

    // Down projection: x_{l+1} = mid + act Wd^T (+ LoRA).
    this.#linearBackward(pass, `${key}.down`, s.rows, T, dHidden, w.down, this.#dAct, I, false);
    const pd = adapted("down");
    if (pd) {
      this.#loraBackward(pass, s, pd, this.#targetInput("down"), dHidden, {
        buffer: this.#dAct,
        stride: I,
        offset: 0,
      });
    }
    k.swigluBackward.encode(
      pass,
      this.#group(
        `${key}.swiglub`,
        () => k.swigluBackward.bind(s.rows, this.#gateUp, this.#dAct, this.#dGateUp),
      ),
      T,
    );
    this.#linearBackward(
      pass,
      `${key}.gu`,
      s.rows,
      T,
      { buffer: this.#dGateUp, stride: 2 * I, offset: 0 },
      w.gateUp,
      this.#dNormed,
      D,
      false,
    );
    for (const t of ["gate", "up"] as const) {
      const p = adapted(t);
      if (p) {
        this.#loraBackward(pass, s, p, this.#targetInput(t), this.#targetColumns(t, "grad"), {
          buffer: this.#dNormed,
          stride: D,
          offset: 0,
        });
      }
    }
    k.normBackward.encode(
      pass,
      this.#group(
        `${key}.norm2b`,
        () => k.normBackward.bind(s.rows, this.#mid, w.postNorm, this.#dNormed, s.dHidden),
      ),
      T,
    );

    // Attention block: mid = x_l + attn Wo^T (+ LoRA).
    this.#linearBackward(pass, `${key}.o`, s.rows, T, dHidden, w.o, this.#dAttn, hq, false);
    const po = adapted("o");
    if (po) {
      this.#loraBackward(pass, s, po, this.#targetInput("o"), dHidden, {
        buffer: this.#dAttn,
        stride: hq,
        offset: 0,
      });
    }
    k.attentionBackward.encode(
      pass,
      this.#group(
        `${key}.attnb`,
        () =>
          k.attentionBackward.bind(
            s.rows,
            this.#qkv,
            this.#attn,
            this.#attnLse,
            this.#dAttn,
            this.#dQkv,
          ),
      ),
      T,
    );
    const ropeQ = k.ropeQBackward, ropeK = k.ropeKBackward;
    ropeQ.encode(
      pass,
      this.#group(`${key}.ropeqb`, () => ropeQ.bind(s.rows, this.#invFreq, this.#dQkv)),
      T,
    );
    ropeK.encode(
      pass,
      this.#group(`${key}.ropekb`, () => ropeK.bind(s.rows, this.#invFreq, this.#dQkv)),
      T,
    );
    this.#linearBackward(
      pass,
      `${key}.qkv`,
      s.rows,
      T,
      { buffer: this.#dQkv, stride: this.#qkvCols, offset: 0 },
      w.qkv,
      this.#dNormed,
      D,
      false,
    );
    for (const t of ["q", "k", "v"] as const) {
      const p = adapted(t);
      if (p) {
        this.#loraBackward(pass, s, p, this.#targetInput(t), this.#targetColumns(t, "grad"), {
          buffer: this.#dNormed,
          stride: D,
          offset: 0,
        });
      }
    }
    k.normBackward.encode(
      pass,
      this.#group(
        `${key}.norm1b`,
        () => k.normBackward.bind(s.rows, s.checkpoints[l], w.inputNorm, this.#dNormed, s.dHidden),
      ),
      T,
    );
    pass.end();
  }

  destroy(): void {
    this.#kernels.attentionBackward.destroy();
    for (const b of this.#owned) b.destroy();
    this.#groups.clear();
  }
}

/** The kernels whose shape depends only on the model (one instance each). */
function makeKernels(ctx: GpuContext, c: ModelConfig, w: GpuWeights, maxTokens: number) {
  const D = c.hiddenSize, I = c.intermediateSize, hd = c.headDim;
  const H = c.numHeads, Hkv = c.numKvHeads, qkvCols = (H + 2 * Hkv) * hd;
  const attnShape = { numHeads: H, numKvHeads: Hkv, headDim: hd, maxTokens };
  const rope = (heads: number, offset: number, inverse: boolean) =>
    new Rope(ctx, { heads, headDim: hd, stride: qkvCols, offset, inverse });
  return {
    embedding: new Embedding(ctx, { dim: D, weight: w.embedding.dtype }),
    norm: new RmsNorm(ctx, D, c.rmsNormEps),
    normBackward: new RmsNormBackward(ctx, { dim: D, eps: c.rmsNormEps, accumulate: true }),
    normBackwardOverwrite: new RmsNormBackward(ctx, {
      dim: D,
      eps: c.rmsNormEps,
      accumulate: false,
    }),
    swiglu: new SwiGlu(ctx, I),
    swigluBackward: new SwiGluBackward(ctx, { intermediate: I }),
    ropeQ: rope(H, 0, false),
    ropeK: rope(Hkv, H * hd, false),
    ropeQBackward: rope(H, 0, true),
    ropeKBackward: rope(Hkv, H * hd, true),
    attention: new AttentionTrainForward(ctx, attnShape),
    attentionBackward: new AttentionTrainBackward(ctx, attnShape),
    logprobs: new TokenLogprobs(ctx, { vocabSize: c.vocabSize }),
  };
}

type Kernels = ReturnType<typeof makeKernels>;
