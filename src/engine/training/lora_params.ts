/**
 * The trained adapter on the GPU: for every layer and target, the parameters A [rank, in] and
 * B [out, rank], their accumulated gradients and (AdamW) first and second moments. Also a
 * one-slot "pool" view (scales [1], per-row slots all 0) so the serving LoRA kernels run the
 * trained adapter in the training forward.
 */
import { createStorage, readF32, writeBuffer } from "../gpu/buffers.ts";
import type { GpuContext } from "../gpu/context.ts";
import { InvalidRequestError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  type LoraConfig,
  loraScale,
  type LoraTarget,
  type LoraWeights,
  targetShape,
} from "../lora/lora.ts";
import { rng } from "./seeded_random.ts";

/** One parameter tensor with its gradient and optimizer state, all f32 [count]. */
export interface ParamTensor {
  /** "layer.target.a" | "layer.target.b", for messages. */
  name: string;
  count: number;
  value: GPUBuffer;
  grad: GPUBuffer;
  m: GPUBuffer;
  v: GPUBuffer;
}

export interface AdaptedProjection {
  layer: number;
  target: LoraTarget;
  in: number;
  out: number;
  a: ParamTensor; // [rank, in]
  b: ParamTensor; // [out, rank]
}

export class LoraParams {
  readonly projections: AdaptedProjection[];
  /** f32 [1]: the adapter's scale, bound as the LoRA kernels' scales pool. */
  readonly scales: GPUBuffer;
  readonly scale: number;
  readonly bytes: number;
  /** projections by layer, then target. */
  readonly #byLayer: Partial<Record<LoraTarget, AdaptedProjection>>[];

  constructor(
    private readonly ctx: GpuContext,
    readonly model: ModelConfig,
    readonly config: LoraConfig,
  ) {
    if (!(Number.isInteger(config.rank) && config.rank > 0)) {
      throw new InvalidRequestError(`LoRA rank must be a positive integer, got ${config.rank}`);
    }
    if (config.targets.length === 0) {
      throw new InvalidRequestError(
        "LoRA needs at least one target projection (q, k, v, o, gate, up, down)",
      );
    }
    this.scale = loraScale(config);
    const tensor = (name: string, count: number): ParamTensor => ({
      name,
      count,
      value: createStorage(ctx, count * 4, `${name}`),
      grad: createStorage(ctx, count * 4, `${name}.grad`),
      m: createStorage(ctx, count * 4, `${name}.m`),
      v: createStorage(ctx, count * 4, `${name}.v`),
    });
    this.projections = [];
    this.#byLayer = [];
    for (let layer = 0; layer < model.numLayers; layer++) {
      const row: Partial<Record<LoraTarget, AdaptedProjection>> = {};
      for (const target of config.targets) {
        const shape = targetShape(model, target);
        const p: AdaptedProjection = {
          layer,
          target,
          in: shape.in,
          out: shape.out,
          a: tensor(`${layer}.${target}.a`, config.rank * shape.in),
          b: tensor(`${layer}.${target}.b`, shape.out * config.rank),
        };
        row[target] = p;
        this.projections.push(p);
      }
      this.#byLayer.push(row);
    }
    this.scales = createStorage(ctx, 4, "lora scale");
    writeBuffer(ctx, this.scales, 0, new Float32Array([this.scale]));
    this.bytes = this.tensors().reduce((sum, t) => sum + 4 * t.count * 4, 0);
  }

  projection(layer: number, target: LoraTarget): AdaptedProjection | undefined {
    return this.#byLayer[layer][target];
  }

  tensors(): ParamTensor[] {
    return this.projections.flatMap((p) => [p.a, p.b]);
  }

  /**
   * PEFT's default initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with
   * a = sqrt(5)), B = 0, so the adapted model starts equal to the base. Seeded.
   */
  initialize(seed: number): void {
    const next = rng(seed);
    for (const p of this.projections) {
      const bound = 1 / Math.sqrt(p.in);
      const a = Float32Array.from({ length: p.a.count }, () => (2 * next() - 1) * bound);
      this.#write(p, a, new Float32Array(p.b.count));
    }
  }

  /** Loads given weights (same config, shapes checked) and resets the optimizer state. */
  load(weights: LoraWeights): void {
    const c = weights.config;
    if (c.rank !== this.config.rank || c.alpha !== this.config.alpha) {
      throw new InvalidRequestError(
        `adapter has rank ${c.rank}, alpha ${c.alpha}; the trainer was built for rank ` +
          `${this.config.rank}, alpha ${this.config.alpha}`,
      );
    }
    if (weights.layers.length !== this.model.numLayers) {
      throw new InvalidRequestError(
        `adapter has ${weights.layers.length} layers, the model ${this.model.numLayers}`,
      );
    }
    for (const p of this.projections) {
      const pair = weights.layers[p.layer][p.target];
      if (!pair) {
        throw new InvalidRequestError(
          `adapter lacks layer ${p.layer} ${p.target}_proj, which the trainer targets`,
        );
      }
      if (pair.a.length !== p.a.count || pair.b.length !== p.b.count) {
        throw new InvalidRequestError(
          `adapter layer ${p.layer} ${p.target}_proj has A ${pair.a.length} / B ${pair.b.length} ` +
            `values, expected ${p.a.count} / ${p.b.count}`,
        );
      }
      this.#write(p, pair.a, pair.b);
    }
  }

  #write(p: AdaptedProjection, a: Float32Array, b: Float32Array) {
    writeBuffer(this.ctx, p.a.value, 0, a);
    writeBuffer(this.ctx, p.b.value, 0, b);
    for (const t of [p.a, p.b]) {
      const zeros = new Float32Array(t.count);
      writeBuffer(this.ctx, t.grad, 0, zeros);
      writeBuffer(this.ctx, t.m, 0, zeros);
      writeBuffer(this.ctx, t.v, 0, zeros);
    }
  }

  /** The current parameters as plain LoRA weights (for saving or publishing). */
  async read(): Promise<LoraWeights> {
    return { config: { ...this.config }, layers: await this.#readPairs("value") };
  }

  /** The accumulated gradients, shaped like the weights. */
  async readGrads(): Promise<LoraWeights> {
    return { config: { ...this.config }, layers: await this.#readPairs("grad") };
  }

  async #readPairs(which: "value" | "grad") {
    const layers: LoraWeights["layers"] = Array.from({ length: this.model.numLayers }, () => ({}));
    for (const p of this.projections) {
      layers[p.layer][p.target] = {
        a: await readF32(this.ctx, p.a[which], p.a.count),
        b: await readF32(this.ctx, p.b[which], p.b.count),
      };
    }
    return layers;
  }

  /** Records clearing every gradient (after an optimizer step). */
  clearGrads(encoder: GPUCommandEncoder): void {
    for (const t of this.tensors()) encoder.clearBuffer(t.grad);
  }

  destroy(): void {
    for (const t of this.tensors()) for (const b of [t.value, t.grad, t.m, t.v]) b.destroy();
    this.scales.destroy();
  }
}
