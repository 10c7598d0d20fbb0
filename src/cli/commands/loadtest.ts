/**
 * `mace loadtest`: serve a Poisson load with feedback through the engine in a worker, in real
 * time, then simulate the same workload against the same cost profile, and report both with the
 * simulator's relative error on each metric.
 */
import { InvalidRequestError } from "../../engine/errors.ts";
import { backendFlag, DEFAULT_MODEL, numberFlag, parseFlags } from "../args.ts";
import { spawnEngine } from "../../worker/engine_client.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import { replayWorkload } from "../../host/replay.ts";
import type { Engine } from "../../host/engine_api.ts";
import { loadTrace, poissonWorkload } from "../../scheduler/sim/workload.ts";
import { simulate } from "../../scheduler/sim/simulator.ts";
import { POLICY_NAMES, policyOptions } from "../../scheduler/mace/policy.ts";
import { DEFAULT_PROFILE, loadProfile } from "../../scheduler/profiles.ts";
import { formatSummaryTable, type MetricsSummary } from "../../scheduler/metrics.ts";

export const LOADTEST_HELP =
  `mace loadtest [--policy P] [--rate R] [--duration S] [--retrain-rate F] [--trace NAME|FILE]
    [--ttft-slo MS] [--tbt-slo MS] [--profile FILE] [--model DIR] [--backend auto|wgpu|dawn]
    [--seed N] [--max-prompt N] [--max-output N] [--in-process] [--json] [--out FILE]
  Serves Poisson arrivals (lengths drawn from --trace, default sharegpt) with feedback pairs from
  --retrain-rate of the requests, through the engine in a worker (--in-process: no worker), in
  real time; then simulates the same workload with the same profile and prints both, with the
  simulator's relative error per metric. Defaults: policy mace, rate 1 req/s, duration 60 s,
  retrain rate 0.3, TTFT SLO 2000 ms, TBT SLO 250 ms, max prompt 128, max output 64, seed 1,
  profile ${DEFAULT_PROFILE}. Writes bench/results/loadtest-<policy>.json (or --out).`;

/** Metrics compared live vs simulated: name, getter. */
const COMPARED: [string, (s: MetricsSummary) => number | null][] = [
  ["ttft p50", (s) => s.ttft.p50],
  ["ttft p99", (s) => s.ttft.p99],
  ["tbt p50", (s) => s.tbt.p50],
  ["tbt p99", (s) => s.tbt.p99],
  ["e2e p50", (s) => s.e2e.p50],
  ["slo attainment", (s) => s.slo.attainment],
  ["throughput tok/s", (s) => s.throughputTokensPerSecond],
  ["gpu busy", (s) => s.gpuBusyFraction],
  ["ft pairs/s", (s) => s.finetune.pairsPerSecond],
];

