/**
 * Token embedding gather from one row chunk of the table: out[t, :] = E[ids[t] - rowStart, :]
 * for ids in [rowStart, rowStart + chunkRows); other rows of out are untouched,
 * so a table split into binding-sized chunks is gathered by one dispatch per chunk.
 * ids u32 [tokens]; E f32 [chunkRows, dim] or f16 packed [chunkRows, ceil(dim/2)] u32
 * (see f16_pack.ts); out f32 [tokens, dim]. See src/shaders/embedding.wgsl.
 */
import code from "../../shaders/embedding.wgsl" with { type: "text" };
import type { GpuContext } from "../gpu/context.ts";
import { type BindingResource, Kernel } from "../gpu/kernel.ts";
import { workgroupGrid } from "./grid.ts";

export interface EmbeddingOptions {
  dim: number;
  weight: "f32" | "f16";
}

/** embedding.wgsl WG. */
const THREADS = 256;

export class Embedding {
  private readonly kernel: Kernel;

  constructor(private readonly ctx: GpuContext, readonly options: EmbeddingOptions) {
    this.kernel = Kernel.get(ctx, {
      name: "embedding",
      code,
      bindings: ["uniform", "read", "read", "storage"],
      constants: { D: options.dim, WEIGHT_F16: options.weight === "f16" ? 1 : 0 },
    });
  }

  /**
   * params: uniform { tokens: u32, rowStart: u32, chunkRows: u32 }
   * (packUniform([["u32", tokens], ["u32", rowStart], ["u32", chunkRows]])), where
   * chunkRows must not exceed the rows `table` holds.
   */
  bind(
    params: BindingResource,
    ids: BindingResource,
    table: BindingResource,
    out: BindingResource,
  ): GPUBindGroup {
    return this.kernel.bind([params, ids, table, out]);
  }

  /** One thread per pair of output elements; `tokens` must equal params.tokens. */
  encode(pass: GPUComputePassEncoder, group: GPUBindGroup, tokens: number): void {
    const groups = Math.ceil((tokens * Math.ceil(this.options.dim / 2)) / THREADS);
    const [x, y] = workgroupGrid(groups, this.ctx.limits.maxComputeWorkgroupsPerDimension);
    this.kernel.dispatch(pass, group, x, y);
  }
}
