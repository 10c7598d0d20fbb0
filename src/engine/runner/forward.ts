/**
 * The batched forward pass of a Llama/Qwen2 model as a fixed list of kernel
 * dispatches over the step's token batch (T tokens, S sequences):
 *
 *   tokenIds[fed-back tokens] = sampled (of the previous step)
 *   hidden[T,D] = embed(tokenIds)
 *   per layer:  normed = rmsnorm(hidden)
 *               qkv[T,(H+2Hkv)hd] = normed·Wqkv^T (+bias)
 *               q[T,H*hd] = rope(q); K/V pools[layer] <- rope(k), v   (paged)
 *               attn[T,H*hd] = attention(q, K/V pools)   (prefill tiles + decode tokens)
 *               hidden += attn·Wo^T
 *               normed = rmsnorm(hidden)
 *               gateUp[T,2I] = normed·Wgu^T;  act[T,I] = silu(gate)*up
 *               hidden += act·Wdown^T
 *   (with an adapter pool, each adapted projection P of the layer also gets, for the step's tokens
 *    on an adapter:  y_P[t] += scale_s · (x_P[t] A_s^T) B_s^T  with s the token's adapter slot;
 *    q/k/v into their column ranges of qkv, gate/up into gateUp's, o and down into hidden.
 *    Steps without adapter tokens dispatch none of it.)
 *   last[S,D] = rmsnorm(hidden[logitRows]);  logits[S,V] = last·Wlm^T
 *   sampled[S] = sample(logits)
 *
 * Bind groups are built once here; encode() only records dispatches with the
 * step's counts.
 */
import type { GpuContext } from "../gpu/context.ts";
import { createStorage } from "../gpu/buffers.ts";
import type { BindingResource } from "../gpu/kernel.ts";
import { type ModelConfig, ropeInvFreq } from "../model/config.ts";
import type { GpuMatrix, GpuWeights } from "../model/gpu_weights.ts";
import { RmsNorm } from "../kernels/rms_norm.ts";
import { chunkLinears } from "../kernels/matmul.ts";
import { Embedding } from "../kernels/embedding.ts";
import { SwiGlu } from "../kernels/swiglu.ts";
import { AttentionDecode, AttentionPrefill } from "../kernels/attention.ts";
import { AttentionMass } from "../kernels/attention_mass.ts";
import { createInvFreqUniform, RopeKvWrite } from "../kernels/rope_kv_write.ts";
import { FinalNorm } from "../kernels/final_norm.ts";
import { Sampler } from "../kernels/sample.ts";
import { TokenFeedback } from "../kernels/token_feedback.ts";
import { LoraExpand, LoraShrink } from "../kernels/lora.ts";
import type { AdapterPool } from "../lora/adapter_pool.ts";
import type { LoraTarget } from "../lora/lora.ts";
import type { Region, StepCapacity, StepCounts, StepLayout } from "./step_data.ts";
import type { UniformArena } from "./uniform_arena.ts";

export interface ForwardInputs {
  ctx: GpuContext;
  config: ModelConfig;
  capacity: StepCapacity;
  weights: GpuWeights;
  kvBlocks: number;
  layout: StepLayout;
  stepBuffer: GPUBuffer;
  uniforms: UniformArena<StepCounts>;
  /** Resident LoRA adapters; null: the engine serves the base model only. */
  lora: AdapterPool | null;
}

export interface Forward {
  /** u32 [maxTokens]: the step's input token ids (layout.tokenIds is uploaded here). */
  tokenIds: GPUBuffer;
  /** u32 [maxSeqs]: the sampled token of each sampling sequence, in sample order. */
  sampled: GPUBuffer;
  /** f32 [maxSeqs, V]: logits of the sampling rows of the last step. */
  logits: GPUBuffer;
  activationBytes: number;
  /** KV pool bytes (all layers, K and V). */
  kvBytes: number;
  /** Every layer's K pool, then every layer's V pool: f32 [kvBlocks, Hkv, BS, hd] each. */
  kvCaches: readonly GPUBuffer[];
  /** Bytes of one block in one pool. */
  kvBlockBytes: number;
  /** f32 [kvBlocks * blockSize]: accumulated attention mass of each physical KV slot. */
  mass: GPUBuffer;
  kCaches: readonly GPUBuffer[];
  vCaches: readonly GPUBuffer[];
  dispatches: readonly ForwardDispatch[];
  /** Bytes of weights one step reads (every matrix once; the embedding only its gathered rows). */
  weightBytesPerStep(counts: StepCounts): number;
  encode(pass: GPUComputePassEncoder, counts: StepCounts): void;
  destroy(): void;
}

