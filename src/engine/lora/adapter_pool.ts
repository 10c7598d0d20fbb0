/**
 * GPU storage for the LoRA adapters a serving engine keeps resident at once (S-LoRA style):
 * up to `maxAdapters` adapters of rank <= `maxRank`, each in a slot, on a fixed set of target
 * projections. Per layer and target:
 *   A pool f32 [maxAdapters, maxRank, in]   (slot s, rows 0..rank-1: the adapter's lora_A; 0 past)
 *   B pool f32 [maxAdapters, out, maxRank]   (slot s, columns 0..rank-1: its lora_B; 0 past)
 * and one scales buffer f32 [maxAdapters] (alpha / rank per slot). The forward pass reads them
 * through kernels/lora.ts with each token's slot, so one step mixes adapters.
 * Loading overwrites the whole slot (padding and unused targets included), so a freed slot
 * needs no clearing; queue writes are ordered after steps already submitted, so a slot can be
 * reused while steps that read its previous adapter are still in flight.
 */
import type { GpuContext } from "../gpu/context.ts";
import { createStorage, writeBuffer } from "../gpu/buffers.ts";
import type { ModelConfig } from "../model/config.ts";
import { AdapterPoolFullError, GpuMemoryError, LoraAdapterError } from "../errors.ts";
import {
  LORA_TARGETS,
  type LoraPair,
  loraScale,
  type LoraTarget,
  type LoraWeights,
  targetShape,
} from "./lora.ts";

export interface AdapterPoolOptions {
  /** Adapters resident at once (slots). */
  maxAdapters: number;
  /** Largest rank an adapter may have; smaller ranks are zero-padded to it. */
  maxRank: number;
  /** Projections adapters may adapt; an adapter may use any subset. */
  targets: LoraTarget[];
}

/**
 * Defaults: 4 adapters of rank <= 16 on all seven projections. The pool then takes
 * 4 * 16 * sum over targets of (in + out) * 4 bytes per layer: about 75 MiB for SmolLM2-135M
 * (30 layers), about 1.5 MiB for the bundled stories260K; pass fewer targets for larger models.
 */
export const DEFAULT_ADAPTER_POOL: AdapterPoolOptions = {
  maxAdapters: 4,
  maxRank: 16,
  targets: [...LORA_TARGETS],
};

/** The pools of one adapted projection of one layer. */
export interface TargetPool {
  /** f32 [maxAdapters, maxRank, in]. */
  a: GPUBuffer;
  /** f32 [maxAdapters, out, maxRank]. */
  b: GPUBuffer;
  in: number;
  out: number;
}

export class AdapterPool {
  readonly maxAdapters: number;
  readonly maxRank: number;
  /** The pool's targets, in LORA_TARGETS order. */
  readonly targets: readonly LoraTarget[];
  /** Per layer, the pools of each target. */
  readonly layers: readonly ReadonlyMap<LoraTarget, TargetPool>[];
  /** f32 [maxAdapters]: alpha / rank of the adapter in each slot. */
  readonly scales: GPUBuffer;
  readonly bytes: number;
  private readonly used: boolean[];

  constructor(
    private readonly ctx: GpuContext,
    readonly model: ModelConfig,
    options: AdapterPoolOptions,
  ) {
    const { maxAdapters, maxRank } = options;
    if (
      !Number.isInteger(maxAdapters) || maxAdapters < 1 || !Number.isInteger(maxRank) || maxRank < 1
    ) {
      throw new LoraAdapterError(
        `adapter pool: maxAdapters and maxRank must be positive integers (got ${maxAdapters}, ` +
          `${maxRank})`,
      );
    }
    const unknown = options.targets.filter((t) => !LORA_TARGETS.includes(t));
    if (unknown.length > 0 || options.targets.length === 0) {
      throw new LoraAdapterError(
        `adapter pool: targets must be a non-empty subset of ${LORA_TARGETS.join(", ")} (got ${
          options.targets.join(", ")
        })`,
      );
    }
    this.maxAdapters = maxAdapters;
    this.maxRank = maxRank;
    this.targets = LORA_TARGETS.filter((t) => options.targets.includes(t));
    const limit = Math.min(ctx.limits.maxStorageBufferBindingSize, ctx.limits.maxBufferSize);
    const pool = (floats: number, label: string) => {
      if (floats * 4 > limit) {
        throw new GpuMemoryError(
          `adapter pool "${label}" needs ${
            floats * 4
          } bytes, over this device's binding limit ${limit}; ` +
            `lower lora.maxAdapters or lora.maxRank`,
        );
      }
      return createStorage(ctx, floats * 4, label);
    };
    let bytes = 0;
    this.layers = Array.from({ length: model.numLayers }, (_, l) => {
      const map = new Map<LoraTarget, TargetPool>();
      for (const target of this.targets) {
        const shape = targetShape(model, target);
        const a = pool(maxAdapters * maxRank * shape.in, `lora_a.${l}.${target}`);
        const b = pool(maxAdapters * shape.out * maxRank, `lora_b.${l}.${target}`);
        bytes += a.size + b.size;
        map.set(target, { a, b, in: shape.in, out: shape.out });
      }
      return map;
    });
    this.scales = createStorage(ctx, maxAdapters * 4, "lora_scales");
    this.bytes = bytes + this.scales.size;
    this.used = new Array(maxAdapters).fill(false);
  }

