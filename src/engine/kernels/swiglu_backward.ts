/**
 * SwiGLU backward: gateUp [rows, 2I] (gate | up) and dAct [rows, I] -> dGateUp [rows, 2I];
 * see src/shaders/swiglu_backward.wgsl.
 */
import code from "../../shaders/swiglu_backward.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

/** swiglu_backward.wgsl WG. */
const THREADS = 256;

export interface SwiGluBackwardOptions {
  intermediate: number;
}

export class SwiGluBackward {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext, readonly options: SwiGluBackwardOptions) {
    this.kernel = Kernel.get(ctx, {
      name: "swiglu_backward",
      code,
      bindings: ["uniform", "read", "read", "storage"],
      constants: { I: options.intermediate },
    });
  }

  /** params: uniform { rows: u32 }; gateUp, dGateUp [rows, 2I] (not aliased), dAct [rows, I]. */
  bind(
    params: BindingResource,
    gateUp: BindingResource,
    dAct: BindingResource,
    dGateUp: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, gateUp, dAct, dGateUp]);
  }

  /** One thread per element of dAct; `rows` must equal params.rows. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const groups = Math.ceil((rows * this.options.intermediate) / THREADS);
    const [x, y] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
