/**
 * Accumulated attention mass for H2O-style KV pruning (src/shaders/attention_mass.wgsl): for each
 * listed chunk (one sequence's consecutive query tokens of this step), adds weight * the softmax
 * probability every query token and head gives each cached key to that key's physical slot of
 * mass [numBlocks * BS]. One workgroup per chunk; one dispatch per layer, accumulating into the
 * same mass array (the caller zeroes newly allocated slots and passes weight = 1 / (H numLayers)
 * to get the per-key mean over heads and layers, summed over query tokens). A chunk entry is
 * 4 u32: (firstToken, numTokens, blockTableOffset, numKeys0).
 */
import code from "../../shaders/attention_mass.wgsl" with { type: "text" };
import { packUniform } from "../gpu/buffers.ts";
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { InvalidRequestError } from "../errors.ts";
import { attentionConstants, type AttentionShape } from "./attention.ts";
import { workgroupGrid } from "./grid.ts";

/** MAX_PACK and STAGE in attention_mass.wgsl. */
const MAX_PACK = 8;
const STAGE = 128;
/** Heads packed per key load: at most this many vec4s of query state (as attention_decode). */
const REUSE_VEC4 = 8;

/** The params uniform's contents: { count: u32, weight: f32 } padded to 16 bytes. */
export function packAttentionMassParams(count: number, weight: number): Uint8Array {
  return packUniform([["u32", count], ["f32", weight]]);
}

/** Query heads per pass: the largest divisor of the GQA group size that fits. */
function massHeadsPerPass(shape: AttentionShape, threads: number): number {
  const group = shape.numHeads / shape.numKvHeads;
  const vec4s = shape.headDim / 4;
  let pack = 1;
  for (let g = 2; g <= Math.min(group, MAX_PACK); g++) {
    if (group % g === 0 && g * vec4s <= REUSE_VEC4 && g * threads <= STAGE) pack = g;
  }
  return pack;
}

export class AttentionMass {
  private readonly kernel: Kernel;
  private readonly maxPerDimension: number;

  /**
   * options.threads: threads per workgroup splitting each token's keys, 1..64 (default: 8, one
   * SIMD group, on CPU-emulated adapters, where barriers are costly; else 32).
   */
  constructor(ctx: GpuContext, readonly shape: AttentionShape, options: { threads?: number } = {}) {
    const constants = attentionConstants("attention_mass", shape);
    const threads = options.threads ?? (ctx.isSoftware ? 8 : 32);
    if (!Number.isInteger(threads) || threads < 1 || threads > 64) {
      throw new InvalidRequestError(
        `attention_mass threads must be an integer in 1..64, got ${threads}`,
      );
    }
    this.maxPerDimension = ctx.limits.maxComputeWorkgroupsPerDimension;
    this.kernel = Kernel.get(ctx, {
      name: "attention_mass",
      code,
      bindings: ["uniform", "read", "read", "read", "read", "storage"],
      constants: {
        ...constants,
        PACK: massHeadsPerPass(shape, threads),
        WG: threads,
      },
    });
  }

  /**
   * params: uniform { count: u32, weight: f32 } (packAttentionMassParams); q: f32 [T, H hd]
   * rotated queries; blockTables: u32 [*]; kCache: the layer's K pool f32 [numBlocks, Hkv, BS,
   * hd]; chunks: u32 [count, 4] = (firstToken, numTokens, blockTableOffset, numKeys0), chunks of
   * different sequences only; mass: f32 [numBlocks * BS], accumulated in place.
   */
  bind(
    params: BindingResource,
    q: BindingResource,
    blockTables: BindingResource,
    kCache: BindingResource,
    chunks: BindingResource,
    mass: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, q, blockTables, kCache, chunks, mass]);
  }

  /**
   * Records the dispatch for `count` chunks (params.count; a larger count is fine too, the extra
   * workgroups return at once).
   */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, count: number): void {
    if (count === 0) return;
    const [x, y] = workgroupGrid(count, this.maxPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
