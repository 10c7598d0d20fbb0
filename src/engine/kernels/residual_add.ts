/** In-place residual add y[i] += x[i] over n elements; see src/shaders/residual_add.wgsl. */
import code from "../../shaders/residual_add.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

/** residual_add.wgsl WG. */
const THREADS = 256;

export class ResidualAdd {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext) {
    this.kernel = Kernel.get(ctx, {
      name: "residual_add",
      code,
      bindings: ["uniform", "read", "storage"],
    });
  }

  /** params: uniform { n: u32 }; x [n] is added into y [n]. */
  bind(params: BindingResource, x: BindingResource, y: BindingResource): GPUBindGroup {
    return this.kernel.bind([params, x, y]);
  }

  /** One thread per element; `n` must equal params.n. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, n: number): void {
    const groups = Math.ceil(n / THREADS);
    const [x, y] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