export async function loadtestCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    policy: { type: "string", default: "mace" },
    rate: { type: "string" },
    duration: { type: "string" },
    "retrain-rate": { type: "string" },
    trace: { type: "string", default: "sharegpt" },
    "ttft-slo": { type: "string" },
    "tbt-slo": { type: "string" },
    profile: { type: "string", default: DEFAULT_PROFILE },
    model: { type: "string", default: DEFAULT_MODEL },
    backend: { type: "string", default: "auto" },
    seed: { type: "string" },
    "max-prompt": { type: "string" },
    "max-output": { type: "string" },
    "in-process": { type: "boolean", default: false },
    json: { type: "boolean", default: false },
    out: { type: "string" },
  }, "loadtest");
  if (!(POLICY_NAMES as readonly string[]).includes(flags.policy!)) {
    throw new InvalidRequestError(
      `--policy ${flags.policy}: expected one of ${POLICY_NAMES.join(", ")}`,
    );
  }
  const backend = backendFlag(flags.backend);
  const positive = (n: number) => n > 0;
  const posInt = (n: number) => Number.isInteger(n) && n >= 1;
  const rate = numberFlag(flags.rate, "rate", 1, positive);
  const durationS = numberFlag(flags.duration, "duration", 60, positive);
  const retrainRate = numberFlag(
    flags["retrain-rate"],
    "retrain-rate",
    0.3,
    (n) => n >= 0 && n <= 1,
  );
  const ttftSloMs = numberFlag(flags["ttft-slo"], "ttft-slo", 2000, positive);
  const tbtSloMs = numberFlag(flags["tbt-slo"], "tbt-slo", 250, positive);
  const seed = numberFlag(flags.seed, "seed", 1, Number.isSafeInteger);
  const maxPromptTokens = numberFlag(flags["max-prompt"], "max-prompt", 128, posInt);
  const maxOutputTokens = numberFlag(flags["max-output"], "max-output", 64, posInt);
  const log = (line: string) => (flags.json ? console.error(line) : console.log(line));

  const profile = await loadProfile(flags.profile!);
  const trace = await loadTrace(flags.trace!);
  const workload = poissonWorkload({
    rate,
    durationS,
    lengths: trace.rows,
    retrainRate,
    seed,
    maxPromptTokens,
    maxOutputTokens,
  });
  const options = {
    model: flags.model,
    backend,
    policy: flags.policy,
    profile: flags.profile,
    ttftSloMs,
    tbtSloMs,
  };
  log(
    `loadtest: ${workload.length} requests over ${durationS} s (${rate} req/s), ${flags.policy}, ` +
      `starting the engine`,
  );
  let engine: Engine;
  let stop: () => Promise<void>;
  if (flags["in-process"]) {
    const e = await MaceEngine.create(options);
    engine = e;
    stop = () => e.close();
  } else {
    const handle = await spawnEngine(options);
    engine = handle.engine;
    stop = () => handle.terminate();
  }
  let live;
  try {
    const info = await engine.info();
    log(`loadtest: ${info.model} on ${info.device} (${info.backend}); serving`);
    let done = 0;
    live = await replayWorkload(engine, workload, {
      sharedPrefixTokens: 32,
      vocabSize: info.vocabSize,
      trainMaxLength: 256,
      ttftSloMs,
      tbtSloMs,
      onResult: () => {
        if (++done % 20 === 0) log(`loadtest: ${done}/${workload.length} requests done`);
      },
    });
  } finally {
    await stop();
  }
  const sim = simulate({
    policy: policyOptions(flags.policy!, { ttftSloMs, tbtSloMs }),
    profile,
    workload,
    seed,
    durationMs: durationS * 1000,
  });
  const errors = Object.fromEntries(COMPARED.map(([name, get]) => {
    const l = get(live.metrics.summary), s = get(sim.summary);
    return [name, {
      live: l,
      simulated: s,
      relativeError: l === null || s === null || l === 0 ? null : (s - l) / l,
    }];
  }));
  const report = {
    schema: "mace.loadtest.v1",
    policy: flags.policy,
    rate,
    durationS,
    retrainRate,
    seed,
    requests: workload.length,
    feedbackPairs: live.feedback,
    profile: flags.profile,
    live: {
      summary: live.metrics.summary,
      prediction: live.metrics.prediction,
      optimizerSteps: live.metrics.optimizerSteps,
    },
    simulated: {
      summary: sim.summary,
      prediction: sim.prediction,
      optimizerSteps: sim.optimizerSteps,
    },
    comparison: errors,
  };
  const out = flags.out ?? `bench/results/loadtest-${flags.policy}.json`;
  await Deno.mkdir(out.replace(/\/[^/]*$/, "") || ".", { recursive: true });
  await Deno.writeTextFile(out, JSON.stringify(report, null, 2) + "\n");
  if (flags.json) {
    console.log(JSON.stringify(report, null, 2));
    return;
  }
  console.log(
    formatSummaryTable([{ name: "live", summary: live.metrics.summary }, {
      name: "simulated",
      summary: sim.summary,
    }]),
  );
  console.log("metric              live        simulated   sim error");
  for (const [name, e] of Object.entries(errors)) {
    const f = (v: number | null) => (v === null ? "-" : v.toPrecision(4)).padStart(10);
    const err = e.relativeError === null ? "-" : `${(e.relativeError * 100).toFixed(1)}%`;
    console.log(`${name.padEnd(18)}${f(e.live)}  ${f(e.simulated)}  ${err.padStart(9)}`);
  }
  const p = live.metrics.prediction;
  console.log(
    `live cost model: ${p.steps} iterations, mean |error| ${p.meanAbsErrorMs?.toFixed(2)} ms ` +
      `(${((p.meanAbsPercentError ?? 0) * 100).toFixed(1)}%), bias ${
        ((p.totalBias ?? 0) * 100).toFixed(1)
      }%`,
  );
  console.log(`wrote ${out}`);
}
