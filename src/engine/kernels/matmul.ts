/**
 * Linear layer y[r, outOffset + n] (= or +=) x[r, :] · W[n, :] (+ bias[n]).
 * x f32 [rows, K]; W [N, K] (Hugging Face [out, in]) f32, or f16 packed as in
 * f16_pack.ts; bias f32 [N]; y f32 [rows, outStride].
 * Kernels behind one bind-group layout: matvec.wgsl (streams W once per block
 * of 1 or 4 rows; threads split K and reduce) for few rows, matmul.wgsl (64 x 64
 * tiles staged in workgroup memory) for many. A weight larger than one binding
 * is split by rows into chunks, one MatMul per chunk with outOffset = the
 * chunk's first row (and its bias bound at the same row offset).
 */
import matmulCode from "../../shaders/matmul.wgsl" with { type: "text" };
import matvecCode from "../../shaders/matvec.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingKind, type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";
import type { GpuMatrix, MatrixChunk } from "../model/gpu_weights.ts";

export interface LinearOptions {
  inFeatures: number;
  outFeatures: number;
  /** Floats per row of y (default outFeatures). */
  outStride?: number;
  /** First column of y this layer writes (default 0). */
  outOffset?: number;
  weight: "f32" | "f16";
  bias: boolean;
  /** Add into y instead of overwriting it (folds a residual add into the layer). */
  accumulate: boolean;
}

/**
 * Up to how many rows the matrix-vector kernel is used instead of the tiled one.
 * Software GPUs: measured on lavapipe, where the tiled kernel pays for whole
 * 64-row tiles and matvec stops winning between 32 and 48 rows. Hardware GPUs:
 * matvec re-reads W from memory once per 4 rows, so it should hand over sooner
 * (8 is a conventional choice, not yet measured).
 */
export function matvecMaxRows(ctx: GpuContext): number {
  return ctx.isSoftware ? 32 : 8;
}

/** Rows and columns of y per tiled-kernel workgroup (matmul.wgsl TILE). */
const TILE = 64;
/** matvec.wgsl WG: threads per workgroup, 4 columns each, TK threads per column group. */
const MATVEC_THREADS = 64;
/**
 * Rows per matvec workgroup: a 1-row variant for single decodes, 4 rows for small batches and 8
 * for larger ones (each weight load serves more rows: on lavapipe a 16-sequence decode step went
 * from the 4-row variant's throughput, no better than 4 sequences, to more; see bench --batch).
 */
const MATVEC_ROW_BLOCK = 4;
const MATVEC_WIDE_ROW_BLOCK = 8;
/** Pairs along K each matvec thread keeps at least, however many threads share a column. */
const MATVEC_MIN_PAIRS = 8;

const BINDINGS: readonly BindingKind[] = ["uniform", "read", "read", "read", "storage"];

/**
 * Threads per column group for the matvec kernel: the fewest (a power of two)
 * that still give `minWorkgroups` workgroups, while each thread keeps at least
 * MATVEC_MIN_PAIRS pairs of K. Software GPUs (a few CPU cores, where every load
 * costs and a reduction is overhead) want few; hardware GPUs want thousands of
 * threads in flight and coalesced reads along K.
 */
function matvecThreadsPerColumn(K: number, N: number, minWorkgroups: number): number {
  const pairs = Math.floor(K / 2);
  const workgroups = (tk: number) => Math.ceil(N / ((4 * MATVEC_THREADS) / tk));
  let tk = 1;
  while (
    tk < MATVEC_THREADS && workgroups(tk) < minWorkgroups && pairs / (2 * tk) >= MATVEC_MIN_PAIRS
  ) tk *= 2;
  return tk;
}

export class MatMul {
  /** matvec kernels: 1, MATVEC_ROW_BLOCK and MATVEC_WIDE_ROW_BLOCK rows per workgroup. */
  private readonly matvecSingle: Kernel;
  private readonly matvecBlock: Kernel;
  private readonly matvecWide: Kernel;
  private readonly matmul: Kernel;
  private readonly matvecGrid: [number, number];
  private readonly maxMatvecRows: number;

