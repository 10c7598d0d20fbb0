/**
 * Token feedback (src/shaders/token_feedback.wgsl): copies tokens sampled by the previous step
 * (sampled [maxSeqs] u32) into this step's token ids (tokenIds [T] u32), for decode steps
 * submitted before the CPU knows their input token.
 */
import code from "../../shaders/token_feedback.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";

/** token_feedback.wgsl WG. */
const THREADS = 64;

export class TokenFeedback {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext) {
    this.kernel = Kernel.get(ctx, {
      name: "token_feedback",
      code,
      bindings: ["uniform", "read", "read", "storage"],
    });
  }

  /** params: uniform { count: u32 }; pairs u32 [count, 2] = (sample row, token index). */
  bind(
    params: BindingResource,
    pairs: BindingResource,
    sampled: BindingResource,
    tokenIds: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, pairs, sampled, tokenIds]);
  }

  /** Records the dispatch for `count` fed-back tokens (params.count); nothing when 0. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, count: number): void {
    if (count > 0) this.kernel.dispatch(pass, group, Math.ceil(count / THREADS));
  }
}
