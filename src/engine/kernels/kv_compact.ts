/**
 * KV compaction for pruning (src/shaders/kv_compact.wgsl): applies a list of moves
 * (srcPhysicalSlot, dstPhysicalSlot) to one layer's K and V pools [numBlocks, Hkv, BS, hd], or to
 * the attention-mass array [numBlocks * BS], every move reading the original contents (chains
 * and swaps are fine; destinations must be distinct). Each application is two dispatches, gather
 * (sources -> scratch) and scatter (scratch -> destinations), through wrapper-owned scratch
 * buffers sized for options.maxMoves moves.
 *
 * Typical use for one pruning step, all in one compute pass (one moves list for every layer):
 *   const groups = layers.map((l) => compact.bind(params, moves, l.kCache, l.vCache));
 *   const massGroups = compact.bindMass(params, moves, mass);   // (groups can be kept)
 *   for (const g of groups) compact.encode(pass, g, count);     // K/V of each layer
 *   compact.encode(pass, massGroups, count);                    // mass, once
 */
import code from "../../shaders/kv_compact.wgsl" with { type: "text" };
import { createStorage } from "../gpu/buffers.ts";
import type { GpuContext } from "../gpu/context.ts";
import { type BindingKind, type BindingResource, Kernel } from "../gpu/kernel.ts";
import { GpuMemoryError, InvalidRequestError, ModelFormatError } from "../errors.ts";
import type { AttentionShape } from "./attention.ts";
import { workgroupGrid } from "./grid.ts";

/** WG in kv_compact.wgsl. */
const WORKGROUP = 64;

/** params, moves, kCache, vCache, mass, scratch, massScratch (shared by all four entry points). */
const BINDINGS: BindingKind[] = [
  "uniform",
  "read",
  "storage",
  "storage",
  "storage",
  "storage",
  "storage",
];

export type KvCompactShape = Pick<AttentionShape, "numKvHeads" | "headDim" | "blockSize">;

/** Bind groups for one application of the moves: to one layer's K/V pools, or to the mass. */
export interface KvCompactGroups {
  readonly target: "kv" | "mass";
  readonly gather: GPUBindGroup;
  readonly scatter: GPUBindGroup;
}

export class KvCompact {
  /** f32 [maxMoves, 2, Hkv, hd]: the K and V rows of each move's source. */
  readonly scratch: GPUBuffer;
  /** f32 [maxMoves]: each move's source mass. */
  readonly massScratch: GPUBuffer;
  readonly maxMoves: number;
  private readonly gather: Kernel;
  private readonly scatter: Kernel;
  private readonly gatherMass: Kernel;
  private readonly scatterMass: Kernel;
  /** Stand-ins for the bindings an application does not touch (two, so no writable aliasing). */
  private readonly unused: [GPUBuffer, GPUBuffer];
  private readonly maxPerDimension: number;

