/**
 * Token log-probabilities of a chunk of logits rows and their backward (src/shaders/
 * token_logprobs.wgsl). Chunk row t is sequence row rowOffset + t, which indexes targets, lse and
 * logp, so a sequence's rows can pass through one small logits buffer [rows, vocabSize]:
 *   forward:  lse[rowOffset + t], logp[rowOffset + t] = logits[t, target] - lse
 *   backward: logits[t, :] <- grad[gIndex] (onehot(target) - softmax(logits[t, :])), in place.
 */
import code from "../../shaders/token_logprobs.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingKind, type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

/** token_logprobs.wgsl WG: threads per row (forward), logits per workgroup (backward). */
const THREADS = 256;

export interface TokenLogprobsOptions {
  vocabSize: number;
}

export class TokenLogprobs {
  private readonly forward: Kernel;
  private readonly backward: Kernel;
  private readonly groupsPerRow: number;

  constructor(private readonly ctx: GpuContext, readonly options: TokenLogprobsOptions) {
    this.groupsPerRow = Math.ceil(options.vocabSize / THREADS);
    const maxGroups = ctx.limits.maxComputeWorkgroupsPerDimension;
    if (this.groupsPerRow > maxGroups) {
      throw new RangeError(
        `TokenLogprobs: vocabSize ${options.vocabSize} needs ${this.groupsPerRow} workgroups per ` +
          `row (backward), over maxComputeWorkgroupsPerDimension ${maxGroups}`,
      );
    }
    const kernel = (entryPoint: string, bindings: readonly BindingKind[]) =>
      Kernel.get(ctx, {
        name: "token_logprobs",
        code,
        entryPoint,
        bindings,
        constants: { V: options.vocabSize },
      });
    this.forward = kernel("forward", ["uniform", "read", "read", "storage", "storage"]);
    this.backward = kernel("backward", ["uniform", "storage", "read", "read", "read"]);
  }

  /**
   * params: uniform { rows: u32, rowOffset: u32, gIndex: u32 } (gIndex unused here);
   * logits [rows, vocabSize]; targets u32, lse and logp f32, each [>= rowOffset + rows].
   */
  bindForward(
    params: BindingResource,
    logits: BindingResource,
    targets: BindingResource,
    lse: BindingResource,
    logp: BindingResource,
  ): GPUBindGroup {
    return this.forward.bind([params, logits, targets, lse, logp]);
  }

  /** One workgroup per row; `rows` must equal params.rows. */
  encodeForward(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const [x, y] = workgroupGrid(rows, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.forward.dispatch(pass, group, x, y);
  }

  /**
   * params as for bindForward, with gIndex the element of `grad` holding g; logits
   * [rows, vocabSize], overwritten with their gradient; targets and lse as in the forward.
   */
  bindBackward(
    params: BindingResource,
    logits: BindingResource,
    targets: BindingResource,
    lse: BindingResource,
    grad: BindingResource,
  ): GPUBindGroup {
    return this.backward.bind([params, logits, targets, lse, grad]);
  }

  /** One thread per logit; `rows` must equal params.rows. */
  encodeBackward(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const [y, z] = workgroupGrid(rows, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.backward.dispatch(pass, group, this.groupsPerRow, y, z);
  }
}
