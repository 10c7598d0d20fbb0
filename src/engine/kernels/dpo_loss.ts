/**
 * DPO loss head of one preference pair: per-token log-probs logp f32
 * [chosenCount + rejectedCount] (chosen then rejected) and the reference sums
 * refSums f32 [2] -> out f32 [8] = [loss, gradScale·dL/dπw, gradScale·dL/dπl, πw, πl,
 * chosen reward, rejected reward, margin]; see src/shaders/dpo_loss.wgsl.
 * CPU reference: dpoLoss in tests/reference/optim.ts.
 */
import code from "../../shaders/dpo_loss.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { packUniform } from "../gpu/buffers.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";

/** Floats dpo_loss.wgsl writes to `out`. */
export const DPO_OUT_FLOATS = 8;

export interface DpoLossParams {
  /** Tokens of the chosen response (the first entries of logp). */
  chosenCount: number;
  /** Tokens of the rejected response (the entries after them). */
  rejectedCount: number;
  beta: number;
  /** Multiplies out[1] and out[2] (e.g. 1 / pairs in the batch). */
  gradScale: number;
}

function checkU32(name: string, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new RangeError(`dpoLossParams: ${name} must be an integer in [0, 2^32), got ${value}`);
  }
}

/** The uniform struct { chosenCount: u32, rejectedCount: u32, beta: f32, gradScale: f32 }. */
export function dpoLossParams(p: DpoLossParams): Uint8Array {
  checkU32("chosenCount", p.chosenCount);
  checkU32("rejectedCount", p.rejectedCount);
  return packUniform([
    ["u32", p.chosenCount],
    ["u32", p.rejectedCount],
    ["f32", p.beta],
    ["f32", p.gradScale],
  ]);
}

export class DpoLoss {
  private readonly kernel: Kernel;

  constructor(ctx: GpuContext) {
    this.kernel = Kernel.get(ctx, {
      name: "dpo_loss",
      code,
      bindings: ["uniform", "read", "read", "storage"],
    });
  }

  /**
   * params: dpoLossParams(...); logp f32 [chosenCount + rejectedCount];
   * refSums f32 [2] (reference chosen, rejected sums; zeros to compute them);
   * out f32 [DPO_OUT_FLOATS] (its own buffer: it may not alias logp or refSums).
   */
  bind(
    params: BindingResource,
    logp: BindingResource,
    refSums: BindingResource,
    out: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, logp, refSums, out]);
  }

  /** One workgroup for the pair. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup): void {
    this.kernel.dispatch(pass, group, 1);
  }
}
