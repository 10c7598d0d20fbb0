/**
 * `mace bench`: prefill and decode speed, achieved weight bandwidth, peak GPU
 * memory and a per-kernel table, for random-weight models of real shapes
 * (default) or a given model. Prints a table, writes JSON to bench/results/,
 * and reports ratios against a recorded baseline (bench/baselines/) and against
 * the device's own copy bandwidth measured in the same run.
 */
import { backendFlag, numberFlag, parseFlags } from "../args.ts";
import { createGpuContext, type GpuContext } from "../../engine/gpu/context.ts";
import { openModel } from "../../engine/model/open_model.ts";
import { QWEN25_05B, randomModelSource, SMOLLM2_135M } from "../../engine/model/random_model.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import { InvalidRequestError } from "../../engine/errors.ts";
import { type ModelBenchResult, runModelBench } from "../bench/model_bench.ts";
import { compareWithBaseline, printModelBench, writeResult } from "../bench/report.ts";
import {
  BATCH_DEFAULTS,
  batchBenchCommand,
  describeBatchDefaults,
} from "../bench/batch_command.ts";
import { printTrainBench, runTrainBench, writeTrainResult } from "../bench/train_bench.ts";
import { parseLoraTargets } from "../../engine/lora/lora.ts";
import { LOOP_HELP, loopBenchCommand } from "../bench/loop_command.ts";

export const BENCH_HELP = `mace bench [--model DIR|FILE] [--preset smollm2-135m|qwen2.5-0.5b|all]
    [--prompt-tokens N] [--gen-tokens N] [--weights f32|f16] [--backend auto|wgpu|dawn] [--json]
  Without --model: random-weight models of real shapes (default all presets); prompt/generation
  default to 512/128 on a hardware GPU and 32/8 on a software one. With --model: 128/128.
mace bench --batch [--preset NAME (default smollm2-135m) | --model DIR] [--layers N]
    [--batch-sizes 1,4,16,64] [--prompt-tokens N] [--gen-tokens N] [--prefix-tokens N]
    [--requests N] [--rounds N] [--weights f32|f16] [--backend ...] [--json]
  Serving-path throughput: decode tokens/s at each number of concurrent sequences, KV bytes per
  token, and a shared-system-prompt workload with prefix sharing on and off. --layers cuts a
  preset's depth (real widths); each figure is the fastest of --rounds interleaved runs. Defaults:
    hardware GPU: ${describeBatchDefaults(BATCH_DEFAULTS.hardware)}
    software GPU: ${describeBatchDefaults(BATCH_DEFAULTS.software)}
mace bench --train [--preset NAME (default smollm2-135m)] [--layers N] [--prompt-tokens N]
    [--response-tokens N] [--steps N] [--rank R] [--targets q,v] [--layers-per-slice N]
  DPO training on a random-weight preset with LoRA (default r=8 on q,v): pairs/s, tokens/s, the
  time of each slice kind, the inference-prefill baseline of the same tokens, and GPU memory per
  pair at 256 and 512 tokens at full depth. Defaults: hardware GPU full depth, prompt 128 +
  responses 128 tokens, 5 steps; software GPU 2 layers, 32 + 32 tokens, 2 steps.
${LOOP_HELP}`;

export const PRESETS: Record<string, typeof SMOLLM2_135M> = {
  "smollm2-135m": SMOLLM2_135M,
  "qwen2.5-0.5b": QWEN25_05B,
};