/** One labelled group of dispatches, with its analytic cost (the benchmark's per-kernel table). */
export interface ForwardDispatch {
  kind: string;
  run: (pass: GPUComputePassEncoder, counts: StepCounts) => void;
  /** Bytes moved (weights + activations read and written) and floating-point operations. */
  cost: (counts: StepCounts) => { bytes: number; flops: number };
}

export function buildForward(inputs: ForwardInputs): Forward {
  const { ctx, config: c, capacity, weights, layout, stepBuffer, uniforms } = inputs;
  const T = capacity.maxTokens, S = capacity.maxSeqs;
  const D = c.hiddenSize, hd = c.headDim, H = c.numHeads, Hkv = c.numKvHeads;
  const I = c.intermediateSize, V = c.vocabSize, qkvCols = (H + 2 * Hkv) * hd;
  const dtype = weights.embedding.dtype;

  const owned: GPUBuffer[] = [];
  const buffer = (floats: number, label: string) => {
    const b = createStorage(ctx, floats * 4, label);
    owned.push(b);
    return b;
  };
  const hidden = buffer(T * D, "hidden");
  const normed = buffer(T * D, "normed");
  const qkv = buffer(T * qkvCols, "qkv");
  const q = buffer(T * H * hd, "q");
  const attn = buffer(T * H * hd, "attn");
  const gateUp = buffer(T * 2 * I, "gate_up");
  const act = buffer(T * I, "act");
  const last = buffer(S * D, "last");
  const logits = buffer(S * V, "logits");
  const sampled = buffer(S, "sampled");
  // The step's input ids live apart from the other step data: token feedback writes them while
  // reading the step data, and one dispatch may not read and write the same buffer.
  const tokenIds = buffer(T, "token ids");
  // x·A^T of the adapted projection being computed, f32 [T, maxRank] (reused by every projection).
  const loraU = inputs.lora ? buffer(T * inputs.lora.maxRank, "lora_u") : null;
  const activationBytes = owned.reduce((sum, b) => sum + b.size, 0);
  const kvFloats = inputs.kvBlocks * Hkv * capacity.blockSize * hd;
  // Attention mass per physical KV slot (H2O pruning), summed over layers and heads / (L * H).
  const mass = buffer(inputs.kvBlocks * capacity.blockSize, "attention_mass");
  const kCaches = Array.from({ length: c.numLayers }, (_, l) => buffer(kvFloats, `k_cache.${l}`));
  const vCaches = Array.from({ length: c.numLayers }, (_, l) => buffer(kvFloats, `v_cache.${l}`));

  const step = (r: Region): BindingResource => ({
    buffer: stepBuffer,
    offset: r.offset,
    size: r.size,
  });
  const tokensUniform = uniforms.slot((n) => [["u32", n.tokens]]);
  const seqsUniform = uniforms.slot((n) => [["u32", n.sampledSeqs]]);
  const decodeUniform = uniforms.slot((n) => [["u32", n.decodeTokens]]);
  const tilesUniform = uniforms.slot((n) => [["u32", n.tiles]]);

  const dispatches: ForwardDispatch[] = [];
  const add = (kind: string, run: ForwardDispatch["run"], cost: ForwardDispatch["cost"]) =>
    dispatches.push({ kind, run, cost });
  const wordBytes = (dtype: string) => (dtype === "f16" ? 2 : 4);

  // Inputs sampled by the previous step (FEEDBACK_TOKEN) land in tokenIds before the embedding.
  const feedback = new TokenFeedback(ctx);
  const feedbackGroup = feedback.bind(
    uniforms.slot((n) => [["u32", n.feedbackTokens]]),
    step(layout.feedback),
    sampled,
    tokenIds,
  );
  add(
    "token_feedback",
    (pass, n) => feedback.encode(pass, feedbackGroup, n.feedbackTokens),
    (n) => ({
      bytes: n.feedbackTokens * 12,
      flops: 0,
    }),
  );

  // Embedding: one dispatch per vocabulary chunk.
  const embedding = new Embedding(ctx, { dim: D, weight: dtype });
  for (const chunk of weights.embedding.chunks) {
    const params = uniforms.slot((
      n,
    ) => [["u32", n.tokens], ["u32", chunk.rowStart], ["u32", chunk.rows]]);
    const group = embedding.bind(params, tokenIds, chunk.buffer, hidden);
    add("embedding", (pass, n) => embedding.encode(pass, group, n.tokens), (n) => ({
      bytes: n.tokens * D * (4 + wordBytes(dtype)),
      flops: 0,
    }));
  }

  /** y (=|+=) x·W^T (+bias) over `rows`, one dispatch per weight chunk. */
  const linear = (
    x: GPUBuffer,
    m: GpuMatrix,
    bias: GPUBuffer | null,
    y: GPUBuffer,
    accumulate: boolean,
    rows: "tokens" | "sampledSeqs",
  ) => {
    const params = rows === "tokens" ? tokensUniform : seqsUniform;
    for (const { chunk, matmul: mm, bias: biasSlice } of chunkLinears(ctx, m, bias, accumulate)) {
      const group = mm.bind(params, x, chunk.buffer, biasSlice, y);
      add(
        rows === "tokens" ? "matmul" : "lm_head",
        (pass, n) => mm.encode(pass, group, n[rows]),
        (n) => ({
          // The weights are read only when the dispatch has rows to compute.
          bytes: (n[rows] > 0 ? chunk.rows * m.cols * wordBytes(m.dtype) : 0) +
            n[rows] * (m.cols + chunk.rows) * 4,
          flops: 2 * n[rows] * chunk.rows * m.cols,
        }),
      );
    }
  };

  /**
   * After the projection `target` of layer `l` (input x [T, xStride], output columns yOffset.. of
   * y [T, yStride]), adds its LoRA for the step's adapter tokens. Rows on no adapter cost one
   * zero write in the shrink; steps without adapter tokens dispatch nothing.
   */
  const adapt = (
    l: number,
    target: LoraTarget,
    x: GPUBuffer,
    xStride: number,
    y: GPUBuffer,
    yStride: number,
    yOffset: number,
  ) => {
    const pool = inputs.lora?.layers[l].get(target);
    if (!pool || !loraU) return;
    const R = inputs.lora!.maxRank;
    const shrink = new LoraShrink(ctx, { inFeatures: pool.in, rank: R, inStride: xStride });
    const expand = new LoraExpand(ctx, {
      outFeatures: pool.out,
      rank: R,
      outStride: yStride,
      outOffset: yOffset,
    });
    const slots = step(layout.loraSlots);
    const shrinkGroup = shrink.bind(tokensUniform, x, slots, pool.a, loraU);
    const expandGroup = expand.bind(tokensUniform, loraU, slots, pool.b, inputs.lora!.scales, y);
    const rows = (n: StepCounts) => (n.loraTokens > 0 ? n.tokens : 0);
    add("lora_shrink", (pass, n) => shrink.encode(pass, shrinkGroup, rows(n)), (n) => ({
      bytes: rows(n) * (pool.in + R) * 4 + n.loraTokens * R * pool.in * 4,
      flops: 2 * n.loraTokens * R * pool.in,
    }));
    add("lora_expand", (pass, n) => expand.encode(pass, expandGroup, rows(n)), (n) => ({
      bytes: n.loraTokens * (R + pool.out * R + 2 * pool.out) * 4,
      flops: 2 * n.loraTokens * pool.out * R,
    }));
  };

  const norm = new RmsNorm(ctx, D, c.rmsNormEps);
  const normCost = (n: StepCounts) => ({ bytes: n.tokens * 2 * D * 4, flops: n.tokens * 4 * D });
  /** Attention reads every attended key and value once (per KV head) for each query token. */
  const attentionCost = (n: StepCounts, decodeKernel: boolean) => {
    const keys = decodeKernel ? n.decodeAttended : n.prefillAttended;
    return { bytes: keys * Hkv * hd * 2 * 4, flops: keys * H * hd * 4 };
  };
  const attnShape = { numHeads: H, numKvHeads: Hkv, headDim: hd, blockSize: capacity.blockSize };
  const rope = new RopeKvWrite(ctx, attnShape);
  const invFreq = createInvFreqUniform(ctx, ropeInvFreq(c));
  owned.push(invFreq);
  const prefill = new AttentionPrefill(ctx, attnShape);
  const decode = new AttentionDecode(ctx, attnShape);
  const attentionMass = new AttentionMass(ctx, attnShape);
  const massUniform = uniforms.slot((n) => [["u32", n.massChunks], ["f32", 1 / (H * c.numLayers)]]);
  const swiglu = new SwiGlu(ctx, I);

  weights.layers.forEach((w, l) => {
    const inNorm = norm.bind(tokensUniform, hidden, w.inputNorm, normed);
    add("rms_norm", (pass, n) => norm.encode(pass, inNorm, n.tokens), normCost);
    linear(normed, w.qkv, w.qkvBias, qkv, false, "tokens");
    adapt(l, "q", normed, D, qkv, qkvCols, 0);
    adapt(l, "k", normed, D, qkv, qkvCols, H * hd);
    adapt(l, "v", normed, D, qkv, qkvCols, (H + Hkv) * hd);
    const ropeGroup = rope.bind(
      tokensUniform,
      qkv,
      step(layout.positions),
      step(layout.tokenSeq),
      step(layout.seqs),
      step(layout.blockTables),
      invFreq,
      q,
      kCaches[l],
      vCaches[l],
    );
    add("rope_kv_write", (pass, n) => rope.encode(pass, ropeGroup, n.tokens), (n) => ({
      bytes: n.tokens * (qkvCols + (H + 2 * Hkv) * hd) * 4,
      flops: n.tokens * (H + Hkv) * hd * 3,
    }));
    const prefillGroup = prefill.bind(
      tilesUniform,
      q,
      step(layout.slots),
      step(layout.seqs),
      step(layout.blockTables),
      kCaches[l],
      vCaches[l],
      step(layout.tiles),
      attn,
    );
    const decodeGroup = decode.bind(
      decodeUniform,
      q,
      step(layout.slots),
      step(layout.seqs),
      step(layout.blockTables),
      kCaches[l],
      vCaches[l],
      step(layout.decodeTokens),
      attn,
    );
    add(
      "attention_prefill",
      (pass, n) => prefill.encode(pass, prefillGroup, n.tiles),
      (n) => attentionCost(n, false),
    );
    add(
      "attention_decode",
      (pass, n) => decode.encode(pass, decodeGroup, n.decodeTokens),
      (n) => attentionCost(n, true),
    );
    const massGroup = attentionMass.bind(
      massUniform,
      q,
      step(layout.blockTables),
      kCaches[l],
      step(layout.massChunks),
      mass,
    );
    // Cost not modelled (step counts do not sum the keys of KV-budget sequences): the per-kernel
    // table leaves it out, and the benchmarks run without KV budgets, where it never dispatches.
    add("attention_mass", (pass, n) => attentionMass.encode(pass, massGroup, n.massChunks), () => ({
      bytes: 0,
      flops: 0,
    }));
    linear(attn, w.o, null, hidden, true, "tokens");
    adapt(l, "o", attn, H * hd, hidden, D, 0);
    const postNorm = norm.bind(tokensUniform, hidden, w.postNorm, normed);
    add("rms_norm", (pass, n) => norm.encode(pass, postNorm, n.tokens), normCost);
    linear(normed, w.gateUp, null, gateUp, false, "tokens");
    adapt(l, "gate", normed, D, gateUp, 2 * I, 0);
    adapt(l, "up", normed, D, gateUp, 2 * I, I);
    const swigluGroup = swiglu.bind(tokensUniform, gateUp, act);
    add("swiglu", (pass, n) => swiglu.encode(pass, swigluGroup, n.tokens), (n) => ({
      bytes: n.tokens * 3 * I * 4,
      flops: n.tokens * I * 6,
    }));
    linear(act, w.down, null, hidden, true, "tokens");
    adapt(l, "down", act, I, hidden, D, 0);
  });

  const finalNorm = new FinalNorm(ctx, D, c.rmsNormEps);
  const finalGroup = finalNorm.bind(
    seqsUniform,
    hidden,
    step(layout.logitRows),
    weights.finalNorm,
    last,
  );
  add("final_norm", (pass, n) => finalNorm.encode(pass, finalGroup, n.sampledSeqs), (n) => ({
    bytes: n.sampledSeqs * 2 * D * 4,
    flops: n.sampledSeqs * 4 * D,
  }));
  linear(last, weights.lmHead, null, logits, false, "sampledSeqs");
  const sampler = new Sampler(ctx, V);
  const samplerGroup = sampler.bind(seqsUniform, logits, step(layout.sampling), sampled);
  add("sample", (pass, n) => sampler.encode(pass, samplerGroup, n.sampledSeqs), (n) => ({
    bytes: n.sampledSeqs * V * 4,
    flops: n.sampledSeqs * V * 4,
  }));

  const matrixWeightBytes = (m: GpuMatrix) => m.rows * m.cols * wordBytes(m.dtype);
  let layerWeightBytes = 0;
  for (const w of weights.layers) {
    layerWeightBytes += matrixWeightBytes(w.qkv) + matrixWeightBytes(w.o) +
      matrixWeightBytes(w.gateUp) + matrixWeightBytes(w.down);
  }
  return {
    tokenIds,
    sampled,
    logits,
    activationBytes,
    kvBytes: (kCaches.length + vCaches.length) * kvFloats * 4,
    kvCaches: [...kCaches, ...vCaches],
    mass,
    kCaches,
    vCaches,
    kvBlockBytes: Hkv * capacity.blockSize * hd * 4,
    dispatches,
    weightBytesPerStep: (n) =>
      layerWeightBytes + n.tokens * D * wordBytes(dtype) +
      (n.sampledSeqs > 0 ? matrixWeightBytes(weights.lmHead) : 0),
    encode(pass, counts) {
      // Steps that sample nothing (pure prefill chunks) skip the head entirely:
      // the last three dispatches see sampledSeqs = 0 and record nothing.
      for (const d of dispatches) d.run(pass, counts);
    },
    destroy() {
      for (const b of owned) b.destroy();
    },
  };
}
