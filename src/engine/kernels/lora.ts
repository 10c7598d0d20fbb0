/**
 * Batched multi-adapter LoRA (S-LoRA / Punica style): every row of a batch names the adapter
 * slot it runs on, and one dispatch pair serves rows on different adapters (or none).
 *   LoraShrink (src/shaders/lora_shrink.wgsl):
 *     u[t, :R] = x[t, xOffset : xOffset+K] · A[slot_t]^T
 *   LoraExpand (src/shaders/lora_expand.wgsl):
 *     y[t, yOffset : yOffset+N] += scales[slot_t] · u[t] · B[slot_t]^T
 * A pool f32 [numSlots, R, K], B pool f32 [numSlots, N, R], scales f32 [numSlots], slots u32 [rows]
 * (NO_ADAPTER_SLOT: the row is on no adapter: u = 0 and y untouched). R is the pool's rank;
 * adapters of smaller rank are zero-padded. Serving binds the adapter pool and the step's
 * per-token slots; training binds a one-slot pool with every slot 0.
 */
import shrinkCode from "../../shaders/lora_shrink.wgsl" with { type: "text" };
import expandCode from "../../shaders/lora_expand.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

/** The slot of a row that runs on no adapter. */
export const NO_ADAPTER_SLOT = 0xffffffff;

/** lora_shrink.wgsl and lora_expand.wgsl RB: rows per workgroup. */
const ROWS_PER_GROUP = 4;
/** lora_shrink.wgsl JB: outputs j per workgroup. */
const SHRINK_OUTPUTS = 8;
/** lora_expand.wgsl WG * NB: columns n per workgroup. */
const EXPAND_COLUMNS = 64 * 4;

export interface LoraShrinkOptions {
  /** K: input features of the adapted projection (A's row length). */
  inFeatures: number;
  /** R: rank of the pool (rows of A per slot; u's row length). */
  rank: number;
  /** Floats per row of x (default inFeatures). */
  inStride?: number;
  /** First column of x read (default 0). */
  inOffset?: number;
}

export interface LoraExpandOptions {
  /** N: output features of the adapted projection (B's row count per slot). */
  outFeatures: number;
  /** R: rank of the pool (B's row length; u's row length). */
  rank: number;
  /** Floats per row of y (default outFeatures). */
  outStride?: number;
  /** First column of y added to (default 0). */
  outOffset?: number;
}

function checkSizes(name: string, features: number, rank: number, stride: number, offset: number) {
  const ok = [features, rank, stride].every((v) => Number.isInteger(v) && v > 0) &&
    Number.isInteger(offset) && offset >= 0 && offset + features <= stride;
  if (!ok) {
    throw new RangeError(
      `${name}: need positive integer features and rank and offset + features <= stride ` +
        `(got features=${features}, rank=${rank}, offset=${offset}, stride=${stride})`,
    );
  }
}

export class LoraShrink {
  private readonly kernel: Kernel;
  private readonly blocks: number;

  constructor(private readonly ctx: GpuContext, readonly options: LoraShrinkOptions) {
    const { inFeatures: K, rank: R } = options;
    const stride = options.inStride ?? K, offset = options.inOffset ?? 0;
    checkSizes("LoraShrink", K, R, stride, offset);
    this.blocks = Math.ceil(R / SHRINK_OUTPUTS);
    this.kernel = Kernel.get(ctx, {
      name: "lora_shrink",
      code: shrinkCode,
      bindings: ["uniform", "read", "read", "read", "storage"],
      constants: { K, R, X_STRIDE: stride, X_OFFSET: offset },
    });
  }

  /**
   * params: uniform { rows: u32 }; x f32 [rows, inStride]; slots u32 [rows];
   * aPool f32 [numSlots, rank, inFeatures]; u f32 [rows, rank] (written).
   */
  bind(
    params: BindingResource,
    x: BindingResource,
    slots: BindingResource,
    aPool: BindingResource,
    u: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, x, slots, aPool, u]);
  }

  /** Records the dispatch for `rows` rows (must equal params.rows); nothing when 0. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const groups = Math.ceil(rows / ROWS_PER_GROUP) * this.blocks;
    const [gx, gy] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, gx, gy);
  }
}

export class LoraExpand {
  private readonly kernel: Kernel;
  private readonly blocks: number;

  constructor(private readonly ctx: GpuContext, readonly options: LoraExpandOptions) {
    const { outFeatures: N, rank: R } = options;
    const stride = options.outStride ?? N, offset = options.outOffset ?? 0;
    checkSizes("LoraExpand", N, R, stride, offset);
    this.blocks = Math.ceil(N / EXPAND_COLUMNS);
    this.kernel = Kernel.get(ctx, {
      name: "lora_expand",
      code: expandCode,
      bindings: ["uniform", "read", "read", "read", "read", "storage"],
      constants: { N, R, Y_STRIDE: stride, Y_OFFSET: offset },
    });
  }

  /**
   * params: uniform { rows: u32 }; u f32 [rows, rank]; slots u32 [rows];
   * bPool f32 [numSlots, outFeatures, rank]; scales f32 [numSlots];
   * y f32 [rows, outStride] (added to).
   */
  bind(
    params: BindingResource,
    u: BindingResource,
    slots: BindingResource,
    bPool: BindingResource,
    scales: BindingResource,
    y: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, u, slots, bPool, scales, y]);
  }

  /** Records the dispatch for `rows` rows (must equal params.rows); nothing when 0. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    const groups = Math.ceil(rows / ROWS_PER_GROUP) * this.blocks;
    const [gx, gy] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, gx, gy);
  }
}
