/**
 * `mace bench --train`: DPO training speed on a random-weight model of a real shape: pairs/s and
 * tokens/s of whole optimizer steps, GPU time of each slice kind, and the trainer's GPU memory
 * per pair at 256 and 512 tokens (full-depth model). Two baselines on the same tokens, in the
 * same process: inference prefill of the pair's two sequences (logits of the last token only),
 * and scoring them (the reference slice: a forward with logits for every response token, which
 * is what DPO's forward must do). step / scoring says what a DPO step costs in forward passes:
 * about 3 with stored activations, about 4 with this trainer's per-layer recompute.
 */
import type { GpuContext } from "../../engine/gpu/context.ts";
import { uploadWeights } from "../../engine/model/gpu_weights.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import type { LoraConfig } from "../../engine/lora/lora.ts";
import { ModelRunner } from "../../engine/runner/model_runner.ts";
import { GREEDY } from "../../engine/step.ts";
import {
  DpoTrainer,
  type TrainingPair,
  type TrainingSlice,
} from "../../engine/training/dpo_trainer.ts";
import { median, promptIds } from "./measure.ts";
import { loadLine, RESULTS_DIR } from "./report.ts";

export interface TrainBenchOptions {
  /** Prompt and each response, in tokens (a pair's sequences are prompt + response). */
  promptTokens: number;
  responseTokens: number;
  steps: number;
  layersPerSlice: number;
  lora: LoraConfig;
  weightDtype: "f32" | "f16";
}

export interface TrainBenchResult {
  name: string;
  date: string;
  backend: string;
  adapter: string;
  software: boolean;
  layers: number;
  options: TrainBenchOptions;
  /** Median over the timed steps (one pair per step). */
  stepMs: number;
  pairsPerSecond: number;
  /** Tokens through the policy per second: both sequences of each pair. */
  tokensPerSecond: number;
  /**
   * Median GPU+submit time of each slice kind, ms (reference, forward, backward: one slice of
   * layersPerSlice layers).
   */
  sliceMs: Record<TrainingSlice["kind"], number>;
  /** Inference baseline: one prefill of the pair's two sequences, ms (median of 3). */
  prefillMs: number;
  stepOverPrefill: number;
  /** Step time / reference-slice time (a scoring forward of the same two sequences). */
  stepOverScoring: number;
  /** Trainer GPU bytes at the full depth for 256 and 512 tokens per sequence. */
  memory: { tokens: number; adapterBytes: number; activationBytes: number }[];
  hostLoad: number[];
}

async function timed(ctx: GpuContext, run: () => Promise<void>): Promise<number> {
  const t0 = performance.now();
  await run();
  await ctx.device.queue.onSubmittedWorkDone();
  return performance.now() - t0;
}

