/**
 * `mace profile`: measures the engine's cost profile on this device and model
 * (src/host/profiler.ts) and writes it as JSON (schema "mace.profile.v1") where the scheduler and
 * the simulator look for it: profiles/<device>--<model>.json. The engine is built as the live MACE
 * engine builds it (runner defaults, an adapter pool, serving on a LoRA adapter, DPO max length
 * min(256, context)), so the profile measures the iterations the live loop will run.
 */
import { backendFlag, DEFAULT_MODEL, numberFlag, parseFlags } from "../args.ts";
import { createGpuContext } from "../../engine/gpu/context.ts";
import { openModel } from "../../engine/model/open_model.ts";
import { ModelRunner } from "../../engine/runner/model_runner.ts";
import { DpoTrainer } from "../../engine/training/dpo_trainer.ts";
import { type LoraConfig, parseLoraTargets } from "../../engine/lora/lora.ts";
import { type CostProfile, type Feature, FEATURES } from "../../scheduler/cost_model.ts";
import { deviceSlug, modelName, profilePath } from "../../scheduler/profiles.ts";
import { fitError, profileEngine, type ProfileSample } from "../../host/profiler.ts";

export const PROFILE_HELP =
  `mace profile [--model DIR|FILE] [--backend auto|wgpu|dawn] [--out FILE] [--repeats N]
    [--max-context N] [--max-tokens N] [--max-seqs N] [--max-length N] [--rank R]
    [--targets q,v,...] [--seed S] [--samples FILE] [--json]
  Measures how long iterations take on this device and model (serving steps of every shape, DPO
  fine-tuning slices of every kind, alone and together), fits the scheduler's cost model to them
  and writes the profile to --out (default profiles/<device>--<model>.json). Prints the
  coefficients and the fit error; --json prints the profile to stdout, --samples writes every
  measured iteration (JSON lines). --repeats (default 3) recorded rounds after one warm-up round;
  the bundled model takes about a minute on a software GPU. Engine and LoRA flags default to
  what the live engine uses: runner defaults, LoRA rank 8 on q,v, DPO max length
  min(256, context).`;

export async function profileCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    model: { type: "string", default: DEFAULT_MODEL },
    backend: { type: "string", default: "auto" },
    out: { type: "string" },
    repeats: { type: "string" },
    "max-context": { type: "string" },
    "max-tokens": { type: "string" },
    "max-seqs": { type: "string" },
    "max-length": { type: "string" },
    rank: { type: "string" },
    targets: { type: "string", default: "q,v" },
    seed: { type: "string" },
    samples: { type: "string" },
    json: { type: "boolean", default: false },
  }, "profile");
  const backend = backendFlag(flags.backend);
  const positiveInt = (n: number) => Number.isInteger(n) && n >= 1;
  const optionalInt = (name: string) =>
    flags[name as keyof typeof flags] === undefined
      ? undefined
      : numberFlag(flags[name as keyof typeof flags], name, 1, positiveInt);
  const repeats = numberFlag(flags.repeats, "repeats", 3, positiveInt);
  const seed = numberFlag(flags.seed, "seed", 0, (n) => Number.isInteger(n) && n >= 0);
  const rank = numberFlag(flags.rank, "rank", 8, positiveInt);
  const lora: LoraConfig = {
    rank,
    alpha: 2 * rank,
    targets: parseLoraTargets(flags.targets!.split(",")),
    dropout: 0,
  };
  const log = (line: string) => console.error(line);

  const source = await openModel(flags.model!);
  const model = modelName(flags.model!);
  const ctx = await createGpuContext({ backend });
  const started = performance.now();
  let runner: ModelRunner | null = null;
  let trainer: DpoTrainer | null = null;
  try {
    runner = await ModelRunner.create(ctx, source, {
      maxContext: optionalInt("max-context"),
      maxTokens: optionalInt("max-tokens"),
      maxSeqs: optionalInt("max-seqs"),
      lora: { maxAdapters: 4, maxRank: Math.max(16, rank), targets: lora.targets },
    });
    await runner.warmUp();
    const context = runner.capacity.maxBlocksPerSeq * runner.capacity.blockSize;
    const maxLength = numberFlag(
      flags["max-length"],
      "max-length",
      Math.min(256, context),
      (n) => Number.isInteger(n) && n >= 2,
    );
    trainer = new DpoTrainer(ctx, source.config, runner.weights, lora, { maxLength });
    trainer.initialize(seed);
    const out = flags.out ?? profilePath(deviceSlug(ctx.adapterDescription), model);
    log(
      `profile: ${model} on ${ctx.adapterDescription} via ${ctx.backend}: up to ` +
        `${runner.capacity.maxTokens} tokens and ${runner.capacity.maxSeqs} sequences per step, ` +
        `context ${context}, DPO max length ${maxLength}, LoRA r=${rank} on ` +
        `${lora.targets.join(",")}; ${repeats} rounds after a warm-up`,
    );
    const samples: ProfileSample[] = [];
    let lastReport = performance.now();
    const profile = await profileEngine(runner, trainer, {
      model,
      repeats,
      seed,
      onSample: (sample, done, total) => {
        samples.push(sample);
        // A line every few seconds, so a slow device shows it is alive.
        if (performance.now() - lastReport > 5000 || done === total) {
          lastReport = performance.now();
          log(`profile: ${done}/${total} iterations measured`);
        }
      },
    });
    const text = JSON.stringify(profile, null, 2) + "\n";
    await ensureParent(out);
    await Deno.writeTextFile(out, text);
    if (flags.samples !== undefined) {
      await ensureParent(flags.samples);
      await Deno.writeTextFile(
        flags.samples,
        samples.map((s) => JSON.stringify(s)).join("\n") + "\n",
      );
    }
    const report = formatReport(profile, samples, (performance.now() - started) / 1000);
    if (flags.json) {
      log(report);
      console.log(text.trimEnd());
    } else console.log(report);
    log(`profile: wrote ${out}${flags.samples !== undefined ? ` and ${flags.samples}` : ""}`);
  } finally {
    trainer?.destroy();
    runner?.destroy();
    ctx.destroy();
  }
}

