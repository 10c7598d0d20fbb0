/**
 * `mace train`: DPO fine-tuning of a LoRA adapter on preference pairs, on the GPU; writes the
 * adapter in the PEFT layout. Prints one line (or JSON object) per optimizer step.
 */
import { backendFlag, DEFAULT_MODEL, numberFlag, parseFlags } from "../args.ts";
import { createGpuContext } from "../../engine/gpu/context.ts";
import { openModelWithTokenizer } from "../../engine/load.ts";
import { InvalidRequestError } from "../../engine/errors.ts";
import { uploadWeights } from "../../engine/model/gpu_weights.ts";
import { type LoraConfig, parseLoraTargets } from "../../engine/lora/lora.ts";
import { readPeftAdapter, writePeftAdapter } from "../../engine/lora/peft.ts";
import { type PreferenceFormat, readPreferencePairs } from "../../engine/training/preferences.ts";
import { tokenizePairs } from "../../engine/training/tokenize_pairs.ts";
import {
  DpoTrainer,
  type StepStats,
  type TrainingPair,
} from "../../engine/training/dpo_trainer.ts";
import { rng, shuffled } from "../../engine/training/seeded_random.ts";
import type { Tokenizer } from "../../engine/tokenizer/tokenizer.ts";

export const TRAIN_HELP =
  `mace train --pairs FILE [--model DIR] [--format auto|hh|ultrafeedback|chat|llamafactory]
    [--steps N] [--batch N] [--lr X] [--beta B] [--rank R] [--alpha A] [--targets q,v,...]
    [--optimizer adamw|sgd] [--weight-decay X] [--max-grad-norm X] [--max-length N]
    [--max-prompt-length N] [--init-adapter DIR] [--out DIR] [--eval-pairs FILE] [--seed S]
    [--lora-dropout P] [--layers-per-slice N] [--backend auto|wgpu|dawn] [--weights f32|f16]
    [--json]
  DPO-trains a LoRA adapter (base frozen) on preference pairs and writes it in the PEFT layout
  (adapter_config.json + adapter_model.safetensors) to --out (default ./adapter).
  Defaults: 1 epoch of steps, batch 4 pairs per step, lr 5e-4 (adamw) or 1e-2 (sgd), beta 0.1,
  rank 8, alpha 16, targets q,v, max grad norm 1.0 (0 = no clipping), max length 256 tokens,
  max prompt length 128, LoRA dropout 0. Bad pairs are reported with their line and skipped.`;

