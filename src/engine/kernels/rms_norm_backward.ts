/**
 * RMSNorm backward with respect to the input (the weight is frozen): x, dy [rows, dim] ->
 * dx [rows, dim], written or added to; see src/shaders/rms_norm_backward.wgsl.
 */
import code from "../../shaders/rms_norm_backward.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

export interface RmsNormBackwardOptions {
  dim: number;
  eps: number;
  /** Add into dx (the residual stream's gradient) instead of overwriting it. */
  accumulate: boolean;
}

export class RmsNormBackward {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext, readonly options: RmsNormBackwardOptions) {
    this.kernel = Kernel.get(ctx, {
      name: "rms_norm_backward",
      code,
      bindings: ["uniform", "read", "read", "read", "storage"],
      constants: { D: options.dim, EPS: options.eps, ACCUMULATE: options.accumulate ? 1 : 0 },
    });
  }

  /**
   * params: uniform { rows: u32 }; x, dy, dx [rows, dim], weight [dim] (dx may not alias x or
   * dy).
   */
  bind(
    params: BindingResource,
    x: BindingResource,
    weight: BindingResource,
    dy: BindingResource,
    dx: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, x, weight, dy, dx]);
  }

  /** One workgroup per row; `rows` must equal params.rows. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const [x, y] = workgroupGrid(rows, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
