/**
 * Rotary embedding (rotate_half), in place, of `heads` contiguous heads in each row of a
 * [rows, stride] activation, or its inverse (the backward, on gradients); see
 * src/shaders/rope.wgsl. It binds the serving path's invFreq uniform (createInvFreqUniform,
 * re-exported here), so both rotate with the same frequencies.
 */
import kernelCode from "../../shaders/rope.wgsl" with { type: "text" };
import ropeAngleCode from "../../shaders/rope_angle.wgsl" with { type: "text" };

/** The shader with the shared angle helpers prepended (WGSL has no includes). */
const code = `${ropeAngleCode}\n${kernelCode}`;
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

export { createInvFreqUniform } from "./rope_kv_write.ts";

/** rope.wgsl WG. */
const THREADS = 64;
/** The invFreq uniform (createInvFreqUniform) holds 128 frequencies. */
const MAX_HEAD_DIM = 256;

export interface RopeOptions {
  heads: number;
  headDim: number;
  /** Floats per row of x. */
  stride: number;
  /** First column of the rotated heads in a row. */
  offset: number;
  /** Rotate by -angle: the backward of the rotation. */
  inverse: boolean;
}

export class Rope {
  private readonly kernel: Kernel;
  /** Workgroups per row: one invocation per (head, rotation pair). */
  private readonly groupsPerRow: number;

  constructor(private readonly ctx: GpuContext, readonly options: RopeOptions) {
    const { heads, headDim, stride, offset } = options;
    if (
      !(heads > 0 && headDim > 0 && headDim % 2 === 0 && headDim <= MAX_HEAD_DIM &&
        offset >= 0 && offset + heads * headDim <= stride)
    ) {
      throw new RangeError(
        `Rope: need heads > 0, an even headDim <= ${MAX_HEAD_DIM} and ` +
          `offset + heads * headDim <= stride (got heads=${heads}, headDim=${headDim}, ` +
          `offset=${offset}, stride=${stride})`,
      );
    }
    this.groupsPerRow = Math.ceil((heads * headDim) / 2 / THREADS);
    this.kernel = Kernel.get(ctx, {
      name: "rope",
      code,
      bindings: ["uniform", "uniform", "storage"],
      constants: {
        HEADS: heads,
        HD: headDim,
        STRIDE: stride,
        OFFSET: offset,
        INVERSE: options.inverse ? 1 : 0,
      },
    });
  }

  /**
   * params: uniform { rows: u32, startPosition: u32 } (row t is at position startPosition + t);
   * invFreq: the uniform from createInvFreqUniform; x [rows, stride], rotated in place.
   */
  bind(params: BindingResource, invFreq: BindingResource, x: BindingResource): GPUBindGroup {
    return this.kernel.bind([params, invFreq, x]);
  }

  /** `rows` must equal params.rows. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const [y, z] = workgroupGrid(rows, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, this.groupsPerRow, y, z);
  }
}
