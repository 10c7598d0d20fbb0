/**
 * `mace bench --loop` wiring: flags, a fresh engine per run (policy mace, so DPO slices are
 * co-scheduled with the decodes) at each pipeline depth, rounds interleaved so a slow moment of a
 * shared machine hits every depth alike, the fastest run per depth kept; a table with ratios
 * against depth 1, and the JSON in bench/results/.
 */
import { backendFlag, numberFlag, parseFlags } from "../args.ts";
import { createGpuContext } from "../../engine/gpu/context.ts";
import { InvalidRequestError } from "../../engine/errors.ts";
import { openModel } from "../../engine/model/open_model.ts";
import { BUNDLED_MODEL } from "../../host/defaults.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import { type LoopRun, type LoopWorkload, runLoopWorkload } from "./loop_bench.ts";
import { loadLine, RESULTS_DIR } from "./report.ts";

export const LOOP_HELP =
  `mace bench --loop [--model DIR] [--backend auto|wgpu|dawn] [--depths 1,2,3]
    [--requests N] [--prompt-tokens N] [--gen-tokens N] [--pairs N] [--rounds N] [--json]
  The one engine loop with feedback flowing: N concurrent requests (default 16 x 8-token prompts
  x 256 tokens) and --pairs DPO pairs (default 8) under the mace policy, at each pipeline depth;
  decode tokens/s and its ratio against depth 1 (one iteration in flight).`;

export async function loopBenchCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv.filter((a) => a !== "--loop"), {
    model: { type: "string", default: BUNDLED_MODEL },
    backend: { type: "string", default: "auto" },
    depths: { type: "string", default: "1,2,3" },
    requests: { type: "string" },
    "prompt-tokens": { type: "string" },
    "gen-tokens": { type: "string" },
    pairs: { type: "string" },
    rounds: { type: "string" },
    json: { type: "boolean", default: false },
  }, "bench --loop");
  const positive = (n: number) => Number.isInteger(n) && n >= 1;
  const depths = String(flags.depths).split(",").map(Number);
  if (depths.length === 0 || !depths.every(positive) || !depths.includes(1)) {
    throw new InvalidRequestError(
      `--depths ${flags.depths}: expected positive integers including 1 (the baseline), e.g. 1,3`,
    );
  }
  const workload: LoopWorkload = {
    requests: numberFlag(flags.requests, "requests", 16, positive),
    promptTokens: numberFlag(flags["prompt-tokens"], "prompt-tokens", 8, positive),
    genTokens: numberFlag(flags["gen-tokens"], "gen-tokens", 256, positive),
    pairs: numberFlag(flags.pairs, "pairs", 8, (n) => Number.isInteger(n) && n >= 0),
    pairPromptTokens: 16,
    pairResponseTokens: 24,
  };
  const rounds = numberFlag(flags.rounds, "rounds", 2, positive);
  const ctx = await createGpuContext({ backend: backendFlag(flags.backend) });
  const source = await openModel(flags.model!);
  const name = flags.model!.replace(/\/+$/, "").split("/").pop()!;
  const best = new Map<number, LoopRun>();
  try {
    for (let round = 1; round <= rounds; round++) {
      for (const depth of depths) {
        const engine = await MaceEngine.open(ctx, source, {
          policy: "mace",
          serving: { pipelineDepth: depth },
          finetune: { pairsPerStep: 2, publishEvery: 1 },
        }, name);
        let run: LoopRun;
        try {
          run = await runLoopWorkload(engine, workload, depth);
        } finally {
          await engine.close();
        }
        console.error(
          `depth ${depth}, round ${round}/${rounds}: ${run.decodeTokensPerSecond.toFixed(1)} ` +
            `decode tokens/s, ${run.pairsTrained} pairs trained`,
        );
        const prior = best.get(depth);
        if (!prior || run.decodeTokensPerSecond > prior.decodeTokensPerSecond) best.set(depth, run);
      }
    }
  } finally {
    ctx.destroy();
  }
  const base = best.get(1)!;
  const runs = depths.map((d) => best.get(d)!);
  const result = {
    name,
    date: new Date().toISOString(),
    backend: ctx.backend,
    adapter: ctx.adapterDescription,
    software: ctx.isSoftware,
    hostLoadAverage: Deno.loadavg(),
    workload,
    rounds,
    runs: runs.map((r) => ({
      ...r,
      ratioToDepth1: r.decodeTokensPerSecond / base.decodeTokensPerSecond,
    })),
  };
  await Deno.mkdir(RESULTS_DIR, { recursive: true });
  const file = `${RESULTS_DIR}loop-${name}-${ctx.backend}-${
    result.date.replace(/[:.]/g, "-")
  }.json`;
  await Deno.writeTextFile(file, JSON.stringify(result, null, 2) + "\n");
  if (flags.json) {
    console.log(JSON.stringify(result));
    return;
  }
  console.log(`== loop: ${name} on ${ctx.backend}: ${ctx.adapterDescription}`);
  if (ctx.isSoftware) console.log(loadLine(result.hostLoadAverage));
  console.log(
    `${workload.requests} requests x (${workload.promptTokens}-token prompt + ` +
      `${workload.genTokens} tokens), ${workload.pairs} feedback pairs, policy mace; ` +
      `fastest of ${rounds} rounds`,
  );
  console.log("  depth  decode tok/s  vs depth 1  DPO slices  pairs trained  cost-model error");
  for (const r of result.runs) {
    const error = r.predictionError === null ? "-" : `${(100 * r.predictionError).toFixed(1)}%`;
    const cells = [
      String(r.depth).padStart(5),
      r.decodeTokensPerSecond.toFixed(1).padStart(12),
      `x${r.ratioToDepth1.toFixed(2)}`.padStart(10),
      String(r.finetuneSlices).padStart(10),
      String(r.pairsTrained).padStart(13),
      error.padStart(16),
    ];
    console.log(`  ${cells.join("  ")}`);
  }
  console.log(`wrote ${file}`);
}
