/**
 * Optimizer updates of one parameter tensor from its accumulated gradient, with
 * global-norm clipping over all tensors: AdamW (torch.optim.AdamW semantics) and
 * plain SGD. g, p, m, v f32 [count]; partials f32 [numPartials] (Σ g² per tensor,
 * from GradSquareSum). See src/shaders/optimizer.wgsl; CPU references: adamwStep,
 * sgdStep in tests/reference/optim.ts. Gradients are zeroed between steps by
 * the caller (encoder.clearBuffer).
 */
import code from "../../shaders/optimizer.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { packUniform } from "../gpu/buffers.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

/**
 * Gradient scaling and global-norm clipping, shared by both optimizers (torch's
 * clip_grad_norm_ semantics; CPU reference: clipFactor in tests/reference/optim.ts).
 */
export interface GradClipOptions {
  /** Multiplies the accumulated gradient first (e.g. 1 / pairs in the batch). */
  gradScale: number;
  /** Clip threshold on the global norm of the scaled gradient; <= 0: no clipping. */
  maxGradNorm: number;
}

export interface AdamWOptions extends GradClipOptions {
  /** 1-based step number, for the bias corrections. */
  step: number;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

/** Threads (elements) per workgroup: WG in optimizer.wgsl. */
const WG = 256;

function checkU32(where: string, name: string, value: number, min = 0): void {
  if (!Number.isInteger(value) || value < min || value > 0xffffffff) {
    throw new RangeError(`${where}: ${name} must be an integer in [${min}, 2^32), got ${value}`);
  }
}

export interface AdamWParams extends AdamWOptions {
  /** Elements of the tensor. */
  count: number;
  /** Entries of partials (tensors in the global norm). */
  numPartials: number;
}

/**
 * The uniform struct { count: u32, step: u32, numPartials: u32, lr, beta1, beta2, eps,
 * weightDecay, gradScale, maxGradNorm: f32 } (48 bytes). step is 1-based.
 */
export function adamwParams(o: AdamWParams): Uint8Array {
  checkU32("adamwParams", "count", o.count);
  checkU32("adamwParams", "step", o.step, 1);
  checkU32("adamwParams", "numPartials", o.numPartials);
  return packUniform([
    ["u32", o.count],
    ["u32", o.step],
    ["u32", o.numPartials],
    ["f32", o.lr],
    ["f32", o.beta1],
    ["f32", o.beta2],
    ["f32", o.eps],
    ["f32", o.weightDecay],
    ["f32", o.gradScale],
    ["f32", o.maxGradNorm],
  ]);
}

export interface SgdParams extends GradClipOptions {
  count: number;
  numPartials: number;
  lr: number;
}

/** The uniform struct { count: u32, numPartials: u32, lr, gradScale, maxGradNorm: f32 }. */
export function sgdParams(o: SgdParams): Uint8Array {
  checkU32("sgdParams", "count", o.count);
  checkU32("sgdParams", "numPartials", o.numPartials);
  return packUniform([
    ["u32", o.count],
    ["u32", o.numPartials],
    ["f32", o.lr],
    ["f32", o.gradScale],
    ["f32", o.maxGradNorm],
  ]);
}

/** Dispatches one thread per element over a 2-D grid of workgroups. */
function dispatchElements(
  ctx: GpuContext,
  kernel: Kernel,
  pass: GPUComputePassEncoder,
  group: GPUBindGroup,
  count: number,
): void {
  const [x, y] = workgroupGrid(Math.ceil(count / WG), ctx.limits.maxComputeWorkgroupsPerDimension);
  kernel.dispatch(pass, group, x, y);
}

export class AdamW {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext) {
    this.kernel = Kernel.get(ctx, {
      name: "optimizer",
      code,
      entryPoint: "adamw",
      bindings: ["uniform", "read", "read", "storage", "storage", "storage"],
    });
  }

  /**
   * params: adamwParams(...); partials f32 [numPartials]; g (gradient), p (parameter),
   * m, v (first and second moments, zero before step 1) f32 [count], all distinct
   * buffers. p, m, v are updated in place.
   */
  bind(
    params: BindingResource,
    partials: BindingResource,
    g: BindingResource,
    p: BindingResource,
    m: BindingResource,
    v: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, partials, g, p, m, v]);
  }

  /** `count` must equal params.count. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, count: number): void {
    dispatchElements(this.ctx, this.kernel, pass, group, count);
  }
}

export class Sgd {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext) {
    this.kernel = Kernel.get(ctx, {
      name: "optimizer",
      code,
      entryPoint: "sgd",
      bindings: ["uniform", "read", "read", "storage"],
    });
  }

  /** params: sgdParams(...); partials f32 [numPartials]; g, p f32 [count]; p updated in place. */
  bind(
    params: BindingResource,
    partials: BindingResource,
    g: BindingResource,
    p: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, partials, g, p]);
  }

  /** `count` must equal params.count. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, count: number): void {
    dispatchElements(this.ctx, this.kernel, pass, group, count);
  }
}
