/**
 * Final RMSNorm with a row gather: y [rows, dim] = rmsnorm(x[rowIndex[s]]) * weight.
 * Picks the rows that need logits (the last token of each sequence) out of the
 * step's hidden states x [T, dim]; see src/shaders/final_norm.wgsl.
 */
import code from "../../shaders/final_norm.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";

export class FinalNorm {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext, readonly dim: number, readonly eps: number) {
    this.kernel = Kernel.get(ctx, {
      name: "final_norm",
      code,
      bindings: ["uniform", "read", "read", "read", "storage"],
      constants: { D: dim, EPS: eps },
    });
  }

  /**
   * params: uniform { rows: u32 }; x f32 [T, dim]; rowIndex u32 [rows] (each < T);
   * weight f32 [dim]; y f32 [rows, dim] (may not alias x).
   */
  bind(
    params: BindingResource,
    x: BindingResource,
    rowIndex: BindingResource,
    weight: BindingResource,
    y: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, x, rowIndex, weight, y]);
  }

  /** One workgroup per output row; `rows` is the value written to params.rows. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    this.kernel.dispatch(pass, group, rows);
  }
}
