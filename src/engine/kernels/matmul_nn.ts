/**
 * y[r, yOffset + k] (= or +=) alpha * sum_n x[r, xOffset + n] * W[n, k]: x times a
 * row-major W, for backward passes through linear layers (dX = dY · W of a frozen
 * weight [out, in]; LoRA G = dY · B and dX += scale · G · A).
 * x f32 [rows, xStride]; W [N, K] f32, or f16 packed along K as in f16_pack.ts;
 * y f32 [rows, yStride]. See src/shaders/matmul_nn.wgsl: a 64 x 64-tiled kernel
 * for many rows at K > 32 on hardware GPUs; a thin one (an 8 x 8 block of y per
 * thread) for K <= 32, few rows, and every shape on software GPUs.
 * A weight larger than one binding is split by rows of W (chunks of N): one
 * MatMulNN per chunk, xOffset advanced by the chunk's first row, accumulate
 * after the first.
 */
import code from "../../shaders/matmul_nn.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingKind, type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";
import { minReductionWorkgroups, reductionThreads } from "./matmul_tn.ts";

export interface MatMulNNOptions {
  /** Rows of W: the length of the sum. */
  n: number;
  /** Columns of W: the columns of y written. */
  k: number;
  /** Floats per row of x, and the first column of x read. */
  xStride: number;
  xOffset: number;
  /** Floats per row of y, and the first column of y written. */
  yStride: number;
  yOffset: number;
  weight: "f32" | "f16";
  /** Add into y instead of overwriting it (gradient accumulation, weight chunks). */
  accumulate: boolean;
  /** Scale of the product (default 1), e.g. the LoRA scale. */
  alpha?: number;
}

/** Threads per workgroup in both entry points. */
const THREADS = 64;
/** main: rows and columns of y per workgroup (matmul_nn.wgsl TILE). */
const TILE = 64;
/** thin: rows and columns of y per thread block. */
const BLOCK = 8;
/**
 * Terms of the n sum each thin-kernel thread keeps at least, however few blocks
 * there are: shorter sums are not worth a reduction (nor another compiled variant).
 */
const MIN_TERMS_PER_THREAD = 32;
/**
 * Up to which K the thin kernel serves every row count (64-column tiles would be mostly padding).
 */
const THIN_MAX_K = 32;

/**
 * Up to how many rows the thin kernel is used at K > THIN_MAX_K. Software GPUs:
 * always, since on lavapipe it beat the tiled kernel at every measured shape
 * (rows 16..512, N and K 576..1536: 1.2-3x; SwiftShader likewise), each thread
 * reading its 8 x 8 block's operands straight from memory costing less there than
 * staging tiles through workgroup memory between barriers. Hardware GPUs: the
 * thin kernel re-reads W once per 8 rows, uncoalesced, so it hands over early
 * (8 is a conventional choice, not yet measured).
 */
function thinMaxRows(ctx: GpuContext): number {
  return ctx.isSoftware ? Infinity : 8;
}

const BINDINGS: readonly BindingKind[] = ["uniform", "read", "read", "storage"];

export class MatMulNN {
  /** The tiled kernel; null where the thin one serves every row count. */
  private readonly tiled: Kernel | null;
  /** Thin kernels by threads per block (TT), compiled on first use: TT depends on rows. */
  private readonly thin = new Map<number, Kernel>();
  private readonly constants: Record<string, number>;
  private readonly maxThinRows: number;
  private readonly minWorkgroups: number;
  /** The most threads the thin kernel may split one block's sum among. */
  private readonly maxSplit: number;
  private readonly maxPerDimension: number;

  constructor(private readonly ctx: GpuContext, readonly options: MatMulNNOptions) {
    const { n: N, k: K, xStride, xOffset, yStride, yOffset } = options;
    if (!(N > 0 && K > 0 && xOffset + N <= xStride && yOffset + K <= yStride)) {
      throw new RangeError(
        `MatMulNN: need n, k > 0, xOffset + n <= xStride and yOffset + k <= yStride ` +
          `(got n=${N}, k=${K}, xOffset=${xOffset}, xStride=${xStride}, ` +
          `yOffset=${yOffset}, yStride=${yStride})`,
      );
    }
    this.constants = {
      N,
      K,
      X_STRIDE: xStride,
      X_OFFSET: xOffset,
      Y_STRIDE: yStride,
      Y_OFFSET: yOffset,
      WEIGHT_F16: options.weight === "f16" ? 1 : 0,
      ACCUMULATE: options.accumulate ? 1 : 0,
      ALPHA: options.alpha ?? 1,
    };
    this.maxThinRows = thinMaxRows(ctx);
    this.tiled = K > THIN_MAX_K && Number.isFinite(this.maxThinRows)
      ? Kernel.get(ctx, {
        name: "matmul_nn",
        code,
        entryPoint: "main",
        bindings: BINDINGS,
        constants: this.constants,
      })
      : null;
    this.minWorkgroups = minReductionWorkgroups(ctx);
    this.maxSplit = Math.min(
      THREADS,
      2 ** Math.floor(Math.log2(Math.max(1, N / MIN_TERMS_PER_THREAD))),
    );
    this.maxPerDimension = ctx.limits.maxComputeWorkgroupsPerDimension;
  }

  private thinKernel(tt: number): Kernel {
    let kernel = this.thin.get(tt);
    if (!kernel) {
      kernel = Kernel.get(this.ctx, {
        name: "matmul_nn",
        code,
        entryPoint: "thin",
        bindings: BINDINGS,
        constants: { ...this.constants, TT: tt },
      });
      this.thin.set(tt, kernel);
    }
    return kernel;
  }

  /**
   * params: uniform { rows: u32 } (packUniform([["u32", rows]])), written by the
   * runner each step. w: W as u32 words (f32 bits or packed f16). y may not alias x.
   * Both entry points share one layout, so the group serves every row count.
   */
  bind(
    params: BindingResource,
    x: BindingResource,
    w: BindingResource,
    y: BindingResource,
  ): GPUBindGroup {
    return (this.tiled ?? this.thinKernel(1)).bind([params, x, w, y]);
  }

  /** Records the product for `rows` rows (must equal params.rows). */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    if (rows <= 0) return;
    const K = this.options.k;
    if (this.tiled && rows > this.maxThinRows) {
      this.tiled.dispatch(pass, group, Math.ceil(K / TILE), Math.ceil(rows / TILE));
      return;
    }
    const blocks = Math.ceil(rows / BLOCK) * Math.ceil(K / BLOCK);
    const tt = reductionThreads(blocks, this.minWorkgroups, THREADS, this.maxSplit);
    const groups = Math.ceil(blocks / (THREADS / tt));
    this.thinKernel(tt).dispatch(pass, group, ...workgroupGrid(groups, this.maxPerDimension));
  }
}