export async function trainCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    model: { type: "string", default: DEFAULT_MODEL },
    tokenizer: { type: "string" },
    pairs: { type: "string" },
    format: { type: "string", default: "auto" },
    steps: { type: "string" },
    batch: { type: "string" },
    lr: { type: "string" },
    beta: { type: "string" },
    rank: { type: "string" },
    alpha: { type: "string" },
    targets: { type: "string", default: "q,v" },
    optimizer: { type: "string", default: "adamw" },
    "weight-decay": { type: "string" },
    "max-grad-norm": { type: "string" },
    "max-length": { type: "string" },
    "max-prompt-length": { type: "string" },
    "init-adapter": { type: "string" },
    out: { type: "string", default: "adapter" },
    "eval-pairs": { type: "string" },
    seed: { type: "string" },
    "layers-per-slice": { type: "string" },
    "lora-dropout": { type: "string" },
    backend: { type: "string", default: "auto" },
    weights: { type: "string", default: "f32" },
    json: { type: "boolean", default: false },
  }, "train");
  if (flags.pairs === undefined) throw new InvalidRequestError("train: --pairs FILE is required");
  const format = flags.format as PreferenceFormat;
  if (!["auto", "hh", "ultrafeedback", "chat", "llamafactory"].includes(format)) {
    throw new InvalidRequestError(
      `--format ${format}: expected auto, hh, ultrafeedback, chat or llamafactory`,
    );
  }
  const optimizer = flags.optimizer as "adamw" | "sgd";
  if (optimizer !== "adamw" && optimizer !== "sgd") {
    throw new InvalidRequestError(`--optimizer ${optimizer}: expected adamw or sgd`);
  }
  const backend = backendFlag(flags.backend);
  if (flags.weights !== "f32" && flags.weights !== "f16") {
    throw new InvalidRequestError(`--weights ${flags.weights}: expected f32 or f16`);
  }
  const positiveInt = (n: number) => Number.isInteger(n) && n >= 1;
  const targets = parseLoraTargets(flags.targets!.split(","));
  const maxLength = numberFlag(
    flags["max-length"],
    "max-length",
    256,
    (n) => Number.isInteger(n) && n >= 2,
  );
  const maxPromptLength = numberFlag(
    flags["max-prompt-length"],
    "max-prompt-length",
    Math.min(128, maxLength - 1),
    positiveInt,
  );
  const batch = numberFlag(flags.batch, "batch", 4, positiveInt);
  const seed = numberFlag(flags.seed, "seed", 0, (n) => Number.isInteger(n) && n >= 0);
  const json = flags.json!;
  const log = (line: string) => console.error(line);

  const { source, tokenizer } = await openModelWithTokenizer(flags.model!, flags.tokenizer);
  const train = await loadPairs(flags.pairs, format, tokenizer, maxLength, maxPromptLength, log);
  const held = flags["eval-pairs"] === undefined
    ? []
    : await loadPairs(flags["eval-pairs"], format, tokenizer, maxLength, maxPromptLength, log);

  let lora: LoraConfig = {
    rank: numberFlag(flags.rank, "rank", 8, positiveInt),
    alpha: numberFlag(flags.alpha, "alpha", 16, (n) => n > 0),
    targets,
    dropout: 0,
  };
  const dropout = numberFlag(flags["lora-dropout"], "lora-dropout", 0, (n) => n >= 0 && n < 1);
  const init = flags["init-adapter"] === undefined
    ? null
    : await readPeftAdapter(flags["init-adapter"], source.config);
  if (init) {
    if (flags.rank !== undefined || flags.alpha !== undefined || argv.includes("--targets")) {
      log(
        "train: --init-adapter given: its rank, alpha and targets are used " +
          "(--rank/--alpha/--targets ignored)",
      );
    }
    lora = { ...init.config };
  }
  lora = { ...lora, dropout };

  const ctx = await createGpuContext({ backend });
  const weights = await uploadWeights(ctx, source, flags.weights as "f32" | "f16");
  const trainer = new DpoTrainer(ctx, source.config, weights, lora, {
    beta: numberFlag(flags.beta, "beta", 0.1, (n) => n > 0),
    learningRate: numberFlag(flags.lr, "lr", optimizer === "sgd" ? 1e-2 : 5e-4, (n) => n >= 0),
    optimizer,
    weightDecay: numberFlag(flags["weight-decay"], "weight-decay", 0, (n) => n >= 0),
    maxGradNorm: numberFlag(flags["max-grad-norm"], "max-grad-norm", 1, (n) => n >= 0),
    maxPairsPerStep: batch,
    maxLength,
  });
  try {
    if (init) trainer.load(init, seed);
    else trainer.initialize(seed);
    const steps = numberFlag(flags.steps, "steps", Math.ceil(train.length / batch), positiveInt);
    const layersPerSlice = numberFlag(
      flags["layers-per-slice"],
      "layers-per-slice",
      source.config.numLayers,
      positiveInt,
    );
    const mem = trainer.memory;
    log(
      `train: ${train.length} pairs, ${steps} steps of ${batch}, LoRA r=${lora.rank} ` +
        `alpha=${lora.alpha} ` +
        `on ${lora.targets.join(",")}, ${optimizer}; GPU memory: adapter+optimizer ` +
        `${(mem.adapterBytes / 2 ** 20).toFixed(2)} MiB, activations ${
          (mem.activationBytes / 2 ** 20).toFixed(2)
        } MiB ` +
        `(${ctx.backend}: ${ctx.adapterDescription})`,
    );
    const report = (kind: string, stats: StepStats, extra: Record<string, unknown> = {}) => {
      if (json) console.log(JSON.stringify({ kind, ...statsJson(stats), ...extra }));
      else {
        console.log(
          `${kind} ${String(stats.step).padStart(4)}  loss ${stats.loss.toFixed(4)}  acc ${
            stats.rewardAccuracy.toFixed(2)
          }  ` +
            `margin ${stats.rewardMargin.toFixed(4)}  logp chosen ${stats.chosenLogp.toFixed(2)} ` +
            `rejected ${stats.rejectedLogp.toFixed(2)}` +
            Object.entries(extra).map(([k, v]) => `  ${k} ${v}`).join(""),
        );
      }
    };
    if (held.length > 0) report("eval", await trainer.evaluate(held));
    const order = pairOrder(train.length, rng(seed));
    const started = performance.now();
    let tokens = 0;
    for (let step = 0; step < steps; step++) {
      const pairs = Array.from({ length: batch }, (_, i) => train[order(step * batch + i)]);
      const stats = await trainer.step(pairs, layersPerSlice);
      tokens += pairs.reduce(
        (n, p) => n + 2 * p.prompt.length + p.chosen.length + p.rejected.length,
        0,
      );
      const seconds = (performance.now() - started) / 1000;
      report("step", stats, {
        "pairs/s": (((step + 1) * batch) / seconds).toFixed(2),
        "tokens/s": (tokens / seconds).toFixed(1),
      });
    }
    if (held.length > 0) report("eval", await trainer.evaluate(held));
    const adapter = await trainer.params.read();
    await writePeftAdapter(flags.out!, adapter, { baseModel: flags.model! });
    log(`train: wrote ${flags.out}/adapter_config.json and adapter_model.safetensors`);
  } finally {
    trainer.destroy();
    ctx.destroy();
  }
}

