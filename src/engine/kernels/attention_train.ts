/**
 * Causal self-attention of one whole training sequence (positions 0..T-1, contiguous activations)
 * and its gradient (see the shader headers for the math):
 *  - AttentionTrainForward (attention_train_forward.wgsl): qkv [T, (H + 2 Hkv) hd] ->
 *    out [T, H hd] and lse [H, maxTokens] (row h holds the log-sum-exp of head h's queries
 *    0..T-1; the row stride is always maxTokens);
 *  - AttentionTrainBackward (attention_train_backward.wgsl): qkv, out, lse, dOut [T, H hd] ->
 *    dQkv [T, (H + 2 Hkv) hd] (dq, dk, dv at the q, k and v columns; overwritten).
 * Same math as the serving kernels (attention.ts): scores q . k * fround(1 / sqrt(hd)).
 * Both take the uniform { tokens: u32 } (packUniform([["u32", T]])), T <= maxTokens.
 */
import forwardCode from "../../shaders/attention_train_forward.wgsl" with { type: "text" };
import backwardCode from "../../shaders/attention_train_backward.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { createStorage } from "../gpu/buffers.ts";
import { type BindingKind, type BindingResource, Kernel } from "../gpu/kernel.ts";
import { InvalidRequestError } from "../errors.ts";
import { attentionConstants } from "./attention.ts";

export interface AttentionTrainShape {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** Most tokens of one sequence (T); also the row stride of lse. */
  maxTokens: number;
}

/** Queries (forward, dq) or keys (dkdv) per workgroup (TILE_Q / TILE in the shaders). */
const TILE = 32;
/** vec4s of one tensor staged in workgroup memory per tile (STAGE in the shaders). */
const STAGE = 256;
/** Small heads share each staged row among this many vec4s of per-thread state. */
const REUSE_VEC4 = 8;

/** Override constants common to both kernels, after validating the shape. */
function trainConstants(kernel: string, ctx: GpuContext, shape: AttentionTrainShape) {
  const { numHeads, numKvHeads, headDim, maxTokens } = shape;
  const { H, HKV, HD, SCALE } = attentionConstants(kernel, {
    numHeads,
    numKvHeads,
    headDim,
    blockSize: 1,
  });
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    throw new InvalidRequestError(
      `${kernel} maxTokens must be a positive integer, got ${maxTokens}`,
    );
  }
  const tiles = Math.ceil(maxTokens / TILE);
  if (tiles > ctx.limits.maxComputeWorkgroupsPerDimension) {
    throw new InvalidRequestError(
      `${kernel}: maxTokens ${maxTokens} needs ${tiles} workgroups along y, over this device's ` +
        `maxComputeWorkgroupsPerDimension ${ctx.limits.maxComputeWorkgroupsPerDimension}`,
    );
  }
  const vec4s = headDim / 4;
  return {
    H,
    HKV,
    HD,
    SCALE,
    // Rows per thread: 4, 2 or 1, so that ROWS * hd / 4 <= max(REUSE_VEC4, hd / 4).
    ROWS: vec4s * 4 <= REUSE_VEC4 ? 4 : vec4s * 2 <= REUSE_VEC4 ? 2 : 1,
    TILE_K: Math.min(TILE, Math.floor(STAGE / vec4s)),
    LSE_STRIDE: maxTokens,
  };
}

function checkTokens(kernel: string, tokens: number, maxTokens: number): void {
  if (!Number.isInteger(tokens) || tokens < 0 || tokens > maxTokens) {
    throw new InvalidRequestError(
      `${kernel}: ${tokens} tokens, but it was made for at most ${maxTokens} (maxTokens)`,
    );
  }
}

export class AttentionTrainForward {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext, readonly shape: AttentionTrainShape) {
    this.kernel = Kernel.get(ctx, {
      name: "attention_train_forward",
      code: forwardCode,
      bindings: ["uniform", "read", "storage", "storage"],
      constants: trainConstants("attention_train_forward", ctx, shape),
    });
  }

  /**
   * params: uniform { tokens: u32 }; qkv f32 [T, (H + 2 Hkv) hd]; out f32 [T, H hd];
   * lse f32 [H, maxTokens] (columns >= T untouched).
   */
  bind(
    params: BindingResource,
    qkv: BindingResource,
    out: BindingResource,
    lse: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, qkv, out, lse]);
  }

  /** Records the dispatch for `tokens` tokens (= params.tokens). */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, tokens: number): void {
    checkTokens("attention_train_forward", tokens, this.shape.maxTokens);
    this.kernel.dispatch(pass, group, this.shape.numHeads, Math.ceil(tokens / TILE));
  }
}

/** Bind groups of one AttentionTrainBackward.bind (one per entry point). */
export interface AttentionTrainBackwardGroups {
  dq: GPUBindGroup;
  dkdv: GPUBindGroup;
}

/** params, qkv, out, lse, dOut, then dQkv and the delta scratch. */
const BACKWARD_BINDINGS: readonly BindingKind[] = [
  "uniform",
  "read",
  "read",
  "read",
  "read",
  "storage",
  "storage",
];

export class AttentionTrainBackward {
  private readonly dq: Kernel;
  private readonly dkdv: Kernel;
  /** Scratch f32 [H, maxTokens]: D[h, t] = dOut[t, h] . out[t, h], written by dq, read by dkdv. */
  private readonly delta: GPUBuffer;

  constructor(ctx: GpuContext, readonly shape: AttentionTrainShape) {
    const constants = trainConstants("attention_train_backward", ctx, shape);
    const kernel = (entryPoint: string) =>
      Kernel.get(ctx, {
        name: "attention_train_backward",
        code: backwardCode,
        entryPoint,
        bindings: BACKWARD_BINDINGS,
        constants,
      });
    this.dq = kernel("dq");
    this.dkdv = kernel("dkdv");
    this.delta = createStorage(
      ctx,
      shape.numHeads * shape.maxTokens * 4,
      "attention_train_backward_delta",
    );
  }

  /**
   * params: uniform { tokens: u32 }; qkv f32 [T, (H + 2 Hkv) hd] (the forward's input); out
   * f32 [T, H hd] and lse f32 [H, maxTokens] (the forward's outputs); dOut f32 [T, H hd];
   * dQkv f32 [T, (H + 2 Hkv) hd] (rows < T overwritten; must not alias qkv).
   */
  bind(
    params: BindingResource,
    qkv: BindingResource,
    out: BindingResource,
    lse: BindingResource,
    dOut: BindingResource,
    dQkv: BindingResource,
  ): AttentionTrainBackwardGroups {
    const resources = [params, qkv, out, lse, dOut, dQkv, this.delta];
    return { dq: this.dq.bind(resources), dkdv: this.dkdv.bind(resources) };
  }

  /**
   * Records dq then dkdv for `tokens` tokens (= params.tokens). Encodes of several layers may
   * follow each other in one pass: they share the delta scratch, but dispatches in a pass run in
   * order.
   */
  encode(pass: GPUComputePassEncoder, groups: AttentionTrainBackwardGroups, tokens: number): void {
    checkTokens("attention_train_backward", tokens, this.shape.maxTokens);
    const tiles = Math.ceil(tokens / TILE);
    this.dq.dispatch(pass, groups.dq, this.shape.numHeads, tiles);
    this.dkdv.dispatch(pass, groups.dkdv, this.shape.numKvHeads, tiles);
  }

  /** Frees the delta scratch. */
  destroy(): void {
    this.delta.destroy();
  }
}
