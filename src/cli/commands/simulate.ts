/**
 * `mace simulate`: run scheduling policies against a trace and a cost profile, print the metrics.
 */
import { InvalidRequestError } from "../../engine/errors.ts";
import { numberFlag, parseFlags } from "../args.ts";
import {
  ABLATIONS,
  POLICY_NAMES,
  type PolicyOptions,
  policyOptions,
} from "../../scheduler/mace/policy.ts";
import { simulate, type SimulationResult } from "../../scheduler/sim/simulator.ts";
import {
  type Arrival,
  loadTrace,
  poissonWorkload,
  traceWorkload,
} from "../../scheduler/sim/workload.ts";
import {
  formatSummaryMarkdown,
  formatSummaryTable,
  type MetricsSummary,
} from "../../scheduler/metrics.ts";
import { DEFAULT_PROFILE, loadProfile } from "../../scheduler/profiles.ts";

export const SIMULATE_HELP =
  `mace simulate --policy P[,P...]|all [--trace NAME|FILE] [--rate R] [--poisson]
    [--retrain-rate F[,F...]] [--ttft-slo MS] [--tbt-slo MS] [--duration S] [--start S]
    [--profile FILE] [--seed N] [--kv-budget N] [--period S] [--delta-ft MS] [--pairs-per-step N]
    [--max-prompt N] [--max-output N] [--noise X] [--offline-cost] [--json] [--markdown]
  Replays a request trace through the scheduler with step times from a cost profile (a
  discrete-event simulation, deterministic for --seed) and prints TTFT/TBT percentiles, SLO
  attainment, throughput, GPU busy share, fine-tuning pairs/s and staleness per policy.
  Policies: ${POLICY_NAMES.join(", ")}; ablations: ${Object.keys(ABLATIONS).join(", ")};
  "all" runs every one but mace-no-loss-priority (no learning is simulated, so it equals mace;
  it shows live). Traces: azure-conv (default), azure-code, sharegpt (lengths only: Poisson
  arrivals), or a CSV file. --rate R time-scales the trace to R requests/s (default: as recorded);
  --poisson draws Poisson arrivals at --rate from the trace's lengths. Lengths are clamped to
  --max-prompt (default: context - max output) and --max-output (default 128) tokens.
  Defaults: retrain rate 0.3, TTFT SLO 2000 ms, TBT SLO 250 ms, duration 300 s, profile
  ${DEFAULT_PROFILE}, seed 1, KV budget (mace variants) 0 = no pruning (so mace-no-kv-pruning
  differs from mace only with --kv-budget N),
  retraining period (periodic, synchronous) 60 s, δ_ft 500 ms, 4 pairs per step.`;

interface Row {
  name: string;
  retrainRate: number;
  summary: MetricsSummary;
  result: Omit<SimulationResult, "summary">;
}

