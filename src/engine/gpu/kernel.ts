/**
 * A compute kernel: one WGSL entry point with an explicit bind-group layout,
 * compiled once per (code, entry point, override constants) and cached per device.
 *
 * Conventions every kernel follows:
 *  - all bindings are in @group(0), numbered in the order of `bindings`;
 *  - sizes fixed for a model (hidden size, head dim, ...) are WGSL `override`
 *    constants, set through `constants`;
 *  - sizes that change per step (token count, ...) come from a uniform struct.
 */
import type { GpuContext } from "./context.ts";

export type BindingKind = "uniform" | "read" | "storage";

export interface KernelSpec {
  /** Shader file name without extension, used in labels and errors. */
  name: string;
  code: string;
  entryPoint?: string;
  bindings: readonly BindingKind[];
  constants?: Record<string, number>;
}

export type BindingResource = GPUBuffer | { buffer: GPUBuffer; offset?: number; size?: number };

const caches = new WeakMap<GPUDevice, Map<string, Kernel>>();

export class Kernel {
  readonly pipeline: GPUComputePipeline;
  readonly layout: GPUBindGroupLayout;

  private constructor(private readonly ctx: GpuContext, readonly spec: KernelSpec) {
    const device = ctx.device;
    const label = `${spec.name}:${spec.entryPoint ?? "main"}`;
    this.layout = device.createBindGroupLayout({
      label,
      entries: spec.bindings.map((kind, binding) => ({
        binding,
        visibility: GPUShaderStage.COMPUTE,
        buffer: {
          type: kind === "uniform" ? "uniform" : kind === "read" ? "read-only-storage" : "storage",
        },
      })),
    });
    const module = device.createShaderModule({ code: spec.code, label });
    this.pipeline = device.createComputePipeline({
      label,
      layout: device.createPipelineLayout({ bindGroupLayouts: [this.layout], label }),
      compute: { module, entryPoint: spec.entryPoint ?? "main", constants: spec.constants },
    });
  }

  /** The cached kernel for this spec on this device (compiled on first use). */
  static get(ctx: GpuContext, spec: KernelSpec): Kernel {
    let cache = caches.get(ctx.device);
    if (!cache) caches.set(ctx.device, cache = new Map());
    const constants = Object.entries(spec.constants ?? {}).sort(([a], [b]) => (a < b ? -1 : 1));
    const key = `${spec.name}|${spec.entryPoint ?? "main"}|${JSON.stringify(constants)}|${
      spec.bindings.join(",")
    }|${spec.code}`;
    let kernel = cache.get(key);
    if (!kernel) cache.set(key, kernel = new Kernel(ctx, spec));
    return kernel;
  }

  bind(resources: readonly BindingResource[]): GPUBindGroup {
    if (resources.length !== this.spec.bindings.length) {
      throw new Error(
        `${this.spec.name}: expected ${this.spec.bindings.length} bindings, ` +
          `got ${resources.length}`,
      );
    }
    return this.ctx.device.createBindGroup({
      label: this.spec.name,
      layout: this.layout,
      entries: resources.map((r, binding) => ({
        binding,
        resource: "buffer" in r ? r : { buffer: r },
      })),
    });
  }

  dispatch(pass: GPUComputePassEncoder, group: GPUBindGroup, x: number, y = 1, z = 1): void {
    if (x === 0 || y === 0 || z === 0) return;
    pass.setPipeline(this.pipeline);
    pass.setBindGroup(0, group);
    pass.dispatchWorkgroups(x, y, z);
  }
}

/** Encodes one compute pass with `record`, submits it, and returns when queued. */
export function runPass(ctx: GpuContext, record: (pass: GPUComputePassEncoder) => void): void {
  const encoder = ctx.device.createCommandEncoder();
  const pass = encoder.beginComputePass();
  record(pass);
  pass.end();
  ctx.device.queue.submit([encoder.finish()]);
}
