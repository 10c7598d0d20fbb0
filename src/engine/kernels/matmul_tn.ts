/**
 * c[m, n] (= or +=) alpha * sum_t p[t, pOffset + m] * q[t, qOffset + n]: the
 * product reduced over rows (tokens) that weight gradients need (LoRA dB = dY^T U,
 * dA = G^T X). p f32 [rows, pStride], q f32 [rows, qStride], c f32 [M, N].
 * See src/shaders/matmul_tn.wgsl; the grid depends only on M and N.
 */
import code from "../../shaders/matmul_tn.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

export interface MatMulTNOptions {
  m: number;
  n: number;
  /** Floats per row of p, and the first column of p read. */
  pStride: number;
  pOffset: number;
  /** Floats per row of q, and the first column of q read. */
  qStride: number;
  qOffset: number;
  /** Add into c instead of overwriting it (gradient accumulation). */
  accumulate: boolean;
  /** Scale of the product (default 1), e.g. the LoRA scale. */
  alpha?: number;
}

/** Threads per workgroup (matmul_tn.wgsl WG). */
const THREADS = 64;
/** Output block per thread (matmul_tn.wgsl): 8 rows by 8 columns of c. */
const BLOCK_M = 8;
const BLOCK_N = 8;

/**
 * Threads splitting each block's reduction (a power of two <= maxSplit <= `threads`):
 * the fewest that still give `minWorkgroups` workgroups of `threads / tt` blocks.
 * Splitting costs a workgroup-memory reduction, so it only pays where there are
 * too few blocks to occupy the device: software GPUs (a few CPU cores) want few
 * workgroups, hardware GPUs thousands of threads in flight.
 */
export function reductionThreads(
  blocks: number,
  minWorkgroups: number,
  threads: number,
  maxSplit = threads,
): number {
  let tt = 1;
  while (2 * tt <= maxSplit && Math.ceil(blocks / (threads / tt)) < minWorkgroups) tt *= 2;
  return tt;
}

/**
 * Workgroups a kernel with a split reduction should fill. Software GPUs run a
 * workgroup on one CPU core, and their barriers are dear: one workgroup per core.
 * At the LoRA shapes (M x N = 1536 x 8, 8 x 1536 over 1024 rows; 576 x 8, 8 x 576
 * over 512) on 2 cores that meant no split, which SwiftShader ran up to 2x faster
 * than TT = 2..8 and lavapipe within 20% of its best (TT = 4). Hardware GPUs want
 * every multiprocessor busy (a conventional figure, not yet measured).
 */
export function minReductionWorkgroups(ctx: GpuContext): number {
  return ctx.isSoftware ? (globalThis.navigator?.hardwareConcurrency ?? 2) : 1024;
}

export class MatMulTN {
  private readonly kernel: Kernel;
  private readonly grid: [number, number];

  constructor(ctx: GpuContext, readonly options: MatMulTNOptions) {
    const { m: M, n: N, pStride, pOffset, qStride, qOffset } = options;
    if (!(M > 0 && N > 0 && pOffset + M <= pStride && qOffset + N <= qStride)) {
      throw new RangeError(
        `MatMulTN: need m, n > 0, pOffset + m <= pStride and qOffset + n <= qStride ` +
          `(got m=${M}, n=${N}, pOffset=${pOffset}, pStride=${pStride}, ` +
          `qOffset=${qOffset}, qStride=${qStride})`,
      );
    }
    const blocks = Math.ceil(M / BLOCK_M) * Math.ceil(N / BLOCK_N);
    const tt = reductionThreads(blocks, minReductionWorkgroups(ctx), THREADS);
    this.kernel = Kernel.get(ctx, {
      name: "matmul_tn",
      code,
      bindings: ["uniform", "read", "read", "storage"],
      constants: {
        M,
        N,
        P_STRIDE: pStride,
        P_OFFSET: pOffset,
        Q_STRIDE: qStride,
        Q_OFFSET: qOffset,
        ACCUMULATE: options.accumulate ? 1 : 0,
        ALPHA: options.alpha ?? 1,
        TT: tt,
      },
    });
    this.grid = workgroupGrid(
      Math.ceil(blocks / (THREADS / tt)),
      ctx.limits.maxComputeWorkgroupsPerDimension,
    );
  }

  /**
   * params: uniform { rows: u32 } (packUniform([["u32", rows]])): the rows of p
   * and q to sum over. c may not alias p or q.
   */
  bind(
    params: BindingResource,
    p: BindingResource,
    q: BindingResource,
    c: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, p, q, c]);
  }

  /**
   * Records the product; with params.rows = 0 it writes zeros (or leaves c as is when
   * accumulating).
   */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup): void {
    this.kernel.dispatch(pass, group, ...this.grid);
  }
}