  /** Slots not holding an adapter. */
  get freeSlots(): number {
    return this.used.filter((u) => !u).length;
  }

  /** Throws LoraAdapterError unless `weights` fits this pool and model. */
  validate(weights: LoraWeights): void {
    const { rank, alpha, targets } = weights.config;
    if (!Number.isInteger(rank) || rank < 1) {
      throw new LoraAdapterError(`adapter rank must be a positive integer, got ${rank}`);
    }
    if (rank > this.maxRank) {
      throw new LoraAdapterError(
        `adapter rank ${rank} exceeds the adapter pool's maximum rank ${this.maxRank}; ` +
          `create the engine with lora.maxRank >= ${rank}`,
      );
    }
    if (!Number.isFinite(alpha)) {
      throw new LoraAdapterError(`adapter alpha must be finite, got ${alpha}`);
    }
    const missing = targets.filter((t) => !this.targets.includes(t));
    if (missing.length > 0) {
      throw new LoraAdapterError(
        `adapter targets ${missing.join(", ")}, which the adapter pool does not hold ` +
          `(pool targets: ${
            this.targets.join(", ")
          }); create the engine with lora.targets including them`,
      );
    }
    if (weights.layers.length !== this.model.numLayers) {
      throw new LoraAdapterError(
        `adapter has ${weights.layers.length} layers, the model ${this.model.numLayers}`,
      );
    }
    weights.layers.forEach((layer, l) => {
      for (const [target, pair] of Object.entries(layer) as [LoraTarget, LoraPair | undefined][]) {
        if (!pair) continue;
        if (!targets.includes(target)) {
          throw new LoraAdapterError(
            `adapter layer ${l} has a ${target} pair, but its config targets only ${
              targets.join(", ")
            }`,
          );
        }
        const shape = targetShape(this.model, target);
        if (pair.a.length !== rank * shape.in || pair.b.length !== shape.out * rank) {
          throw new LoraAdapterError(
            `adapter layer ${l} ${target}: A has ${pair.a.length} values and B ${pair.b.length}; ` +
              `rank ${rank} on this model needs A [${rank}, ${shape.in}] and B [${shape.out}, ` +
              `${rank}]`,
          );
        }
      }
    });
  }

  /**
   * Uploads an adapter into the lowest free slot and returns the slot. Targets or layers the
   * adapter leaves out contribute nothing (their slot rows are zero).
   */
  load(weights: LoraWeights): number {
    this.validate(weights);
    const slot = this.used.indexOf(false);
    if (slot < 0) {
      throw new AdapterPoolFullError(
        `all ${this.maxAdapters} adapter slots are in use; unload an adapter or create the ` +
          `engine with a larger lora.maxAdapters`,
      );
    }
    const R = this.maxRank, rank = weights.config.rank;
    this.layers.forEach((pools, l) => {
      for (const [target, pool] of pools) {
        const pair = weights.layers[l][target];
        const a = new Float32Array(R * pool.in);
        const b = new Float32Array(pool.out * R);
        if (pair) {
          a.set(pair.a);
          for (let n = 0; n < pool.out; n++) {
            b.set(pair.b.subarray(n * rank, (n + 1) * rank), n * R);
          }
        }
        writeBuffer(this.ctx, pool.a, slot * a.byteLength, a);
        writeBuffer(this.ctx, pool.b, slot * b.byteLength, b);
      }
    });
    writeBuffer(this.ctx, this.scales, slot * 4, Float32Array.of(loraScale(weights.config)));
    this.used[slot] = true;
    return slot;
  }

  free(slot: number): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.maxAdapters || !this.used[slot]) {
      throw new LoraAdapterError(`adapter slot ${slot} holds no adapter`);
    }
    this.used[slot] = false;
  }

  destroy(): void {
    for (const pools of this.layers) {
      for (const pool of pools.values()) {
        pool.a.destroy();
        pool.b.destroy();
      }
    }
    this.scales.destroy();
  }
}
