/**
 * `mace bench --batch` output: the printed tables, the JSON file, the ratio to a recorded
 * baseline.
 */
import type { BatchBenchResult } from "./batch_bench.ts";
import { BASELINES_DIR, loadLine, RESULTS_DIR } from "./report.ts";

export interface BatchBaselineComparison {
  file: string;
  /** Decode tokens/s now / baseline, per batch size present in both. */
  decodeRatios: { batch: number; ratio: number }[];
  /** Prefill time of the shared-prefix workload, baseline / now (> 1 = faster now). */
  prefixPrefillSpeedRatio: { on: number; off: number };
}

/** Same scheme as report.ts: everything that changes the numbers is in the name. */
export function batchBaselineName(r: BatchBenchResult): string {
  const s = r.sizes;
  return `batch-${r.name}-${r.backend}-${r.weightDtype}-l${r.layers}-b${s.batchSizes.join("_")}` +
    `-p${s.promptTokens}-g${s.genTokens}-pre${s.prefixTokens}-r${s.requests}.json`;
}

export async function compareBatchWithBaseline(
  r: BatchBenchResult,
): Promise<BatchBaselineComparison | null> {
  const file = BASELINES_DIR + batchBaselineName(r);
  let base: BatchBenchResult;
  try {
    base = JSON.parse(await Deno.readTextFile(file)) as BatchBenchResult;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
  const decodeRatios = r.decode.runs.flatMap((run) => {
    const b = base.decode.runs.find((x) => x.batch === run.batch);
    return b ? [{ batch: run.batch, ratio: run.tokensPerSecond / b.tokensPerSecond }] : [];
  });
  return {
    file,
    decodeRatios,
    prefixPrefillSpeedRatio: {
      on: base.prefix.on.prefillMs / r.prefix.on.prefillMs,
      off: base.prefix.off.prefillMs / r.prefix.off.prefillMs,
    },
  };
}

export async function writeBatchResult(r: BatchBenchResult): Promise<string> {
  await Deno.mkdir(RESULTS_DIR, { recursive: true });
  const file = `${RESULTS_DIR}batch-${r.name}-${r.backend}-${r.weightDtype}-l${r.layers}-` +
    `${r.date.replace(/[:.]/g, "-")}.json`;
  await Deno.writeTextFile(file, JSON.stringify(r, null, 2) + "\n");
  return file;
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(2);
const x = (ratio: number) => `x${ratio.toFixed(2)}`;

/** The WARNING line when decode throughput does not rise with batch size, else null. */
export function batchGrowthWarning(r: BatchBenchResult): string | null {
  if (r.decode.grows) return null;
  const rates = r.decode.runs.map((run) => `${run.batch}: ${run.tokensPerSecond.toFixed(2)}`);
  return `WARNING: decode throughput does not grow with batch size (tokens/s ${rates.join(", ")})`;
}

export function printBatchBench(
  r: BatchBenchResult,
  baseline: BatchBaselineComparison | null,
): void {
  const s = r.sizes;
  const lines = [
    `== batch: ${r.name} (${r.weightDtype} weights, ${r.layers} layers) on ${r.backend}: ` +
    `${r.adapter}${r.software ? " [software]" : ""}`,
    ...(r.software ? [loadLine(r.hostLoadAverage)] : []),
    "",
    `decode: ${s.promptTokens}-token prompt + ${s.genTokens} generated tokens per request, ` +
    `all requests at once; fastest of ${s.rounds ?? 1} rounds`,
    "  batch   tokens/s  vs batch 1   ms/step  prefill steps" + (baseline ? "  vs baseline" : ""),
  ];
  for (const run of r.decode.runs) {
    const ratio = baseline?.decodeRatios.find((d) => d.batch === run.batch);
    lines.push(
      `  ${String(run.batch).padStart(5)} ${run.tokensPerSecond.toFixed(2).padStart(10)} ` +
        `${(run.ratioToBatch1 === null ? "-" : x(run.ratioToBatch1)).padStart(11)} ` +
        `${run.msPerDecodeStep.toFixed(1).padStart(9)} ${String(run.prefillSteps).padStart(14)}` +
        (baseline ? `  ${ratio ? x(ratio.ratio) : "-"}`.padStart(13) : ""),
    );
  }
  const warning = batchGrowthWarning(r);
  if (warning) lines.push(warning);
  lines.push(
    "",
    `KV cache: ${r.kv.bytesPerToken} B/token (${r.layers} layers, K and V); pool of the decode ` +
      `engine ${r.kv.poolBlocks} blocks x ${r.kv.blockSize} = ${r.kv.poolTokens} tokens, ` +
      `${mib(r.kv.poolBytes)} MiB`,
    "",
    `shared prefix: ${s.prefixTokens}-token prefix + ${s.suffixTokens} distinct tokens, ` +
      `${s.requests} requests (1, then ${s.requests - 1} after its first token), ` +
      `${s.genTokens} generated each; fastest of ${s.rounds ?? 1} rounds`,
    "                                 sharing on  sharing off    off/on",
  );
  const row = (label: string, on: number, off: number, digits = 0, ratio = true) => {
    const cells = `${on.toFixed(digits).padStart(10)} ${off.toFixed(digits).padStart(12)}`;
    lines.push(
      `  ${label.padEnd(30)} ${cells} ${(ratio && on > 0 ? x(off / on) : "-").padStart(9)}`,
    );
  };
  const { on, off } = r.prefix;
  row("prefill ms (all first tokens)", on.prefillMs, off.prefillMs);
  row("  of which after request 0", on.restPrefillMs, off.restPrefillMs);
  row("peak KV blocks in use", on.peakUsedBlocks, off.peakUsedBlocks);
  row("peak KV MiB in use", on.peakUsedKvBytes / 2 ** 20, off.peakUsedKvBytes / 2 ** 20, 2);
  row("prefill tokens computed", on.prefillTokensComputed, off.prefillTokensComputed);
  row("prefix-cache hit tokens", on.prefixHitTokens, off.prefixHitTokens, 0, false);
  if (baseline) {
    lines.push(
      `shared-prefix prefill vs baseline: sharing on ${x(baseline.prefixPrefillSpeedRatio.on)}, ` +
        `off ${x(baseline.prefixPrefillSpeedRatio.off)} (> 1 = faster now)`,
    );
  } else {
    lines.push(`(no baseline recorded: copy the JSON to bench/baselines/${batchBaselineName(r)})`);
  }
  console.log(lines.join("\n"));
}