  /** options.maxMoves: the most moves one encode may apply (sizes the scratch buffers). */
  constructor(ctx: GpuContext, readonly shape: KvCompactShape, options: { maxMoves: number }) {
    const { numKvHeads, headDim, blockSize } = shape;
    if (headDim % 4 !== 0 || headDim <= 0) {
      throw new ModelFormatError(
        "config.json",
        `head_dim ${headDim} is not supported by kv_compact (needs a positive multiple of 4)`,
      );
    }
    if (!Number.isInteger(numKvHeads) || numKvHeads <= 0) {
      throw new ModelFormatError("config.json", `num_key_value_heads ${numKvHeads} must be >= 1`);
    }
    if (!Number.isInteger(blockSize) || blockSize <= 0) {
      throw new InvalidRequestError(`KV block size ${blockSize} must be a positive integer`);
    }
    const { maxMoves } = options;
    if (!Number.isInteger(maxMoves) || maxMoves < 1) {
      throw new InvalidRequestError(
        `kv_compact maxMoves must be a positive integer, got ${maxMoves}`,
      );
    }
    const scratchBytes = maxMoves * 2 * numKvHeads * headDim * 4;
    if (scratchBytes > ctx.limits.maxStorageBufferBindingSize) {
      throw new GpuMemoryError(
        `kv_compact scratch for ${maxMoves} moves needs ${scratchBytes} bytes, over this ` +
          `device's maxStorageBufferBindingSize ${ctx.limits.maxStorageBufferBindingSize}; ` +
          `use a smaller maxMoves and compact in several calls`,
      );
    }
    this.maxMoves = maxMoves;
    this.maxPerDimension = ctx.limits.maxComputeWorkgroupsPerDimension;
    this.scratch = createStorage(ctx, scratchBytes, "kv_compact_scratch");
    this.massScratch = createStorage(ctx, maxMoves * 4, "kv_compact_mass_scratch");
    this.unused = [
      createStorage(ctx, 16, "kv_compact_unused_a"),
      createStorage(ctx, 16, "kv_compact_unused_b"),
    ];
    const kernel = (entryPoint: string) =>
      Kernel.get(ctx, {
        name: "kv_compact",
        code,
        entryPoint,
        bindings: BINDINGS,
        constants: { HKV: numKvHeads, HD: headDim, BS: blockSize },
      });
    this.gather = kernel("gather");
    this.scatter = kernel("scatter");
    this.gatherMass = kernel("gatherMass");
    this.scatterMass = kernel("scatterMass");
  }

  /**
   * Groups applying the moves to one layer's pools. params: uniform { count: u32 } (packUniform
   * [["u32", count]]); moves: u32 [count, 2] = (srcPhysicalSlot, dstPhysicalSlot), distinct
   * destinations; kCache, vCache: f32 [numBlocks, Hkv, BS, hd]. Physical slot = block * BS +
   * offset.
   */
  bind(
    params: BindingResource,
    moves: BindingResource,
    kCache: BindingResource,
    vCache: BindingResource,
  ): KvCompactGroups {
    const resources = [
      params,
      moves,
      kCache,
      vCache,
      this.unused[0],
      this.scratch,
      this.massScratch,
    ];
    return {
      target: "kv",
      gather: this.gather.bind(resources),
      scatter: this.scatter.bind(resources),
    };
  }

  /** Groups applying the moves to mass: f32 [numBlocks * BS] (params and moves as in bind). */
  bindMass(
    params: BindingResource,
    moves: BindingResource,
    mass: BindingResource,
  ): KvCompactGroups {
    const resources = [
      params,
      moves,
      this.unused[0],
      this.unused[1],
      mass,
      this.scratch,
      this.massScratch,
    ];
    return {
      target: "mass",
      gather: this.gatherMass.bind(resources),
      scatter: this.scatterMass.bind(resources),
    };
  }

  /**
   * Records gather then scatter for `count` moves (params.count, at most maxMoves). Encodes of
   * several layers may follow each other in one pass: they share the scratch, but dispatches in
   * a pass run in order.
   */
  encode(pass: GPUComputePassEncoder, groups: KvCompactGroups, count: number): void {
    if (!Number.isInteger(count) || count < 0 || count > this.maxMoves) {
      throw new InvalidRequestError(
        `kv_compact: ${count} moves, but this KvCompact was made for at most ${this.maxMoves} ` +
          `(options.maxMoves)`,
      );
    }
    if (count === 0) return;
    const { numKvHeads, headDim } = this.shape;
    const invocations = groups.target === "kv" ? count * 2 * numKvHeads * (headDim / 4) : count;
    const [x, y] = workgroupGrid(Math.ceil(invocations / WORKGROUP), this.maxPerDimension);
    const [gather, scatter] = groups.target === "kv"
      ? [this.gather, this.scatter]
      : [this.gatherMass, this.scatterMass];
    gather.dispatch(pass, groups.gather, x, y);
    scatter.dispatch(pass, groups.scatter, x, y);
  }

  /** Frees the scratch buffers. */
  destroy(): void {
    this.scratch.destroy();
    this.massScratch.destroy();
    this.unused[0].destroy();
    this.unused[1].destroy();
  }
}
