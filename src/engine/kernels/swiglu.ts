/**
 * SwiGLU: gu [rows, 2I] (gate | up) -> h [rows, I], h = silu(gate) * up; see
 * src/shaders/swiglu.wgsl.
 */
import code from "../../shaders/swiglu.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

/** swiglu.wgsl WG. */
const THREADS = 256;

export class SwiGlu {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext, readonly intermediate: number) {
    this.kernel = Kernel.get(ctx, {
      name: "swiglu",
      code,
      bindings: ["uniform", "read", "storage"],
      constants: { I: intermediate },
    });
  }

  /** params: uniform { rows: u32 }; gu [rows, 2I], h [rows, I]. */
  bind(params: BindingResource, gu: BindingResource, h: BindingResource): GPUBindGroup {
    return this.kernel.bind([params, gu, h]);
  }

  /** One thread per element of h; `rows` must equal params.rows. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const groups = Math.ceil((rows * this.intermediate) / THREADS);
    const [x, y] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