/** Reads, tokenizes and reports (skipped pairs with their line) a preference file. */
async function loadPairs(
  path: string,
  format: PreferenceFormat,
  tokenizer: Tokenizer,
  maxLength: number,
  maxPromptLength: number,
  log: (line: string) => void,
): Promise<TrainingPair[]> {
  const read = await readPreferencePairs(path, format);
  const tokenized = tokenizePairs(tokenizer, read.pairs, { maxLength, maxPromptLength });
  const skipped = [...read.skipped, ...tokenized.skipped].sort((a, b) => a.line - b.line);
  for (const s of skipped) log(`${path}:${s.line}: skipped: ${s.reason}`);
  if (tokenized.pairs.length === 0) {
    throw new InvalidRequestError(
      `${path}: no usable preference pairs (${skipped.length} skipped)`,
    );
  }
  log(`${path}: ${tokenized.pairs.length} pairs, ${skipped.length} skipped`);
  return tokenized.pairs;
}

/** Epoch-wise shuffled pair indices: position i -> pair index, reshuffled every epoch. */
function pairOrder(count: number, next: () => number): (i: number) => number {
  const epochs: number[][] = [];
  return (i) => {
    const epoch = Math.floor(i / count);
    while (epochs.length <= epoch) {
      epochs.push(shuffled(Array.from({ length: count }, (_, j) => j), next));
    }
    return epochs[epoch][i % count];
  };
}

function statsJson(s: StepStats) {
  return {
    step: s.step,
    pairs: s.pairs,
    loss: s.loss,
    rewardAccuracy: s.rewardAccuracy,
    rewardMargin: s.rewardMargin,
    chosenLogp: s.chosenLogp,
    rejectedLogp: s.rejectedLogp,
  };
}
