/**
 * LoRA adapters: the types every part of the engine shares (serving, training, PEFT files).
 *
 * A target projection W [out, in] (HF [out, in]) gets  y = x W^T + scale · (x A^T) B^T  with
 * A [rank, in], B [out, rank] (PEFT's lora_A.weight / lora_B.weight) and scale = alpha / rank.
 * The base W stays frozen; only A and B are trained.
 */
import { InvalidRequestError } from "../errors.ts";
import type { ModelConfig } from "../model/config.ts";

export const LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"] as const;
export type LoraTarget = typeof LORA_TARGETS[number];

/**
 * Projection names (as a flag or an API lists them; PEFT's "q_proj" spelling accepted) to the
 * targets they name, deduplicated, in LORA_TARGETS order. Throws InvalidRequestError naming the
 * valid targets on an unknown name or an empty list.
 */
export function parseLoraTargets(targets: readonly string[]): LoraTarget[] {
  const valid = LORA_TARGETS as readonly string[];
  const names = targets.map((t) => t.trim().replace(/_proj$/, "")).filter((t) => t !== "");
  for (const name of names) {
    if (!valid.includes(name)) {
      throw new InvalidRequestError(
        `unknown LoRA target "${name}"; valid targets: ${LORA_TARGETS.join(", ")}`,
      );
    }
  }
  if (names.length === 0) {
    throw new InvalidRequestError(
      `no LoRA target given; name some of ${LORA_TARGETS.join(", ")}`,
    );
  }
  return LORA_TARGETS.filter((t) => names.includes(t));
}

export interface LoraConfig {
  rank: number;
  alpha: number;
  /** Projections that carry an adapter, in LORA_TARGETS order. */
  targets: LoraTarget[];
  /** Dropout on the LoRA input while training (PEFT lora_dropout); 0 = none. */
  dropout: number;
}

/** One adapted projection: A [rank, in] and B [out, rank], float32 row-major. */
export interface LoraPair {
  a: Float32Array;
  b: Float32Array;
}

/** An adapter: per layer, the pairs of the configured targets. */
export interface LoraWeights {
  config: LoraConfig;
  layers: Partial<Record<LoraTarget, LoraPair>>[];
}

export function loraScale(config: LoraConfig): number {
  return config.alpha / config.rank;
}

/** [in, out] features of a target projection for this model. */
export function targetShape(
  model: Pick<
    ModelConfig,
    "hiddenSize" | "intermediateSize" | "numHeads" | "numKvHeads" | "headDim"
  >,
  target: LoraTarget,
): { in: number; out: number } {
  const D = model.hiddenSize, I = model.intermediateSize;
  const qWidth = model.numHeads * model.headDim, kvWidth = model.numKvHeads * model.headDim;
  switch (target) {
    case "q":
      return { in: D, out: qWidth };
    case "k":
    case "v":
      return { in: D, out: kvWidth };
    case "o":
      return { in: qWidth, out: D };
    case "gate":
    case "up":
      return { in: D, out: I };
    case "down":
      return { in: I, out: D };
  }
}

/** HF module path of a target inside layer `layer` (PEFT tensor names build on it). */
export function targetModule(layer: number, target: LoraTarget): string {
  const proj = `${
    target === "gate" || target === "up" || target === "down" ? "mlp" : "self_attn"
  }.${target}_proj`;
  return `model.layers.${layer}.${proj}`;
}
