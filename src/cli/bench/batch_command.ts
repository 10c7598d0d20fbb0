/**
 * `mace bench --batch` wiring: flags and defaults to BatchBenchOptions, the model to bench,
 * then run, print, write JSON and compare with a baseline. The measuring is in batch_bench.ts.
 */
import { numberFlag } from "../args.ts";
import type { GpuContext } from "../../engine/gpu/context.ts";
import { openModel } from "../../engine/model/open_model.ts";
import { randomModelSource, type RandomModelSpec } from "../../engine/model/random_model.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import { InvalidRequestError } from "../../engine/errors.ts";
import { runBatchBench } from "./batch_bench.ts";
import {
  batchGrowthWarning,
  compareBatchWithBaseline,
  printBatchBench,
  writeBatchResult,
} from "./batch_report.ts";

interface BatchDefaults {
  /** null: the model's own depth. */
  layers: number | null;
  batchSizes: number[];
  promptTokens: number;
  genTokens: number;
  prefixTokens: number;
  requests: number;
  rounds: number;
}

/**
 * Hardware: the real model and workload. Software (lavapipe, ~1 GFLOP/s): real widths but two
 * layers and short runs, so the whole bench takes a few minutes on two CPU cores; the batch
 * sizes stay, since how throughput scales with them is the point.
 */
export const BATCH_DEFAULTS: { hardware: BatchDefaults; software: BatchDefaults } = {
  hardware: {
    layers: null,
    batchSizes: [1, 4, 16, 64],
    promptTokens: 8,
    genTokens: 128,
    prefixTokens: 256,
    requests: 32,
    rounds: 2,
  },
  software: {
    layers: 2,
    batchSizes: [1, 4, 16, 64],
    promptTokens: 8,
    genTokens: 8,
    prefixTokens: 64,
    requests: 8,
    rounds: 2,
  },
};

export function describeBatchDefaults(d: BatchDefaults): string {
  return `${d.layers === null ? "all" : d.layers} layers, batch sizes ${d.batchSizes.join(",")}, ` +
    `prompt ${d.promptTokens}, gen ${d.genTokens}, prefix ${d.prefixTokens}, ` +
    `${d.requests} requests, ${d.rounds} rounds`;
}

type Flags = Record<string, string | boolean | undefined>;

const positive = (n: number) => Number.isInteger(n) && n >= 1;

function batchSizesFlag(value: unknown, fallback: number[]): number[] {
  if (value === undefined) return fallback;
  const sizes = String(value).split(",").map((v) => Number(v.trim()));
  if (sizes.length === 0 || !sizes.every(positive) || new Set(sizes).size !== sizes.length) {
    throw new InvalidRequestError(
      `--batch-sizes ${String(value)}: expected distinct positive integers, e.g. 1,4,16,64`,
    );
  }
  return sizes;
}

export async function batchBenchCommand(
  ctx: GpuContext,
  flags: Flags,
  presets: Record<string, RandomModelSpec>,
): Promise<void> {
  if (flags.weights !== "f32" && flags.weights !== "f16") {
    throw new InvalidRequestError(`--weights ${flags.weights}: expected f32 or f16`);
  }
  const defaults = ctx.isSoftware ? BATCH_DEFAULTS.software : BATCH_DEFAULTS.hardware;
  let name: string, source: ModelSource;
  if (flags.model) {
    if (flags.layers !== undefined) {
      throw new InvalidRequestError("--layers applies to --preset models only");
    }
    const path = String(flags.model);
    name = path.replace(/\/+$/, "").split("/").pop()!;
    source = await openModel(path);
  } else {
    name = flags.preset === undefined || flags.preset === "all"
      ? "smollm2-135m"
      : String(flags.preset);
    const spec = presets[name];
    if (!spec) {
      throw new InvalidRequestError(
        `--preset ${name}: expected one of ${Object.keys(presets).join(", ")}`,
      );
    }
    const layers = numberFlag(flags.layers, "layers", defaults.layers ?? spec.numLayers, positive);
    // Same widths, fewer layers: per-layer costs and the batch scaling stay those of the model.
    source = randomModelSource({ ...spec, numLayers: Math.min(layers, spec.numLayers) });
  }
  const options = {
    batchSizes: batchSizesFlag(flags["batch-sizes"], defaults.batchSizes),
    promptTokens: numberFlag(
      flags["prompt-tokens"],
      "prompt-tokens",
      defaults.promptTokens,
      positive,
    ),
    genTokens: numberFlag(
      flags["gen-tokens"],
      "gen-tokens",
      defaults.genTokens,
      (n) => positive(n) && n >= 2,
    ),
    prefixTokens: numberFlag(
      flags["prefix-tokens"],
      "prefix-tokens",
      defaults.prefixTokens,
      positive,
    ),
    requests: numberFlag(
      flags.requests,
      "requests",
      defaults.requests,
      (n) => positive(n) && n >= 2,
    ),
    rounds: numberFlag(flags.rounds, "rounds", defaults.rounds, positive),
    weightDtype: flags.weights as "f32" | "f16",
  };
  const used = describeBatchDefaults({ ...options, layers: source.config.numLayers });
  console.error(
    `bench --batch: ${name}, ${used} ` +
      `(${ctx.isSoftware ? "software" : "hardware"} defaults where no flag is given)`,
  );
  const result = await runBatchBench(ctx, name, source, options, (line) => console.error(line));
  const comparison = await compareBatchWithBaseline(result);
  if (flags.json) {
    console.log(JSON.stringify({ ...result, baseline: comparison }));
    const warning = batchGrowthWarning(result);
    if (warning) console.error(warning);
  } else {
    printBatchBench(result, comparison);
  }
  console.error(`wrote ${await writeBatchResult(result)}`);
}