export async function runTrainBench(
  ctx: GpuContext,
  name: string,
  source: ModelSource,
  fullDepth: () => ModelSource,
  options: TrainBenchOptions,
): Promise<TrainBenchResult> {
  const c = source.config;
  const weights = await uploadWeights(ctx, source, options.weightDtype);
  const length = options.promptTokens + options.responseTokens;
  const pair = (seed: number): TrainingPair => ({
    prompt: promptIds(options.promptTokens, c.vocabSize, seed),
    chosen: promptIds(options.responseTokens, c.vocabSize, seed + 1),
    rejected: promptIds(options.responseTokens, c.vocabSize, seed + 2),
  });
  const trainer = new DpoTrainer(ctx, c, weights, options.lora, {
    maxLength: length,
    maxPairsPerStep: 1,
  });
  trainer.initialize(0);
  const slices: Record<string, number[]> = {
    reference: [],
    forward: [],
    backward: [],
    optimizer: [],
  };
  const steps: number[] = [];
  /** Per step: its reference slices together (a scoring forward of the pair). */
  const scoring: number[] = [];
  // Step 0 compiles pipelines and is not timed.
  for (let step = 0; step <= options.steps; step++) {
    const p = pair(100 + step);
    let total = 0, reference = 0;
    for (const slice of trainer.planStep([p], options.layersPerSlice)) {
      const ms = await timed(ctx, () => trainer.runSlice(slice));
      if (slice.kind !== "reference") total += ms;
      else reference += ms;
      if (step > 0) slices[slice.kind].push(ms);
    }
    if (step > 0) {
      steps.push(total);
      scoring.push(reference);
    }
  }
  trainer.destroy();

  // Baseline: inference prefill of the same two sequences (one step, both sampled at the end).
  const runner = await ModelRunner.create(ctx, source, {
    weightDtype: options.weightDtype,
    maxSeqs: 2,
    maxTokens: 2 * length,
    maxContext: length,
  });
  const blocks = Math.ceil(length / runner.capacity.blockSize);
  const p = pair(7);
  const plan = {
    sequences: [p.chosen, p.rejected].map((response, i) => ({
      seqId: i,
      tokens: [...p.prompt, ...response],
      startPosition: 0,
      blockTable: Array.from({ length: blocks }, (_, b) => i * blocks + b),
      sample: true,
      sampling: GREEDY,
    })),
  };
  await runner.execute(plan);
  const prefills: number[] = [];
  for (let i = 0; i < 3; i++) {
    prefills.push(await timed(ctx, async () => void await runner.execute(plan)));
  }
  runner.destroy();

  // Memory at the full depth: allocate (not run) a trainer per length.
  const full = fullDepth();
  const fullWeights = await uploadWeights(ctx, full, options.weightDtype);
  const memory = [];
  for (const tokens of [256, 512]) {
    const t = new DpoTrainer(ctx, full.config, fullWeights, options.lora, {
      maxLength: tokens,
      maxPairsPerStep: 1,
    });
    memory.push({ tokens, ...t.memory });
    t.destroy();
  }

  const stepMs = median(steps);
  const prefillMs = median(prefills);
  return {
    name,
    date: new Date().toISOString(),
    backend: ctx.backend,
    adapter: ctx.adapterDescription,
    software: ctx.isSoftware,
    layers: c.numLayers,
    options,
    stepMs,
    pairsPerSecond: 1000 / stepMs,
    tokensPerSecond: (2 * length * 1000) / stepMs,
    sliceMs: {
      reference: median(slices.reference),
      forward: median(slices.forward),
      backward: median(slices.backward),
      optimizer: median(slices.optimizer),
    },
    prefillMs,
    stepOverPrefill: stepMs / prefillMs,
    stepOverScoring: stepMs / median(scoring),
    memory,
    hostLoad: Deno.loadavg(),
  };
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);

export function printTrainBench(r: TrainBenchResult): void {
  const o = r.options;
  console.log([
    `== DPO training: ${r.name} (${r.layers} layers, ${o.weightDtype}) on ${r.backend}: ` +
    `${r.adapter}${r.software ? " [software]" : ""}`,
    `LoRA r=${o.lora.rank} alpha=${o.lora.alpha} on ${
      o.lora.targets.join(",")
    }; pair = prompt ${o.promptTokens} + ` +
    `responses ${o.responseTokens} tokens; ${o.steps} timed steps of 1 pair`,
    `step ${r.stepMs.toFixed(1)} ms: ${r.pairsPerSecond.toFixed(3)} pairs/s, ${
      r.tokensPerSecond.toFixed(1)
    } tokens/s`,
    `slices (median ms per ${o.layersPerSlice} layers): reference ${
      r.sliceMs.reference.toFixed(1)
    } (once per ` +
    `pair, cached), forward ${r.sliceMs.forward.toFixed(1)}, backward ${
      r.sliceMs.backward.toFixed(1)
    } (the last ` +
    `forward and the first backward also run the head), optimizer ${
      r.sliceMs.optimizer.toFixed(1)
    }`,
    `baselines on the same two sequences: a DPO step costs x${
      r.stepOverScoring.toFixed(2)
    } of scoring them ` +
    `(the reference slice) and x${r.stepOverPrefill.toFixed(2)} of an inference prefill ` +
    `(${r.prefillMs.toFixed(1)} ms, last-token logits only)`,
    ...r.memory.map((m) =>
      `GPU memory per pair at ${m.tokens} tokens (full depth): activations + checkpoints ${
        mib(m.activationBytes)
      } MiB, ` +
      `adapter + grads + AdamW ${mib(m.adapterBytes)} MiB`
    ),
    loadLine(r.hostLoad),
  ].join("\n"));
}

export async function writeTrainResult(r: TrainBenchResult): Promise<string> {
  await Deno.mkdir(RESULTS_DIR, { recursive: true });
  const file = `${RESULTS_DIR}train-${r.name}-${r.backend}-l${r.layers}-${
    r.date.replace(/[:.]/g, "-")
  }.json`;
  await Deno.writeTextFile(file, JSON.stringify(r, null, 2) + "\n");
  return file;
}
