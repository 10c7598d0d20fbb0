/**
 * `mace eval-pruning`: what KV pruning costs in quality on a model. The model samples a text
 * from BOS (temperature 1, seeded); then its teacher-forced log-likelihood is measured with the
 * full KV cache, with H2O-style pruning (sinks + window + heavy hitters) and with sinks + a
 * recency window, both at the same budget. Prints a table; writes JSON to bench/results/.
 */
import { backendFlag, DEFAULT_MODEL, numberFlag, parseFlags } from "../args.ts";
import { createGpuContext } from "../../engine/gpu/context.ts";
import { openModel } from "../../engine/model/open_model.ts";
import { ModelRunner } from "../../engine/runner/model_runner.ts";
import { InvalidRequestError } from "../../engine/errors.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import { type PruningEvalResult, scoreWithPruning } from "../../host/pruning_eval.ts";

export const EVAL_PRUNING_HELP =
  `mace eval-pruning [--model DIR|FILE] [--length N] [--budget-percent P]
    [--sinks N] [--window N] [--seed S] [--backend auto|wgpu|dawn]
  Log-likelihood of a sampled N-token text (default 256) with the KV cache pruned to P% of N
  (default 50), H2O (sinks + window + heavy hitters) against sinks + recency window.`;

export async function evalPruningCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    model: { type: "string", default: DEFAULT_MODEL },
    length: { type: "string" },
    "budget-percent": { type: "string" },
    sinks: { type: "string" },
    window: { type: "string" },
    seed: { type: "string" },
    backend: { type: "string", default: "auto" },
  }, "eval-pruning");
  const int = (min: number) => (n: number) => Number.isInteger(n) && n >= min;
  const length = numberFlag(flags.length, "length", 256, int(32));
  const percent = numberFlag(
    flags["budget-percent"],
    "budget-percent",
    50,
    (n) => n > 0 && n < 100,
  );
  const sinks = numberFlag(flags.sinks, "sinks", 4, int(0));
  const seed = numberFlag(flags.seed, "seed", 7, int(0));
  const blockSize = 16;
  const budget = Math.round((length * percent) / 100 / blockSize) * blockSize;
  const window = numberFlag(
    flags.window,
    "window",
    Math.max(0, Math.floor((budget - blockSize - sinks) / 2)),
    int(0),
  );
  // Pruning keeps one block under the budget: sinks and window must leave room in it.
  if (sinks + window + blockSize > budget) {
    throw new InvalidRequestError(
      `a KV budget of ${budget} tokens (${percent}% of --length ${length}, in ${blockSize}-token ` +
        `blocks) cannot hold --sinks ${sinks} + --window ${window} + one block; raise --length ` +
        `or --budget-percent, or lower --sinks or --window`,
    );
  }
  const backend = backendFlag(flags.backend);
  const ctx = await createGpuContext({ backend });
  const source = await openModel(flags.model!);
  const sizes = { maxSeqs: 1, maxContext: length, maxTokens: 16, blockSize };

  const engine = await MaceEngine.open(ctx, source, {
    policy: "inference-only",
    maxContext: length,
    serving: { maxSeqs: 1, maxTokensPerStep: 16 },
  });
  const sampled = await engine.generate({
    prompt: [source.config.bosTokenId ?? 0],
    maxTokens: length - 1,
    sampling: { temperature: 1, topK: 0, topP: 1, seed },
    ignoreEos: true,
  });
  await engine.close();
  const text = [...sampled.promptTokens, ...sampled.tokens];

  const runner = await ModelRunner.create(ctx, source, sizes);
  const runs: [string, PruningEvalResult][] = [
    ["full KV", await scoreWithPruning(runner, text, 0, { sinks, window, heavyHitters: true })],
    [
      "H2O (sinks+window+heavy)",
      await scoreWithPruning(runner, text, budget, { sinks, window, heavyHitters: true }),
    ],
    [
      "sinks+window",
      await scoreWithPruning(runner, text, budget, { sinks, window: 0, heavyHitters: false }),
    ],
  ];
  runner.destroy();
  const full = runs[0][1];
  const kvBytesPerBlock = runner.memory.kvBytesPerToken * blockSize;
  console.log(
    `${source.description}: ${text.length} tokens, KV budget ${budget} tokens (${percent}%), ` +
      `sinks ${sinks}, window ${window}, ${ctx.backend}`,
  );
  console.log("policy                      log-lik   change   evicted  peak KV");
  for (const [name, r] of runs) {
    console.log(
      `${name.padEnd(26)} ${r.logLikelihood.toFixed(2).padStart(8)} ` +
        `${(r.logLikelihood - full.logLikelihood).toFixed(2).padStart(8)} ${
          String(r.evictedTokens).padStart(9)
        } ` +
        `${((r.peakBlocks * kvBytesPerBlock) / 1024).toFixed(1).padStart(6)} KiB`,
    );
  }
  const dir = new URL("../../../bench/results/", import.meta.url).pathname;
  await Deno.mkdir(dir, { recursive: true });
  const file = `${dir}pruning-${ctx.backend}-${
    new Date().toISOString().replace(/[:.]/g, "-")
  }.json`;
  await Deno.writeTextFile(
    file,
    JSON.stringify(
      {
        model: source.description,
        backend: ctx.backend,
        length,
        budget,
        sinks,
        window,
        seed,
        kvBytesPerBlock,
        runs: Object.fromEntries(runs),
      },
      null,
      2,
    ) + "\n",
  );
  console.error(`wrote ${file}`);
  ctx.destroy();
}
