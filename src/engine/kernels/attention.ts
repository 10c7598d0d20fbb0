/**
 * Paged causal attention over the token batch (see the shader headers for the math):
 *  - AttentionDecode (attention_decode.wgsl): one workgroup per listed token (pairs (token, seq)
 *    in decodeTokens) and group of query heads sharing a kv head; threads split the keys; any
 *    context length.
 *  - AttentionPrefill (attention_prefill.wgsl): one workgroup per tile of up to PREFILL_TILE_Q
 *    consecutive query tokens of one sequence and head; each thread owns 1-4 queries.
 * Both read q [T, H hd] and the K/V pools [numBlocks, Hkv, BS, hd] through the block tables and
 * write out [T, H hd] for their tokens only, so one step runs both into the same `out`.
 * planAttention splits a step's sequences between them.
 */
import decodeCode from "../../shaders/attention_decode.wgsl" with { type: "text" };
import prefillCode from "../../shaders/attention_prefill.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingKind, type BindingResource, Kernel } from "../gpu/kernel.ts";
import { InvalidRequestError, ModelFormatError } from "../errors.ts";

export interface AttentionShape {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** Tokens per KV block (BS). */
  blockSize: number;
}

/** Queries per prefill tile (TILE_Q in attention_prefill.wgsl). */
export const PREFILL_TILE_Q = 32;
/** Largest head dim: a thread keeps q and an accumulator of up to 32 vec4s (MAX_STATE) each. */
const MAX_HEAD_DIM = 128;
/** Most query heads one decode workgroup packs (MAX_PACK in attention_decode.wgsl). */
const MAX_PACK = 8;
/** Small heads share each key and value load among this many vec4s of query state: enough reuse
 *  to make loads cheap, few enough registers for a real GPU. */
const REUSE_VEC4 = 8;

/** Validated override constants shared by the attention-shaped kernels (H, HKV, HD, BS, SCALE). */
export function attentionConstants(kernel: string, shape: AttentionShape) {
  const { numHeads, numKvHeads, headDim, blockSize } = shape;
  if (headDim % 4 !== 0 || headDim <= 0 || headDim > MAX_HEAD_DIM) {
    throw new ModelFormatError(
      "config.json",
      `head_dim ${headDim} is not supported by ${kernel} ` +
        `(needs a multiple of 4, at most ${MAX_HEAD_DIM})`,
    );
  }
  if (!Number.isInteger(blockSize) || blockSize <= 0) {
    throw new InvalidRequestError(`KV block size ${blockSize} must be a positive integer`);
  }
  if (numKvHeads <= 0 || numHeads % numKvHeads !== 0) {
    throw new ModelFormatError(
      "config.json",
      `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`,
    );
  }
  return {
    H: numHeads,
    HKV: numKvHeads,
    HD: headDim,
    BS: blockSize,
    SCALE: Math.fround(1 / Math.sqrt(headDim)),
  };
}

/** Queries per prefill thread: 4, 2 or 1 (TILE_Q / ROWS threads per workgroup). */
function prefillRowsPerThread(headDim: number): number {
  const vec4s = headDim / 4;
  return vec4s * 4 <= REUSE_VEC4 ? 4 : vec4s * 2 <= REUSE_VEC4 ? 2 : 1;
}

/** Query heads per decode workgroup: the largest divisor of the GQA group size that fits. */
function decodeHeadsPerGroup(shape: AttentionShape): number {
  const group = shape.numHeads / shape.numKvHeads;
  const vec4s = shape.headDim / 4;
  let pack = 1;
  for (let g = 2; g <= Math.min(group, MAX_PACK); g++) {
    if (group % g === 0 && g * vec4s <= REUSE_VEC4) pack = g;
  }
  return pack;
}

/**
 * Both kernels: params, then q, slots (each token's index in its sequence's KV: its position
 * unless the KV was pruned), seqs, blockTables, kCache, vCache, list; then out.
 */
const BINDINGS: BindingKind[] = ["uniform", ...Array<BindingKind>(7).fill("read"), "storage"];

