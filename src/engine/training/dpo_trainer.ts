/**
 * DPO on a LoRA adapter, on the GPU, cut into slices a scheduler can place between decode steps.
 *
 * One optimizer step over P pairs (gradient accumulation) is the slice list (slice_plan.ts)
 *   reference(pair, layers [lo, hi))  for pairs whose reference log-probs are not cached yet
 *                    (adapter off; at the last layer the sums are read back and cached on the CPU),
 *   forward(pair, layers [lo, hi))  policy forward of chosen and rejected; at the last layer the
 *                    DPO loss kernel writes the loss and dL/d(summed log-probs) (already / P),
 *   backward(pair, layers [hi, lo))  the head (when hi = L) and layers hi-1..lo of both sequences,
 *   optimizer        global gradient norm, clipping, AdamW or SGD, gradients cleared.
 * The slices of a step record exactly the dispatches of the unsliced step, in the same order,
 * so sliced and unsliced training give the same parameters.
 *
 *   L = -log σ(β[(π_w - ref_w) - (π_l - ref_l)]),  π = Σ response-token log-probs (incl. EOS).
 */
import { createStorage, packUniform, readF32, writeBuffer } from "../gpu/buffers.ts";
import type { GpuContext } from "../gpu/context.ts";
import { InvalidRequestError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";
import type { GpuWeights } from "../model/gpu_weights.ts";
import type { LoraConfig, LoraWeights } from "../lora/lora.ts";
import { DpoLoss } from "../kernels/dpo_loss.ts";
import { GradSquareSum } from "../kernels/grad_norm.ts";
import { AdamW, adamwParams, Sgd, sgdParams } from "../kernels/optimizer.ts";
import { LoraParams } from "./lora_params.ts";
import { type ForwardOptions, TrainingGraph } from "./training_graph.ts";
import { planDpoSlices, type TrainingSlice } from "./slice_plan.ts";

/**
 * A tokenized preference pair: prompt (with BOS), responses (each ending in EOS unless truncated).
 */
export interface TrainingPair {
  prompt: number[];
  chosen: number[];
  rejected: number[];
}

export interface DpoOptions {
  beta: number;
  learningRate: number;
  optimizer: "adamw" | "sgd";
  /** AdamW only. */
  weightDecay: number;
  adamBetas: [number, number];
  adamEps: number;
  /** Clip the global gradient norm to this; 0 = no clipping. */
  maxGradNorm: number;
  /** Most pairs one optimizer step accumulates. */
  maxPairsPerStep: number;
  /** Longest prompt + response, in tokens. */
  maxLength: number;
}

export const DEFAULT_DPO_OPTIONS: DpoOptions = {
  beta: 0.1,
  learningRate: 5e-4,
  optimizer: "adamw",
  weightDecay: 0,
  adamBetas: [0.9, 0.999],
  adamEps: 1e-8,
  maxGradNorm: 1,
  maxPairsPerStep: 8,
  maxLength: 256,
};

export type { TrainingSlice };

/** A slice of one of the kinds that cover a layer range. */
type LayerSlice<K extends TrainingSlice["kind"]> = Extract<TrainingSlice, { kind: K }>;

export interface PairStats {
  loss: number;
  chosenLogp: number;
  rejectedLogp: number;
  chosenReward: number;
  rejectedReward: number;
  margin: number;
}

export interface StepStats {
  step: number;
  pairs: number;
  /** Means over the step's pairs. */
  loss: number;
  rewardAccuracy: number;
  rewardMargin: number;
  chosenLogp: number;
  rejectedLogp: number;
  perPair: PairStats[];
}

/** Floats between consecutive pairs' loss outputs: 64 floats = 256 bytes, a binding alignment. */
const PAIR_STRIDE = 64;

export class DpoTrainer {
  readonly params: LoraParams;
  readonly graph: TrainingGraph;
  readonly options: DpoOptions;
  /** Optimizer steps taken. */
  stepCount = 0;
  readonly #ctx: GpuContext;
  readonly #refCache = new Map<string, { chosen: number; rejected: number }>();
  readonly #lossOut: GPUBuffer; // f32 [maxPairs, 64]: DpoLoss outputs, pair j at j * 64
  readonly #refSums: GPUBuffer; // f32 [maxPairs, 64]: (ref chosen, ref rejected) at j * 64
  readonly #respLogp: GPUBuffer; // f32 [2 maxLength]: response log-probs, chosen then rejected
  readonly #partials: GPUBuffer; // f32 [tensors]: squared gradient norm per tensor
  readonly #lossParams: GPUBuffer[]; // uniform per pair
  readonly #normParams: GPUBuffer[]; // uniform per tensor
  readonly #optParams: GPUBuffer[]; // uniform per tensor
  readonly #dpo: DpoLoss;
  readonly #gradNorm: GradSquareSum;
  readonly #adamw: AdamW;
  readonly #sgd: Sgd;
  readonly #owned: GPUBuffer[] = [];
  /** The pairs of the step being run, and which of them went through forward. */
  #pairs: TrainingPair[] = [];
  #forwarded = -1;
  /** Where the last forward or reference slice left the graph's slots. */
  #forwardAt: { kind: "reference" | "forward"; pair: number; layer: number } | null = null;
  #dropoutSeed = 0;

  constructor(
    ctx: GpuContext,
    readonly model: ModelConfig,
    weights: GpuWeights,
    lora: LoraConfig,
    options: Partial<DpoOptions> = {},
  ) {
    this.#ctx = ctx;
    this.options = { ...DEFAULT_DPO_OPTIONS, ...options };
    const o = this.options;
    if (!(o.beta > 0)) throw new InvalidRequestError(`beta must be > 0, got ${o.beta}`);
    if (!(o.learningRate >= 0)) {
      throw new InvalidRequestError(`learning rate must be >= 0, got ${o.learningRate}`);
    }
    if (!(o.maxGradNorm >= 0)) {
      throw new InvalidRequestError(`max grad norm must be >= 0 (0 = off), got ${o.maxGradNorm}`);
    }
    if (!(Number.isInteger(o.maxLength) && o.maxLength >= 2)) {
      throw new InvalidRequestError(`max length must be an integer >= 2, got ${o.maxLength}`);
    }
    this.params = new LoraParams(ctx, model, lora);
    this.graph = new TrainingGraph(ctx, model, weights, this.params, o.maxLength);
    const storage = (floats: number, label: string) => {
      const b = createStorage(ctx, floats * 4, label);
      this.#owned.push(b);
      return b;
    };
    const uniform = (label: string) => {
      const b = ctx.device.createBuffer({
        size: 64,
        usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
        label,
      });
      this.#owned.push(b);
      return b;
    };
    this.#lossOut = storage(o.maxPairsPerStep * PAIR_STRIDE, "dpo.out");
    this.#refSums = storage(o.maxPairsPerStep * PAIR_STRIDE, "dpo.ref_sums");
    this.#respLogp = storage(2 * o.maxLength, "dpo.response_logp");
    const tensors = this.params.tensors();
    this.#partials = storage(tensors.length, "dpo.grad_partials");
    this.#lossParams = Array.from(
      { length: o.maxPairsPerStep },
      (_, j) => uniform(`dpo.loss.${j}`),
    );
    this.#normParams = tensors.map((t, i) => {
      const b = uniform(`grad_norm.${t.name}`);
      ctx.device.queue.writeBuffer(b, 0, packUniform([["u32", t.count], ["u32", i]]));
      return b;
    });
    this.#optParams = tensors.map((t) => uniform(`optimizer.${t.name}`));
    this.#dpo = new DpoLoss(ctx);
    this.#gradNorm = new GradSquareSum(ctx);
    this.#adamw = new AdamW(ctx);
    this.#sgd = new Sgd(ctx);
  }

  /** GPU bytes of training state: adapter + gradients + optimizer moments, and activations. */
  get memory(): { adapterBytes: number; activationBytes: number } {
    return {
      adapterBytes: this.params.bytes,
      activationBytes: this.graph.bytes + this.#owned.reduce((s, b) => s + b.size, 0),
    };
  }

  /** PEFT-style initialisation from `seed`, which also seeds the dropout masks. */
  initialize(seed: number): void {
    this.params.initialize(seed);
    this.#dropoutSeed = seed;
    this.stepCount = 0;
  }

  /** Starts from given weights; `seed` seeds the dropout masks. */
  load(weights: LoraWeights, seed = 0): void {
    this.params.load(weights);
    this.#dropoutSeed = seed;
    this.stepCount = 0;
  }

  /**
   * Makes `pairs` the step in progress and returns its slices, `layersPerSlice` layers per
   * backward slice; run them in order with runSlice (other work may run between them).
   */
  planStep(pairs: TrainingPair[], layersPerSlice = this.model.numLayers): TrainingSlice[] {
    this.#begin(pairs);
    return planDpoSlices(
      pairs.map((p) => this.#refCache.has(pairKey(p))),
      this.model.numLayers,
      layersPerSlice,
    );
  }

  /**
   * Drops the step in progress without an optimizer update (an iteration failed and its slices'
   * results are unknown): the gradients accumulated so far are cleared.
   */
  abandonStep(): void {
    const encoder = this.#ctx.device.createCommandEncoder({ label: "dpo.abandon" });
    this.params.clearGrads(encoder);
    this.#ctx.device.queue.submit([encoder.finish()]);
    this.#pairs = [];
    this.#forwarded = -1;
    this.#forwardAt = null;
  }

  #begin(pairs: TrainingPair[]) {
    const o = this.options;
    if (pairs.length === 0 || pairs.length > o.maxPairsPerStep) {
      throw new InvalidRequestError(
        `a step takes 1..${o.maxPairsPerStep} pairs, got ${pairs.length}`,
      );
    }
    pairs.forEach((p, j) => {
      for (const [name, response] of [["chosen", p.chosen], ["rejected", p.rejected]] as const) {
        const length = p.prompt.length + response.length;
        if (p.prompt.length < 1 || response.length < 1 || length > o.maxLength) {
          throw new InvalidRequestError(
            `pair ${j}: ${name} has prompt ${p.prompt.length} + response ${response.length} ` +
              `tokens; need a non-empty prompt and response and at most max length ${o.maxLength}`,
          );
        }
      }
    });
    this.#pairs = pairs;
    this.#forwarded = -1;
    this.#forwardAt = null;
  }

  /** Records and submits one slice; reference slices also wait for their log-probs. */
  async runSlice(slice: TrainingSlice): Promise<void> {
    switch (slice.kind) {
      case "reference":
        return await this.#runReference(slice);
      case "forward":
        return this.#runForward(slice);
      case "backward":
        return this.#runBackward(slice);
      case "optimizer":
        return this.#submit("optimizer", (encoder) => this.#encodeOptimizer(encoder));
    }
  }

  /** Records `record` into one command encoder labelled dpo.<kind> and submits it. */
  #submit(kind: TrainingSlice["kind"], record: (encoder: GPUCommandEncoder) => void): void {
    const encoder = this.#ctx.device.createCommandEncoder({ label: `dpo.${kind}` });
    record(encoder);
    this.#ctx.device.queue.submit([encoder.finish()]);
  }

  /**
   * The adapter-off forward of the pair's two sequences through the slice's layers; at the last
   * layer their summed response log-probs are read back and cached.
   */
  async #runReference(slice: LayerSlice<"reference">): Promise<void> {
    const pair = this.#pairs[slice.pair];
    this.#advance(slice);
    if (slice.fromLayer === 0) this.#loadPair(pair, slice.pair);
    const { fromLayer, toLayer } = slice;
    this.#submit("reference", (encoder) => {
      for (const slot of [0, 1] as const) {
        this.graph.encodeForward(encoder, slot, {
          adapter: false,
          dropout: false,
          fromLayer,
          toLayer,
        });
      }
    });
    if (toLayer < this.model.numLayers) return;
    const sum = async (slot: 0 | 1) => {
      const s = this.graph.slots[slot];
      const logp = await readF32(this.#ctx, s.logp, s.length - s.promptLength, s.promptLength - 1);
      return logp.reduce((a, b) => a + b, 0);
    };
    // Both copies are submitted now, before any later work can overwrite the slots.
    const [chosen, rejected] = await Promise.all([sum(0), sum(1)]);
    this.#refCache.set(pairKey(pair), { chosen, rejected });
  }

  /** The training forward (dropout on) of the pair through the slice's layers, then its loss. */
  #runForward(slice: LayerSlice<"forward">): void {
    this.#advance(slice);
    const { pair, fromLayer, toLayer } = slice;
    this.#submit("forward", (encoder) => {
      this.#encodeForwardAndLoss(encoder, pair, { dropout: true, fromLayer, toLayer });
    });
    if (toLayer === this.model.numLayers) this.#forwarded = pair;
  }

  /**
   * The backward of the pair's two sequences: the head when the slice starts at the last layer,
   * then layers fromLayer-1 down to toLayer; the adapter's gradients accumulate.
   */
  #runBackward(slice: LayerSlice<"backward">): void {
    if (this.#forwarded !== slice.pair) {
      throw new Error(`backward slice of pair ${slice.pair} without its forward slice just before`);
    }
    this.#submit("backward", (encoder) => {
      for (const slot of [0, 1] as const) {
        if (slice.fromLayer === this.model.numLayers) {
          this.graph.encodeHeadBackward(encoder, slot, this.#lossOut);
        }
        for (let l = slice.fromLayer - 1; l >= slice.toLayer; l--) {
          this.graph.encodeLayerBackward(encoder, l, slot);
        }
      }
    });
  }

  /**
   * Loads chosen into slot 0 and rejected into slot 1; their loss gradients sit at pair j's
   * output. Dropout masks are seeded by (seed, step, pair, slot): fixed within a step.
   */
  #loadPair(pair: TrainingPair, j: number) {
    const seed = (slot: number) =>
      (Math.imul(this.#dropoutSeed, 0x9e3779b1) + Math.imul(this.stepCount + 1, 0x85ebca6b) +
        Math.imul(j + 1, 0xc2b2ae35) + slot) >>> 0;
    this.graph.load(
      0,
      [...pair.prompt, ...pair.chosen],
      pair.prompt.length,
      j * PAIR_STRIDE + 1,
      seed(0),
    );
    this.graph.load(
      1,
      [...pair.prompt, ...pair.rejected],
      pair.prompt.length,
      j * PAIR_STRIDE + 2,
      seed(1),
    );
  }

  /**
   * A forward or reference slice continues the sequences in the graph's slots: one starting past
   * layer 0 must follow the slice of the same kind and pair that ended at its first layer.
   */
  #advance(slice: LayerSlice<"reference" | "forward">) {
    const at = this.#forwardAt;
    if (
      slice.fromLayer > 0 &&
      (at?.kind !== slice.kind || at.pair !== slice.pair || at.layer !== slice.fromLayer)
    ) {
      throw new Error(
        `${slice.kind} slice of pair ${slice.pair} from layer ${slice.fromLayer} without the ` +
          `slice before it`,
      );
    }
    this.#forwardAt = { kind: slice.kind, pair: slice.pair, layer: slice.toLayer };
  }

  /**
   * Policy forward of pair j's two sequences through layers [fromLayer, toLayer) (default: all;
   * LoRA dropout when training), then, at the last layer, its DPO loss.
   */
  #encodeForwardAndLoss(
    encoder: GPUCommandEncoder,
    j: number,
    options: Pick<ForwardOptions, "dropout" | "fromLayer" | "toLayer">,
  ) {
    const { dropout, fromLayer = 0, toLayer = this.model.numLayers } = options;
    const pair = this.#pairs[j];
    if (fromLayer === 0) {
      const ref = this.#refCache.get(pairKey(pair));
      if (!ref) throw new Error(`forward slice of pair ${j} before its reference slices`);
      this.#loadPair(pair, j);
      writeBuffer(
        this.#ctx,
        this.#refSums,
        j * PAIR_STRIDE * 4,
        new Float32Array([ref.chosen, ref.rejected]),
      );
    }
    for (const slot of [0, 1] as const) {
      this.graph.encodeForward(encoder, slot, { adapter: true, dropout, fromLayer, toLayer });
    }
    if (toLayer === this.model.numLayers) this.#encodeLoss(encoder, j);
  }

  #encodeLoss(encoder: GPUCommandEncoder, j: number) {
    const [chosen, rejected] = this.graph.slots;
    const rc = chosen.length - chosen.promptLength, rr = rejected.length - rejected.promptLength;
    // The response rows' log-probs, packed: chosen [0, rc), rejected [rc, rc + rr).
    encoder.copyBufferToBuffer(
      chosen.logp,
      (chosen.promptLength - 1) * 4,
      this.#respLogp,
      0,
      rc * 4,
    );
    encoder.copyBufferToBuffer(
      rejected.logp,
      (rejected.promptLength - 1) * 4,
      this.#respLogp,
      rc * 4,
      rr * 4,
    );
    this.#ctx.device.queue.writeBuffer(
      this.#lossParams[j],
      0,
      packUniform([["u32", rc], ["u32", rr], ["f32", this.options.beta], [
        "f32",
        1 / this.#pairs.length,
      ]]),
    );
    const pass = encoder.beginComputePass();
    const stride = PAIR_STRIDE * 4;
    const group = this.#dpo.bind(
      this.#lossParams[j],
      this.#respLogp,
      { buffer: this.#refSums, offset: j * stride, size: 8 },
      { buffer: this.#lossOut, offset: j * stride, size: 32 },
    );
    this.#dpo.encode(pass, group);
    pass.end();
  }

  #encodeOptimizer(encoder: GPUCommandEncoder) {
    const o = this.options, tensors = this.params.tensors();
    this.stepCount++;
    const pass = encoder.beginComputePass();
    tensors.forEach((t, i) => {
      this.#gradNorm.encode(pass, this.#gradNorm.bind(this.#normParams[i], t.grad, this.#partials));
    });
    tensors.forEach((t, i) => {
      const params = this.#optParams[i];
      if (o.optimizer === "adamw") {
        this.#ctx.device.queue.writeBuffer(
          params,
          0,
          adamwParams({
            count: t.count,
            step: this.stepCount,
            numPartials: tensors.length,
            lr: o.learningRate,
            beta1: o.adamBetas[0],
            beta2: o.adamBetas[1],
            eps: o.adamEps,
            weightDecay: o.weightDecay,
            gradScale: 1,
            maxGradNorm: o.maxGradNorm,
          }),
        );
        this.#adamw.encode(
          pass,
          this.#adamw.bind(params, this.#partials, t.grad, t.value, t.m, t.v),
          t.count,
        );
      } else {
        this.#ctx.device.queue.writeBuffer(
          params,
          0,
          sgdParams({
            count: t.count,
            numPartials: tensors.length,
            lr: o.learningRate,
            gradScale: 1,
            maxGradNorm: o.maxGradNorm,
          }),
        );
        this.#sgd.encode(pass, this.#sgd.bind(params, this.#partials, t.grad, t.value), t.count);
      }
    });
    pass.end();
    this.params.clearGrads(encoder);
  }

  /**
   * Records the forward, loss and backward of every pair without the optimizer step, so the
   * accumulated gradient can be read (tests compare it with the CPU reference).
   */
  async accumulateGradients(pairs: TrainingPair[]): Promise<PairStats[]> {
    for (const slice of this.planStep(pairs)) {
      if (slice.kind !== "optimizer") await this.runSlice(slice);
    }
    return await this.#readPairStats(pairs.length);
  }

  /** One optimizer step over `pairs` (unsliced: every slice back to back). */
  async step(pairs: TrainingPair[], layersPerSlice?: number): Promise<StepStats> {
    for (const slice of this.planStep(pairs, layersPerSlice)) await this.runSlice(slice);
    return summarize(this.stepCount, await this.#readPairStats(pairs.length));
  }

  /** Loss and rewards of each pair of the step whose slices were just run (one readback). */
  async readStepStats(): Promise<StepStats> {
    return summarize(this.stepCount, await this.#readPairStats(this.#pairs.length));
  }

  /** Drops the cached reference log-probs of pairs that will not be trained again. */
  forgetReferences(pairs: readonly TrainingPair[]): void {
    for (const p of pairs) this.#refCache.delete(pairKey(p));
  }

  /** True when the reference log-probs of `pair` are cached (no reference slice needed). */
  hasReference(pair: TrainingPair): boolean {
    return this.#refCache.has(pairKey(pair));
  }

  /** Loss and rewards of each pair of the step just run (one readback). */
  async #readPairStats(count: number): Promise<PairStats[]> {
    const out = await readF32(this.#ctx, this.#lossOut, count * PAIR_STRIDE);
    return Array.from({ length: count }, (_, j) => {
      const o = out.subarray(j * PAIR_STRIDE);
      return {
        loss: o[0],
        chosenLogp: o[3],
        rejectedLogp: o[4],
        chosenReward: o[5],
        rejectedReward: o[6],
        margin: o[7],
      };
    });
  }

  /** Loss and rewards of pairs without training (held-out evaluation); uses the reference cache. */
  async evaluate(pairs: TrainingPair[]): Promise<StepStats> {
    const stats: PairStats[] = [];
    for (let i = 0; i < pairs.length; i += this.options.maxPairsPerStep) {
      const batch = pairs.slice(i, i + this.options.maxPairsPerStep);
      this.#begin(batch);
      for (let j = 0; j < batch.length; j++) {
        if (!this.#refCache.has(pairKey(batch[j]))) {
          await this.runSlice({
            kind: "reference",
            pair: j,
            fromLayer: 0,
            toLayer: this.model.numLayers,
          });
        }
        const encoder = this.#ctx.device.createCommandEncoder({ label: "dpo.evaluate" });
        this.#encodeForwardAndLoss(encoder, j, { dropout: false });
        this.#ctx.device.queue.submit([encoder.finish()]);
      }
      stats.push(...await this.#readPairStats(batch.length));
    }
    this.#forwarded = -1;
    return summarize(this.stepCount, stats);
  }

  destroy(): void {
    this.graph.destroy();
    this.params.destroy();
    for (const b of this.#owned) b.destroy();
  }
}

function pairKey(p: TrainingPair): string {
  return `${p.prompt.join(",")}|${p.chosen.join(",")}|${p.rejected.join(",")}`;
}

function summarize(step: number, perPair: PairStats[]): StepStats {
  const mean = (f: (p: PairStats) => number) =>
    perPair.reduce((s, p) => s + f(p), 0) / perPair.length;
  return {
    step,
    pairs: perPair.length,
    loss: mean((p) => p.loss),
    rewardAccuracy: mean((p) => (p.margin > 0 ? 1 : 0)),
    rewardMargin: mean((p) => p.margin),
    chosenLogp: mean((p) => p.chosenLogp),
    rejectedLogp: mean((p) => p.rejectedLogp),
    perPair,
  };
}