  constructor(ctx: GpuContext, readonly options: LinearOptions) {
    const { inFeatures: K, outFeatures: N } = options;
    const outStride = options.outStride ?? N;
    const outOffset = options.outOffset ?? 0;
    if (!(K > 0 && N > 0 && outOffset + N <= outStride)) {
      throw new RangeError(
        `MatMul: need inFeatures, outFeatures > 0 and outOffset + outFeatures <= outStride ` +
          `(got K=${K}, N=${N}, outOffset=${outOffset}, outStride=${outStride})`,
      );
    }
    const constants = {
      K,
      N,
      OUT_STRIDE: outStride,
      OUT_OFFSET: outOffset,
      HAS_BIAS: options.bias ? 1 : 0,
      ACCUMULATE: options.accumulate ? 1 : 0,
      WEIGHT_F16: options.weight === "f16" ? 1 : 0,
    };
    const tk = matvecThreadsPerColumn(K, N, ctx.isSoftware ? 8 : 1024);
    const matvec = (rowsPerGroup: number) =>
      Kernel.get(ctx, {
        name: "matvec",
        code: matvecCode,
        bindings: BINDINGS,
        constants: { ...constants, TK: tk, R: rowsPerGroup },
      });
    this.matvecSingle = matvec(1);
    this.matvecBlock = matvec(MATVEC_ROW_BLOCK);
    this.matvecWide = matvec(MATVEC_WIDE_ROW_BLOCK);
    this.matmul = Kernel.get(ctx, {
      name: "matmul",
      code: matmulCode,
      bindings: BINDINGS,
      constants,
    });
    const groups = Math.ceil(N / ((4 * MATVEC_THREADS) / tk));
    this.maxMatvecRows = matvecMaxRows(ctx);
    this.matvecGrid = workgroupGrid(groups, ctx.limits.maxComputeWorkgroupsPerDimension);
  }

  /**
   * params: uniform { rows: u32 } (packUniform([["u32", rows]])), written by the
   * runner each step. bias is ignored (pass null) when options.bias is false.
   */
  bind(
    params: BindingResource,
    x: BindingResource,
    weight: BindingResource,
    bias: BindingResource | null,
    y: BindingResource,
  ): GPUBindGroup {
    if (this.options.bias && bias === null) {
      throw new Error("MatMul: options.bias is true but no bias buffer was given");
    }
    // All kernels declare a bias binding so they share one layout; without a
    // bias it is never read, and x (already bound read-only) fills the slot.
    return this.matmul.bind([params, x, weight, this.options.bias && bias ? bias : x, y]);
  }

  /** Records the layer for `rows` rows (must equal params.rows). */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, rows: number): void {
    if (rows <= 0) return;
    const [gx, gy] = this.matvecGrid;
    if (rows === 1) {
      this.matvecSingle.dispatch(pass, group, gx, gy);
    } else if (rows <= MATVEC_ROW_BLOCK) {
      this.matvecBlock.dispatch(pass, group, gx, gy, 1);
    } else if (rows <= this.maxMatvecRows) {
      this.matvecWide.dispatch(pass, group, gx, gy, Math.ceil(rows / MATVEC_WIDE_ROW_BLOCK));
    } else {
      const N = this.options.outFeatures;
      this.matmul.dispatch(pass, group, Math.ceil(N / TILE), Math.ceil(rows / TILE));
    }
  }
}

/** One row chunk of a weight with the MatMul that computes its columns of y, and its bias slice. */
export interface ChunkLinear {
  chunk: MatrixChunk;
  matmul: MatMul;
  bias: BindingResource | null;
}

/**
 * y (=|+=) x W^T (+ bias) for a weight split into binding-sized row chunks: one MatMul per chunk,
 * writing columns [chunk.rowStart, chunk.rowStart + chunk.rows) of y [rows, W rows].
 */
export function chunkLinears(
  ctx: GpuContext,
  m: GpuMatrix,
  bias: GPUBuffer | null,
  accumulate: boolean,
): ChunkLinear[] {
  return m.chunks.map((chunk) => ({
    chunk,
    matmul: new MatMul(ctx, {
      inFeatures: m.cols,
      outFeatures: chunk.rows,
      outStride: m.rows,
      outOffset: chunk.rowStart,
      weight: m.dtype,
      bias: bias !== null,
      accumulate,
    }),
    bias: bias ? { buffer: bias, offset: chunk.rowStart * 4, size: chunk.rows * 4 } : null,
  }));
}