export class AttentionDecode {
  private readonly kernel: Kernel;
  private readonly headGroups: number;

  /**
   * options.threads: threads per workgroup splitting the keys, 1..64 (default: 8, one SIMD group,
   * on CPU-emulated adapters; else 32).
   */
  constructor(ctx: GpuContext, readonly shape: AttentionShape, options: { threads?: number } = {}) {
    const constants = attentionConstants("attention_decode", shape);
    const threads = options.threads ?? (ctx.isSoftware ? 8 : 32);
    if (!Number.isInteger(threads) || threads < 1 || threads > 64) {
      throw new InvalidRequestError(
        `attention_decode threads must be an integer in 1..64, got ${threads}`,
      );
    }
    const pack = decodeHeadsPerGroup(shape);
    this.headGroups = shape.numHeads / pack;
    this.kernel = Kernel.get(ctx, {
      name: "attention_decode",
      code: decodeCode,
      bindings: BINDINGS,
      constants: { ...constants, PACK: pack, WG: threads },
    });
  }

  /**
   * params: uniform { count: u32 }; decodeTokens: u32 pairs (token, seq) [count, 2], e.g.
   * planAttention's decodeTokens; the other buffers as in the token-batch layout.
   */
  bind(
    params: BindingResource,
    q: BindingResource,
    slots: BindingResource,
    seqs: BindingResource,
    blockTables: BindingResource,
    kCache: BindingResource,
    vCache: BindingResource,
    decodeTokens: BindingResource,
    out: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([
      params,
      q,
      slots,
      seqs,
      blockTables,
      kCache,
      vCache,
      decodeTokens,
      out,
    ]);
  }

  /** Records the dispatch for `numListed` listed tokens (params.count). */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, numListed: number): void {
    this.kernel.dispatch(pass, group, this.headGroups, numListed);
  }
}

export class AttentionPrefill {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext, readonly shape: AttentionShape) {
    this.kernel = Kernel.get(ctx, {
      name: "attention_prefill",
      code: prefillCode,
      bindings: BINDINGS,
      constants: {
        ...attentionConstants("attention_prefill", shape),
        ROWS: prefillRowsPerThread(shape.headDim),
      },
    });
  }

  /**
   * params: uniform { count: u32 }; tiles: u32 [count, 4] = (seq, firstToken, numQueries, 0), e.g.
   * planAttention's tiles; the other buffers as in the token-batch layout.
   */
  bind(
    params: BindingResource,
    q: BindingResource,
    slots: BindingResource,
    seqs: BindingResource,
    blockTables: BindingResource,
    kCache: BindingResource,
    vCache: BindingResource,
    tiles: BindingResource,
    out: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, q, slots, seqs, blockTables, kCache, vCache, tiles, out]);
  }

  /** Records the dispatch for `numTiles` tiles (params.count). */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, numTiles: number): void {
    this.kernel.dispatch(pass, group, this.shape.numHeads, numTiles);
  }
}

export interface AttentionPlan {
  /** 4 u32 per tile: (seq, firstToken, numQueries <= PREFILL_TILE_Q, 0). */
  tiles: Uint32Array;
  /** 2 u32 per decode token: (token, seq). */
  decodeTokens: Uint32Array;
}

/**
 * Splits one step's sequences (index = sequence slot) between the kernels: a sequence with one
 * token this step is a decode token; one with more is cut into prefill tiles of consecutive
 * tokens.
 */
export function planAttention(
  seqs: readonly { firstToken: number; numTokens: number }[],
): AttentionPlan {
  const tiles: number[] = [];
  const decodeTokens: number[] = [];
  seqs.forEach(({ firstToken, numTokens }, seq) => {
    if (numTokens === 1) {
      decodeTokens.push(firstToken, seq);
      return;
    }
    for (let start = 0; start < numTokens; start += PREFILL_TILE_Q) {
      tiles.push(seq, firstToken + start, Math.min(PREFILL_TILE_Q, numTokens - start), 0);
    }
  });
  return { tiles: Uint32Array.from(tiles), decodeTokens: Uint32Array.from(decodeTokens) };
}
