/**
 * Sum of squares of one gradient tensor, for global-norm gradient clipping:
 * grad f32 [count] -> partials[index] = Σ grad[i]² (partials f32 [numTensors], one
 * slot per tensor; the optimizer kernels sum them). See src/shaders/grad_norm.wgsl;
 * CPU reference: gradSquareSum in tests/reference/optim.ts.
 */
import code from "../../shaders/grad_norm.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { packUniform } from "../gpu/buffers.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";

function checkU32(name: string, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new RangeError(
      `gradSquareSumParams: ${name} must be an integer in [0, 2^32), got ${value}`,
    );
  }
}

/** The uniform struct { count: u32, index: u32 }: floats of grad, slot of partials. */
export function gradSquareSumParams(p: { count: number; index: number }): Uint8Array {
  checkU32("count", p.count);
  checkU32("index", p.index);
  return packUniform([["u32", p.count], ["u32", p.index]]);
}

export class GradSquareSum {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext) {
    this.kernel = Kernel.get(ctx, {
      name: "grad_norm",
      code,
      bindings: ["uniform", "read", "storage"],
    });
  }

  /**
   * params: gradSquareSumParams(...); grad f32 [count]; partials f32 [> index]
   * (shared by all tensors of the model; only slot `index` is written).
   */
  bind(params: BindingResource, grad: BindingResource, partials: BindingResource): GPUBindGroup {
    return this.kernel.bind([params, grad, partials]);
  }

  /** One workgroup per tensor. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup): void {
    this.kernel.dispatch(pass, group, 1);
  }
}
