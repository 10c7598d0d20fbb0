/**
 * Rotary embedding + paged KV write (src/shaders/rope_kv_write.wgsl): rotates the query and key
 * heads of the fused QKV output qkv [T, (H + 2 Hkv) hd], writes the rotated queries to
 * qOut [T, H hd] and the rotated keys and the values into the K/V pools
 * [numBlocks, Hkv, BS, hd] at each token's (block, slot).
 */
import kernelCode from "../../shaders/rope_kv_write.wgsl" with { type: "text" };
import ropeAngleCode from "../../shaders/rope_angle.wgsl" with { type: "text" };

/** The shader with the shared angle helpers prepended (WGSL has no includes). */
const code = `${ropeAngleCode}\n${kernelCode}`;
import { createUniform } from "../gpu/buffers.ts";
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { ModelFormatError } from "../errors.ts";
import type { AttentionShape } from "./attention.ts";

/** Largest head dim: the shader's invFreq uniform holds 128 frequencies. */
const MAX_HEAD_DIM = 256;
const WORKGROUP = 64;
const INV_FREQ_UNIFORM_FLOATS = MAX_HEAD_DIM / 2;

/**
 * The invFreq uniform the kernel binds: f32 [headDim/2] padded to 128 floats (512 bytes), since a
 * uniform array is fixed-size. Made once per model.
 */
export function createInvFreqUniform(ctx: GpuContext, invFreq: ArrayLike<number>): GPUBuffer {
  if (invFreq.length > INV_FREQ_UNIFORM_FLOATS) {
    throw new ModelFormatError(
      "config.json",
      `rotary embedding with ${invFreq.length} frequencies; at most ${INV_FREQ_UNIFORM_FLOATS} ` +
        `(head_dim <= ${MAX_HEAD_DIM}) are supported`,
    );
  }
  const padded = new Float32Array(INV_FREQ_UNIFORM_FLOATS);
  padded.set(invFreq);
  return createUniform(ctx, padded, "rope_inv_freq");
}

export class RopeKvWrite {
  private readonly kernel: Kernel;
  /** Workgroups per token: one invocation per (head, rotation pair). */
  private readonly groupsPerToken: number;

  constructor(ctx: GpuContext, readonly shape: AttentionShape) {
    const { numHeads, numKvHeads, headDim, blockSize } = shape;
    if (headDim % 2 !== 0 || headDim > MAX_HEAD_DIM || headDim <= 0) {
      throw new ModelFormatError(
        "config.json",
        `head_dim ${headDim} is not supported by rope_kv_write ` +
          `(needs an even head_dim <= ${MAX_HEAD_DIM})`,
      );
    }
    this.groupsPerToken = Math.ceil(((numHeads + 2 * numKvHeads) * headDim) / 2 / WORKGROUP);
    this.kernel = Kernel.get(ctx, {
      name: "rope_kv_write",
      code,
      bindings: [
        "uniform",
        "read",
        "read",
        "read",
        "read",
        "read",
        "uniform",
        "storage",
        "storage",
        "storage",
      ],
      constants: { H: numHeads, HKV: numKvHeads, HD: headDim, BS: blockSize },
    });
  }

  /**
   * params: uniform { tokens: u32 }; invFreq: the uniform from createInvFreqUniform; the other
   * buffers as in the token-batch layout (see the shader header).
   */
  bind(
    params: BindingResource,
    qkv: BindingResource,
    positions: BindingResource,
    tokenSeq: BindingResource,
    seqs: BindingResource,
    blockTables: BindingResource,
    invFreq: BindingResource,
    qOut: BindingResource,
    kCache: BindingResource,
    vCache: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([
      params,
      qkv,
      positions,
      tokenSeq,
      seqs,
      blockTables,
      invFreq,
      qOut,
      kCache,
      vCache,
    ]);
  }

  /** Records the dispatch for the batch's `tokens` tokens (params.tokens). */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, tokens: number): void {
    this.kernel.dispatch(pass, group, this.groupsPerToken, tokens);
  }
}