const UNITS: Record<Feature, string> = {
  iteration: "per serving step",
  prefillTokens: "per prefill token",
  decodeSeqs: "per decoded sequence",
  attentionKPairs: "per 1000 query-key pairs",
  ftSlice: "per fine-tuning slice",
  ftReferenceTokens: "per pair token x depth share, reference",
  ftForwardTokens: "per pair token x depth share, forward",
  ftBackwardTokens: "per pair token x depth share, backward",
  ftHeadTokens: "per pair token, slice through the LM head",
  ftOptimizer: "per optimizer slice",
};

/** The coefficients table, the fit error overall and by kind of iteration. */
export function formatReport(
  profile: CostProfile,
  samples: readonly ProfileSample[],
  seconds: number,
): string {
  const lines = [
    `${profile.model} on ${profile.device}: ${profile.fit.samples} iterations measured in ${
      seconds.toFixed(1)
    } s`,
    "",
    `${"feature".padEnd(20)}${"ms".padStart(12)}  unit`,
    ...FEATURES.map((f) =>
      `${f.padEnd(20)}${profile.coefficients[f].toPrecision(4).padStart(12)}  ${UNITS[f]}`
    ),
    "",
    `${"fit".padEnd(34)}${"samples".padStart(8)}${"mean |err| ms".padStart(15)}${
      "mean |err| %".padStart(14)
    }`,
  ];
  const row = (name: string, f: CostProfile["fit"]) =>
    `${name.padEnd(34)}${String(f.samples).padStart(8)}${
      f.meanAbsErrorMs.toFixed(2).padStart(15)
    }` +
    `${(100 * f.meanAbsPercentError).toFixed(1).padStart(14)}`;
  lines.push(row("all", profile.fit));
  const groups = new Map<string, ProfileSample[]>();
  for (const s of samples) {
    const ft = s.shape.finetune;
    const serving = s.shape.prefillTokens + s.shape.decodeSeqs > 0;
    const key = ft
      ? `${ft.kind}${ft.head ? " +head" : ""}${serving ? " + serving" : " alone"}`
      : "serving alone";
    groups.set(key, [...(groups.get(key) ?? []), s]);
  }
  for (const [key, group] of [...groups].sort(([a], [b]) => a.localeCompare(b))) {
    lines.push(row(`  ${key}`, fitError(profile.coefficients, group)));
  }
  return lines.join("\n");
}

async function ensureParent(path: string): Promise<void> {
  const slash = path.lastIndexOf("/");
  if (slash > 0) await Deno.mkdir(path.slice(0, slash), { recursive: true });
}