export async function simulateCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    policy: { type: "string" },
    trace: { type: "string", default: "azure-conv" },
    rate: { type: "string" },
    poisson: { type: "boolean", default: false },
    "retrain-rate": { type: "string", default: "0.3" },
    "ttft-slo": { type: "string" },
    "tbt-slo": { type: "string" },
    duration: { type: "string" },
    start: { type: "string" },
    profile: { type: "string", default: DEFAULT_PROFILE },
    seed: { type: "string" },
    "kv-budget": { type: "string" },
    period: { type: "string" },
    "delta-ft": { type: "string" },
    "pairs-per-step": { type: "string" },
    "max-prompt": { type: "string" },
    "max-output": { type: "string" },
    noise: { type: "string" },
    "offline-cost": { type: "boolean", default: false },
    json: { type: "boolean", default: false },
    markdown: { type: "boolean", default: false },
  }, "simulate");
  if (flags.policy === undefined) {
    throw new InvalidRequestError("simulate: --policy is required (or --policy all)");
  }
  const variants = parseVariants(flags.policy);
  const positive = (n: number) => n > 0;
  const profile = await loadProfile(flags.profile!);
  const retrainRates = flags["retrain-rate"]!.split(",").map((v) =>
    numberFlag(v, "retrain-rate", 0, (n) => n >= 0 && n <= 1)
  );
  const durationS = numberFlag(flags.duration, "duration", 300, positive);
  const seed = numberFlag(flags.seed, "seed", 1, Number.isSafeInteger);
  const maxOutputTokens = numberFlag(
    flags["max-output"],
    "max-output",
    128,
    (n) => Number.isInteger(n) && n >= 1,
  );
  const maxPromptTokens = numberFlag(
    flags["max-prompt"],
    "max-prompt",
    profile.maxContext - maxOutputTokens,
    (n) => Number.isInteger(n) && n >= 1 && n + maxOutputTokens <= profile.maxContext,
  );
  const kvBudget = numberFlag(
    flags["kv-budget"],
    "kv-budget",
    0,
    (n) => Number.isInteger(n) && n >= 0,
  );
  const common: Partial<PolicyOptions> = {
    ttftSloMs: numberFlag(flags["ttft-slo"], "ttft-slo", 2000, positive),
    tbtSloMs: numberFlag(flags["tbt-slo"], "tbt-slo", 250, positive),
    periodMs: 1000 * numberFlag(flags.period, "period", 60, positive),
    deltaFtMs: numberFlag(flags["delta-ft"], "delta-ft", 500, positive),
    pairsPerStep: numberFlag(
      flags["pairs-per-step"],
      "pairs-per-step",
      4,
      (n) => Number.isInteger(n) && n >= 1,
    ),
  };
  const trace = await loadTrace(flags.trace!);
  const rate = flags.rate === undefined ? undefined : numberFlag(flags.rate, "rate", 1, positive);
  const workloadFor = (retrainRate: number): Arrival[] => {
    const o = { durationS, retrainRate, seed, maxPromptTokens, maxOutputTokens };
    if (trace.kind === "timed" && !flags.poisson) {
      return traceWorkload(trace.rows, {
        ...o,
        rate,
        startS: numberFlag(flags.start, "start", 0, (n) => n >= 0),
      });
    }
    if (rate === undefined) {
      throw new InvalidRequestError("simulate: Poisson arrivals need --rate R");
    }
    return poissonWorkload({ ...o, rate, lengths: trace.rows });
  };
  const rows: Row[] = [];
  for (const retrainRate of retrainRates) {
    const workload = workloadFor(retrainRate);
    for (const v of variants) {
      const policy = policyOptions(v.policy, {
        ...common,
        // KV pruning is a MACE feature; its ablation turns it off.
        kvBudget: v.policy === "mace" ? kvBudget : 0,
        ...v.overrides,
      });
      const { summary, ...result } = simulate({
        policy,
        profile,
        workload,
        seed,
        durationMs: durationS * 1000,
        noise: flags.noise === undefined
          ? undefined
          : numberFlag(flags.noise, "noise", 0, (n) => n >= 0),
        online: !flags["offline-cost"],
      });
      rows.push({ name: v.name, retrainRate, summary, result });
    }
  }
  if (flags.json) {
    console.log(JSON.stringify(
      {
        schema: "mace.simulation.v1",
        profile: { path: flags.profile, device: profile.device, model: profile.model },
        trace: flags.trace,
        rate: rate ?? null,
        durationS,
        seed,
        rows,
      },
      null,
      2,
    ));
    return;
  }
  for (const retrainRate of retrainRates) {
    const table = rows.filter((r) => r.retrainRate === retrainRate);
    const title = `retrain rate ${
      Math.round(retrainRate * 100)
    }% · ${flags.trace} · ${profile.model} on ${profile.device}`;
    if (flags.markdown) console.log(`\n**${title}**\n\n${formatSummaryMarkdown(table)}`);
    else console.log(`\n${title}\n${formatSummaryTable(table)}`);
  }
}

function parseVariants(
  list: string,
): { name: string; policy: typeof POLICY_NAMES[number]; overrides: Partial<PolicyOptions> }[] {
  // "all" leaves out the DPO-loss-priority ablation: the simulator models time, not learning, so
  // every pair keeps the fresh-adapter loss and the ablation would equal mace by construction.
  const names = list === "all"
    ? [...POLICY_NAMES, ...Object.keys(ABLATIONS).filter((n) => n !== "mace-no-loss-priority")]
    : list.split(",");
  return names.map((name) => {
    if ((POLICY_NAMES as readonly string[]).includes(name)) {
      return { name, policy: name as typeof POLICY_NAMES[number], overrides: {} };
    }
    const ablation = ABLATIONS[name];
    if (!ablation) {
      throw new InvalidRequestError(
        `--policy ${name}: expected one of ${
          [...POLICY_NAMES, ...Object.keys(ABLATIONS)].join(", ")
        } or all`,
      );
    }
    return { name, ...ablation };
  });
}
