/** Benchmark output: the printed table, the JSON file, and the ratio to a recorded baseline. */
import type { ModelBenchResult } from "./model_bench.ts";

export const RESULTS_DIR = new URL("../../../bench/results/", import.meta.url).pathname;
export const BASELINES_DIR = new URL("../../../bench/baselines/", import.meta.url).pathname;

export interface BaselineComparison {
  file: string;
  prefillRatio: number;
  decodeRatio: number;
}

function baselineName(r: ModelBenchResult): string {
  return `${r.name}-${r.backend}-${r.weightDtype}-p${r.promptTokens}-g${r.genTokens}.json`;
}

/** Ratios now/baseline for the same model, backend, dtype and sizes, if a baseline is recorded. */
export async function compareWithBaseline(r: ModelBenchResult): Promise<BaselineComparison | null> {
  const file = BASELINES_DIR + baselineName(r);
  try {
    const base = JSON.parse(await Deno.readTextFile(file)) as ModelBenchResult;
    return {
      file,
      prefillRatio: r.prefillTokensPerSecond / base.prefillTokensPerSecond,
      decodeRatio: r.decodeTokensPerSecond / base.decodeTokensPerSecond,
    };
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

export async function writeResult(r: ModelBenchResult): Promise<string> {
  await Deno.mkdir(RESULTS_DIR, { recursive: true });
  const file = `${RESULTS_DIR}${r.name}-${r.backend}-${r.weightDtype}-${
    r.date.replace(/[:.]/g, "-")
  }.json`;
  await Deno.writeTextFile(file, JSON.stringify(r, null, 2) + "\n");
  return file;
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);

/** On a software adapter the GPU is the CPU: the host's load says how contended the run was. */
export function loadLine(load: number[]): string {
  return `host load average ${load.map((l) => l.toFixed(2)).join(" ")} (1/5/15 min) ` +
    `on ${navigator.hardwareConcurrency} CPUs: other work slows a software GPU`;
}

export function printModelBench(r: ModelBenchResult, baseline: BaselineComparison | null): void {
  const lines = [
    `== ${r.name} (${r.weightDtype} weights) on ${r.backend}: ${r.adapter}${
      r.software ? " [software]" : ""
    }`,
    `prefill  ${r.promptTokens} tokens: ${r.prefillTokensPerSecond.toFixed(1)} tokens/s` +
    (baseline ? `   (x${baseline.prefillRatio.toFixed(2)} vs baseline)` : ""),
    `decode   ${r.genTokens} tokens: ${r.decodeTokensPerSecond.toFixed(1)} tokens/s` +
    (baseline ? `   (x${baseline.decodeRatio.toFixed(2)} vs baseline)` : ""),
    `weights read per token ${mib(r.weightBytesPerToken)} MiB -> ${
      r.weightBandwidthGBs.toFixed(2)
    } GB/s ` +
    `(${
      ((100 * r.weightBandwidthGBs) / r.copyBandwidthGBs).toFixed(1)
    }% of this device's copy bandwidth ` +
    `${r.copyBandwidthGBs.toFixed(2)} GB/s)`,
    `GPU memory: weights ${mib(r.memory.weightBytes)} MiB, KV ${mib(r.memory.kvBytes)} MiB ` +
    `(${r.memory.kvBytesPerToken} B/token), activations ${mib(r.memory.activationBytes)} MiB, ` +
    `peak ${mib(r.peakGpuBytes)} MiB`,
    ...(r.software && r.hostLoadAverage ? [loadLine(r.hostLoadAverage)] : []),
    "",
    "phase    kernel               ms/step      GB/s   GFLOP/s",
  ];
  for (const [phase, rows] of Object.entries(r.kernels)) {
    for (const k of rows) {
      lines.push(
        `${phase.padEnd(8)} ${k.kind.padEnd(18)} ${k.ms.toFixed(3).padStart(9)} ` +
          `${k.gbPerSecond.toFixed(2).padStart(9)} ${k.gflopPerSecond.toFixed(2).padStart(9)}`,
      );
    }
  }
  if (!baseline) {
    lines.push(`(no baseline recorded: copy the JSON to bench/baselines/${baselineName(r)})`);
  }
  console.log(lines.join("\n"));
}