export async function benchCommand(argv: string[]): Promise<void> {
  if (argv.includes("--loop")) return await loopBenchCommand(argv);
  const flags = parseFlags(argv, {
    model: { type: "string" },
    preset: { type: "string", default: "all" },
    "prompt-tokens": { type: "string" },
    "gen-tokens": { type: "string" },
    weights: { type: "string", default: "f32" },
    backend: { type: "string", default: "auto" },
    json: { type: "boolean", default: false },
    batch: { type: "boolean", default: false },
    layers: { type: "string" },
    "batch-sizes": { type: "string" },
    "prefix-tokens": { type: "string" },
    requests: { type: "string" },
    rounds: { type: "string" },
    train: { type: "boolean", default: false },
    "response-tokens": { type: "string" },
    steps: { type: "string" },
    rank: { type: "string" },
    targets: { type: "string" },
    "layers-per-slice": { type: "string" },
  }, "bench");
  const trainOnly = ["response-tokens", "steps", "rank", "targets", "layers-per-slice"] as const;
  if (!flags.train) {
    const misplaced = trainOnly.filter((f) => flags[f] !== undefined);
    if (misplaced.length) {
      throw new InvalidRequestError(`--${misplaced.join(", --")}: only with --train`);
    }
  }
  const batchOnly = ["batch-sizes", "prefix-tokens", "requests", "rounds"] as const;
  if (!flags.batch && !flags.train && flags.layers !== undefined) {
    throw new InvalidRequestError("--layers: only with --batch or --train");
  }
  if (!flags.batch) {
    const misplaced = batchOnly.filter((f) => flags[f] !== undefined);
    if (misplaced.length) {
      throw new InvalidRequestError(`--${misplaced.join(", --")}: only with --batch`);
    }
  }
  if (flags.weights !== "f32" && flags.weights !== "f16") {
    throw new InvalidRequestError(`--weights ${flags.weights}: expected f32 or f16`);
  }
  const ctx = await createGpuContext({ backend: backendFlag(flags.backend) });
  if (flags.train) {
    try {
      await trainBench(ctx, flags);
    } finally {
      ctx.destroy();
    }
    return;
  }
  if (flags.batch) {
    try {
      await batchBenchCommand(ctx, flags, PRESETS);
    } finally {
      ctx.destroy();
    }
    return;
  }
  const positive = (n: number) => Number.isInteger(n) && n >= 1;
  const sizes = (promptDefault: number, genDefault: number) => ({
    promptTokens: numberFlag(flags["prompt-tokens"], "prompt-tokens", promptDefault, positive),
    genTokens: numberFlag(flags["gen-tokens"], "gen-tokens", genDefault, positive),
  });

  const jobs: {
    name: string;
    source: () => Promise<ModelSource>;
    promptTokens: number;
    genTokens: number;
  }[] = [];
  if (flags.model) {
    const path = flags.model;
    jobs.push({
      name: path.replace(/\/+$/, "").split("/").pop()!,
      source: () => openModel(path),
      ...sizes(128, 128),
    });
  } else {
    const names = flags.preset === "all" ? Object.keys(PRESETS) : [flags.preset!];
    for (const name of names) {
      const spec = PRESETS[name];
      if (!spec) {
        throw new InvalidRequestError(
          `--preset ${name}: expected one of ${Object.keys(PRESETS).join(", ")}, all`,
        );
      }
      const [p, g] = ctx.isSoftware ? [32, 8] : [512, 128];
      jobs.push({ name, source: () => Promise.resolve(randomModelSource(spec)), ...sizes(p, g) });
    }
  }

  const results: ModelBenchResult[] = [];
  for (const job of jobs) {
    const result = await runModelBench(ctx, job.name, await job.source(), {
      promptTokens: job.promptTokens,
      genTokens: job.genTokens,
      weightDtype: flags.weights as "f32" | "f16",
    });
    const comparison = await compareWithBaseline(result);
    if (flags.json) console.log(JSON.stringify({ ...result, baseline: comparison }));
    else printModelBench(result, comparison);
    console.error(`wrote ${await writeResult(result)}`);
    results.push(result);
  }
  ctx.destroy();
}

async function trainBench(ctx: GpuContext, flags: Record<string, string | boolean | undefined>) {
  const positive = (n: number) => Number.isInteger(n) && n >= 1;
  const name = flags.preset === undefined || flags.preset === "all"
    ? "smollm2-135m"
    : String(flags.preset);
  const spec = PRESETS[name];
  if (!spec) {
    throw new InvalidRequestError(
      `--preset ${name}: expected one of ${Object.keys(PRESETS).join(", ")}`,
    );
  }
  const soft = ctx.isSoftware;
  const layers = Math.min(
    numberFlag(flags.layers, "layers", soft ? 2 : spec.numLayers, positive),
    spec.numLayers,
  );
  const result = await runTrainBench(
    ctx,
    name,
    randomModelSource({ ...spec, numLayers: layers }),
    () => randomModelSource(spec),
    {
      promptTokens: numberFlag(flags["prompt-tokens"], "prompt-tokens", soft ? 32 : 128, positive),
      responseTokens: numberFlag(
        flags["response-tokens"],
        "response-tokens",
        soft ? 32 : 128,
        positive,
      ),
      steps: numberFlag(flags.steps, "steps", soft ? 2 : 5, positive),
      layersPerSlice: numberFlag(flags["layers-per-slice"], "layers-per-slice", layers, positive),
      lora: {
        rank: numberFlag(flags.rank, "rank", 8, positive),
        alpha: 2 * numberFlag(flags.rank, "rank", 8, positive),
        targets: parseLoraTargets(String(flags.targets ?? "q,v").split(",")),
        dropout: 0,
      },
      weightDtype: flags.weights as "f32" | "f16",
    },
  );
  if (flags.json) console.log(JSON.stringify(result));
  else printTrainBench(result);
  console.error(`wrote ${await writeTrainResult(result)}`);
}
