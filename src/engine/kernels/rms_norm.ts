/** RMSNorm kernel wrapper. x [rows, dim] -> y [rows, dim]; see src/shaders/rms_norm.wgsl. */
import code from "../../shaders/rms_norm.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";

export class RmsNorm {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext, readonly dim: number, readonly eps: number) {
    this.kernel = Kernel.get(ctx, {
      name: "rms_norm",
      code,
      bindings: ["uniform", "read", "read", "storage"],
      constants: { D: dim, EPS: eps },
    });
  }

  /** params: uniform { rows: u32 }; x, weight, y as in the shader header. */
  bind(params: BindingResource, x: BindingResource, weight: BindingResource, y: BindingResource) {
    return this.kernel.bind([params, x, weight, y]);
  }

  /** One workgroup per row; `rows` must not exceed params.rows' buffer capacity. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    this.kernel.dispatch(pass, group, rows);
  }
}
