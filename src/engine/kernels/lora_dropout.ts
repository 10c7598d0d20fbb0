/**
 * Inverted dropout on a LoRA input with a hash mask (src/shaders/lora_dropout.wgsl): the same
 * (seed, stream) drops the same elements in the forward, the recompute and the backward.
 */
import code from "../../shaders/lora_dropout.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

export interface LoraDropoutOptions {
  cols: number;
  inStride: number;
  inOffset: number;
  outStride: number;
  outOffset: number;
  /** Drop probability in [0, 1). */
  p: number;
  accumulate: boolean;
}

const THREADS = 256;

export class LoraDropout {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext, readonly options: LoraDropoutOptions) {
    const o = options;
    if (!(o.p >= 0 && o.p < 1)) throw new RangeError(`dropout probability ${o.p} is not in [0, 1)`);
    if (o.inOffset + o.cols > o.inStride || o.outOffset + o.cols > o.outStride) {
      throw new RangeError(`LoraDropout: columns [offset, offset + ${o.cols}) exceed a row`);
    }
    this.kernel = Kernel.get(ctx, {
      name: "lora_dropout",
      code,
      bindings: ["uniform", "uniform", "read", "storage"],
      constants: {
        COLS: o.cols,
        IN_STRIDE: o.inStride,
        IN_OFFSET: o.inOffset,
        OUT_STRIDE: o.outStride,
        OUT_OFFSET: o.outOffset,
        P: o.p,
        ACCUMULATE: o.accumulate ? 1 : 0,
      },
    });
  }

  /** params: uniform { rows: u32, seed: u32 }; stream: uniform { id: u32 }. */
  bind(params: BindingResource, stream: BindingResource, x: BindingResource, out: BindingResource) {
    return this.kernel.bind([params, stream, x, out]);
  }

  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const groups = Math.ceil((rows * this.options.cols) / THREADS);
    const [x, y] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
