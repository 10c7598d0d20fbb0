/**
 * The metrics of docs/ARCHITECTURE.md (metric names), shared by the simulator and the live engine
 * so that both report the same numbers under the same names. A `MetricsRecorder` is fed events on
 * one clock (ms; the simulator's virtual time or performance.now()) and `summary()` turns them
 * into a plain-JSON `MetricsSummary`. Pure TypeScript, no WebGPU.
 *
 * Definitions (each chosen once, here, so every report agrees):
 * - Percentiles use linear interpolation between closest ranks (numpy's default, what vLLM's
 *   benchmark_serving reports): sorted x[0..n-1], h = (n-1)·p/100, value
 *   x[⌊h⌋] + (h-⌊h⌋)·(x[⌊h⌋+1] - x[⌊h⌋]). An empty set gives null, never NaN.
 * - TTFT: first token time - arrival, for every request that has its first token (finished or
 *   not: leaving in-flight requests out would bias a run's tail against long requests). A request
 *   that finishes with no token (EOS first) gets TTFT = finish - arrival, as RequestState does.
 * - TBT: every gap between consecutive tokens of one request, pooled over all requests.
 * - E2E: finish - arrival, finished requests only.
 * - SLO attainment (per request, DistServe-style): share of finished requests with
 *   TTFT ≤ ttftSloMs and the request's MAX TBT ≤ tbtSloMs (a request with < 2 tokens has no gap
 *   and meets the TBT part). Max, not p99: a streaming user sees every stall, and for outputs under
 *   ~100 tokens a per-request p99 is (almost) the max anyway, so p99 would only forgive stalls in
 *   long outputs, exactly where co-scheduled fine-tuning slices would hide. Equality meets the SLO.
 *   Unfinished requests are outside the share; `slo.unfinishedViolated` counts those already
 *   known to miss, so a policy that starves requests cannot look good by never finishing them.
 * - Throughput: output tokens observed in the window / wall seconds (tokens of unfinished requests
 *   count: they were produced).
 * - GPU busy fraction: (union of gpuBusy intervals + sum of gpuTime durations) / wall. Intervals
 *   are unioned because pipelined steps overlap (StepResult.gpuMs counts from submit, including
 *   the wait for earlier steps), so summing them would count the same GPU time twice.
 * - Fine-tuning throughput: pair-trainings / wall second (a pair trained in two steps counts
 *   twice; `finetune.uniquePairsTrained` counts it once).
 * - Staleness: feedback pairs received but not yet trained (a pair stops being stale at its first
 *   training). `current` at the end of the window, `meanOverTime` the time-weighted mean over the
 *   window, `max` the largest value after all events of any one instant, `meanAgeMs` the mean age
 *   of the pairs still untrained at the end, `meanTrainDelayMs` the mean receive → first-training
 *   wait of the pairs that were trained.
 *
 * The window: from `startMs` (constructor; default the earliest event) to start + `wallMs`
 * (summary option; default up to the latest event). Events must lie inside it.
 */
import { MaceError } from "../engine/errors.ts";

/** The recorder was fed events out of contract (unknown id, time going backwards, bad count). */
export class MetricsUsageError extends MaceError {
  override readonly code = "metrics_usage";
}

/** Percentiles of one distribution, in ms; null when it has no samples. */
export interface Distribution {
  count: number;
  p50: number | null;
  p90: number | null;
  p99: number | null;
  mean: number | null;
  max: number | null;
}

export interface SummaryOptions {
  ttftSloMs: number;
  tbtSloMs: number;
  /** Window length from the recorder's start; default: up to the latest recorded event. */
  wallMs?: number;
}

/** Plain JSON (numbers, nulls, nested objects): no NaN, no Infinity, no undefined. */
export interface MetricsSummary {
  wallMs: number;
  requests: { arrived: number; finished: number; cancelled: number; unfinished: number };
  tokens: { prompt: number; output: number };
  /** ms */
  ttft: Distribution;
  /** ms, pooled gaps between consecutive tokens */
  tbt: Distribution;
  /** ms, finished requests */
  e2e: Distribution;
  slo: {
    ttftMs: number;
    tbtMs: number;
    /** Finished requests meeting both SLOs. */
    met: number;
    /** met / finished; null with no finished request. */
    attainment: number | null;
    /** Unfinished requests already past an SLO (late first token, or a gap > tbtMs so far). */
    unfinishedViolated: number;
  };
  /** Output tokens per second; null for a zero-length window. */
  throughputTokensPerSecond: number | null;
  gpuBusyMs: number;
  /** Can exceed 1 only if gpuTime durations were reported that overlap each other. */
  gpuBusyFraction: number | null;
  finetune: {
    pairsTrained: number;
    uniquePairsTrained: number;
    pairsPerSecond: number | null;
    meanDpoLoss: number | null;
    /** Mean DPO loss of the latest `trained` call. */
    lastDpoLoss: number | null;
  };
  feedbackReceived: number;
  staleness: {
    current: number;
    meanOverTime: number | null;
    max: number;
    meanAgeMs: number | null;
    meanTrainDelayMs: number | null;
  };
}

export type RequestId = number | string;
export type PairId = number | string;

interface RequestRecord {
  arrivedAt: number;
  tokenTimes: number[];
  finishedAt: number | null;
  cancelled: boolean;
  promptTokens: number;
  outputTokens: number;
}

interface PairRecord {
  receivedAt: number;
  firstTrainedAt: number | null;
}

/** Linear-interpolation percentile of an ascending array; null when empty. */
export function percentile(sorted: readonly number[], p: number): number | null {
  const n = sorted.length;
  if (n === 0) return null;
  const h = (n - 1) * p / 100;
  const lo = Math.floor(h);
  if (lo >= n - 1) return sorted[n - 1];
  return sorted[lo] + (h - lo) * (sorted[lo + 1] - sorted[lo]);
}

export function distribution(values: readonly number[]): Distribution {
  const sorted = [...values].sort((a, b) => a - b);
  const n = sorted.length;
  return {
    count: n,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    mean: n === 0 ? null : sorted.reduce((s, v) => s + v, 0) / n,
    max: n === 0 ? null : sorted[n - 1],
  };
}

const ratio = (num: number, den: number): number | null => (den > 0 ? num / den : null);

export class MetricsRecorder {
  private readonly requests = new Map<RequestId, RequestRecord>();
  private readonly pairs = new Map<PairId, PairRecord>();
  private readonly busyIntervals: [number, number][] = [];
  private gpuTimeMs = 0;
  private readonly trainedIds = new Set<PairId>();
  private pairTrainings = 0;
  private lossSum = 0;
  /** Trainings with a known loss (the simulator trains without one). */
  private lossCount = 0;
  private lastLoss: number | null = null;
  private earliest = Infinity;
  private latest = -Infinity;

  /** `startMs`: the window's start (e.g. 0 in the simulator); default the earliest event. */
  constructor(private readonly startMs?: number) {
    if (startMs !== undefined) this.checkTime(startMs, "startMs");
  }

  arrived(atMs: number, id: RequestId): void {
    this.checkAt(atMs, "arrived");
    if (this.requests.has(id)) throw new MetricsUsageError(`request ${id} arrived twice`);
    this.mark(atMs);
    this.requests.set(id, {
      arrivedAt: atMs,
      tokenTimes: [],
      finishedAt: null,
      cancelled: false,
      promptTokens: 0,
      outputTokens: 0,
    });
  }

  /** One generated token known to the client; the first call for a request is its first token. */
  token(atMs: number, id: RequestId): void {
    const r = this.live(atMs, id, "token");
    this.mark(atMs);
    r.tokenTimes.push(atMs);
  }

  /**
   * The request is done. `outputTokens` must equal the tokens recorded for it (a cheap check
   * that the caller fed every token, so TBT and throughput are complete).
   */
  finished(
    atMs: number,
    id: RequestId,
    counts: { promptTokens: number; outputTokens: number },
  ): void {
    const r = this.live(atMs, id, "finished");
    this.checkCount(counts.promptTokens, "promptTokens");
    if (counts.outputTokens !== r.tokenTimes.length) {
      throw new MetricsUsageError(
        `request ${id} finished with outputTokens ${counts.outputTokens} but ` +
          `${r.tokenTimes.length} tokens were recorded; call token() for every generated token`,
      );
    }
    this.mark(atMs);
    r.finishedAt = atMs;
    r.promptTokens = counts.promptTokens;
    r.outputTokens = counts.outputTokens;
  }

  /** The client cancelled: out of the SLO share and E2E; its TTFT/TBT samples stay. */
  cancelled(atMs: number, id: RequestId): void {
    const r = this.live(atMs, id, "cancelled");
    this.mark(atMs);
    r.cancelled = true;
    r.finishedAt = atMs;
  }

  /** The GPU was busy over [startMs, endMs]; overlapping intervals are unioned. */
  gpuBusy(startMs: number, endMs: number): void {
    this.checkAt(startMs, "gpuBusy");
    this.checkAt(endMs, "gpuBusy");
    if (endMs < startMs) {
      throw new MetricsUsageError(`gpuBusy interval [${startMs}, ${endMs}] is reversed`);
    }
    this.mark(startMs);
    this.mark(endMs);
    this.busyIntervals.push([startMs, endMs]);
  }

  /**
   * GPU time of one iteration, when no interval is known; assumed not to overlap other GPU time.
   */
  gpuTime(ms: number): void {
    this.checkCount(ms, "gpuTime ms", false);
    this.gpuTimeMs += ms;
  }

  /** Feedback pairs (prompt, chosen, rejected) arrived and wait to be trained on. */
  feedback(atMs: number, pairIds: readonly PairId[]): void {
    this.checkAt(atMs, "feedback");
    const fresh = new Set<PairId>();
    for (const id of pairIds) {
      if (this.pairs.has(id) || fresh.has(id)) {
        throw new MetricsUsageError(`feedback pair ${id} received twice`);
      }
      fresh.add(id);
    }
    this.mark(atMs);
    for (const id of fresh) this.pairs.set(id, { receivedAt: atMs, firstTrainedAt: null });
  }

  /**
   * A DPO step trained these pairs, with each pair's loss (null: not known, as in the simulator,
   * which models time, not learning). A pair never received as feedback (a seed data set) counts
   * for throughput and loss but not staleness.
   */
  trained(atMs: number, pairs: readonly { id: PairId; dpoLoss: number | null }[]): void {
    this.checkAt(atMs, "trained");
    for (const { id, dpoLoss } of pairs) {
      if (dpoLoss !== null && !Number.isFinite(dpoLoss)) {
        throw new MetricsUsageError(`pair ${id}: DPO loss ${dpoLoss} is not finite`);
      }
      const p = this.pairs.get(id);
      if (p && p.receivedAt > atMs) {
        throw new MetricsUsageError(
          `pair ${id} trained at ${atMs} ms, before it was received at ${p.receivedAt} ms`,
        );
      }
    }
    this.mark(atMs);
    if (pairs.length === 0) return;
    let sum = 0, known = 0;
    for (const { id, dpoLoss } of pairs) {
      if (dpoLoss !== null) {
        sum += dpoLoss;
        known++;
      }
      this.trainedIds.add(id);
      const p = this.pairs.get(id);
      if (p && p.firstTrainedAt === null) p.firstTrainedAt = atMs;
    }
    this.pairTrainings += pairs.length;
    this.lossSum += sum;
    this.lossCount += known;
    if (known > 0) this.lastLoss = sum / known;
  }

  /** The metrics over the window; may be called any number of times, mid-run included. */
  summary(options: SummaryOptions): MetricsSummary {
    const { ttftSloMs, tbtSloMs } = options;
    this.checkCount(ttftSloMs, "ttftSloMs", false);
    this.checkCount(tbtSloMs, "tbtSloMs", false);
    const start = this.startMs ?? (Number.isFinite(this.earliest) ? this.earliest : 0);
    let end = Number.isFinite(this.latest) ? Math.max(start, this.latest) : start;
    if (options.wallMs !== undefined) {
      this.checkCount(options.wallMs, "wallMs", false);
      if (start + options.wallMs < end) {
        throw new MetricsUsageError(
          `wallMs ${options.wallMs} ends the window at ${
            start + options.wallMs
          } ms, before the last event at ${end} ms`,
        );
      }
      end = start + options.wallMs;
    }
    const wallMs = end - start;
    const wallS = wallMs / 1000;

    const ttfts: number[] = [], tbts: number[] = [], e2es: number[] = [];
    let finished = 0, cancelled = 0, met = 0, unfinishedViolated = 0, prompt = 0, output = 0;
    for (const r of this.requests.values()) {
      const t = r.tokenTimes;
      output += t.length;
      let maxGap = 0;
      for (let i = 1; i < t.length; i++) {
        const gap = t[i] - t[i - 1];
        tbts.push(gap);
        maxGap = Math.max(maxGap, gap);
      }
      const done = r.finishedAt !== null && !r.cancelled;
      const firstAt = t.length > 0 ? t[0] : done ? r.finishedAt! : null;
      if (firstAt !== null) ttfts.push(firstAt - r.arrivedAt);
      if (r.cancelled) {
        cancelled++;
      } else if (done) {
        finished++;
        prompt += r.promptTokens;
        e2es.push(r.finishedAt! - r.arrivedAt);
        if (firstAt! - r.arrivedAt <= ttftSloMs && maxGap <= tbtSloMs) met++;
      } else {
        // Known misses so far: the first token is (or would now be) late, or a gap has been too
        // long, including the open gap since the last token.
        const lateFirst = (firstAt ?? end) - r.arrivedAt > ttftSloMs;
        const openGap = t.length > 0 ? end - t[t.length - 1] : 0;
        if (lateFirst || Math.max(maxGap, openGap) > tbtSloMs) unfinishedViolated++;
      }
    }

    const gpuBusyMs = unionLength(this.busyIntervals) + this.gpuTimeMs;

    return {
      wallMs,
      requests: {
        arrived: this.requests.size,
        finished,
        cancelled,
        unfinished: this.requests.size - finished - cancelled,
      },
      tokens: { prompt, output },
      ttft: distribution(ttfts),
      tbt: distribution(tbts),
      e2e: distribution(e2es),
      slo: {
        ttftMs: ttftSloMs,
        tbtMs: tbtSloMs,
        met,
        attainment: ratio(met, finished),
        unfinishedViolated,
      },
      throughputTokensPerSecond: ratio(output, wallS),
      gpuBusyMs,
      gpuBusyFraction: ratio(gpuBusyMs, wallMs),
      finetune: {
        pairsTrained: this.pairTrainings,
        uniquePairsTrained: this.trainedIds.size,
        pairsPerSecond: ratio(this.pairTrainings, wallS),
        meanDpoLoss: ratio(this.lossSum, this.lossCount),
        lastDpoLoss: this.lastLoss,
      },
      feedbackReceived: this.pairs.size,
      staleness: this.staleness(start, end),
    };
  }

  /** Sweep over receive (+1) and first-training (-1) instants of the feedback pairs. */
  private staleness(start: number, end: number): MetricsSummary["staleness"] {
    const deltas = new Map<number, number>();
    const add = (t: number, d: number) => deltas.set(t, (deltas.get(t) ?? 0) + d);
    let ageSum = 0, stale = 0, delaySum = 0, delayed = 0;
    for (const p of this.pairs.values()) {
      add(p.receivedAt, 1);
      if (p.firstTrainedAt !== null) {
        add(p.firstTrainedAt, -1);
        delaySum += p.firstTrainedAt - p.receivedAt;
        delayed++;
      } else {
        ageSum += end - p.receivedAt;
        stale++;
      }
    }
    const times = [...deltas.keys()].sort((a, b) => a - b);
    let count = 0, max = 0, area = 0, prev = start;
    for (const t of times) {
      area += count * (t - prev);
      count += deltas.get(t)!;
      max = Math.max(max, count);
      prev = t;
    }
    area += count * (end - prev);
    return {
      current: count,
      meanOverTime: ratio(area, end - start),
      max,
      meanAgeMs: ratio(ageSum, stale),
      meanTrainDelayMs: ratio(delaySum, delayed),
    };
  }

  /** The request's record, checking that it is live and that atMs is not before its last event. */
  private live(atMs: number, id: RequestId, event: string): RequestRecord {
    this.checkAt(atMs, event);
    const r = this.requests.get(id);
    if (!r) {
      throw new MetricsUsageError(`${event}: request ${id} never arrived; call arrived() first`);
    }
    if (r.finishedAt !== null) throw new MetricsUsageError(`${event}: request ${id} already ended`);
    const last = r.tokenTimes.at(-1) ?? r.arrivedAt;
    if (atMs < last) {
      throw new MetricsUsageError(
        `${event}: request ${id} at ${atMs} ms is before its last event at ${last} ms`,
      );
    }
    return r;
  }

  /** Validates an event time: finite and not before the window's start. */
  private checkAt(atMs: number, event: string): void {
    this.checkTime(atMs, event);
    if (this.startMs !== undefined && atMs < this.startMs) {
      throw new MetricsUsageError(
        `${event} at ${atMs} ms is before the recorder's start ${this.startMs} ms`,
      );
    }
  }

  /** Widens the span of seen events (the default window). Call only after every check passed. */
  private mark(atMs: number): void {
    this.earliest = Math.min(this.earliest, atMs);
    this.latest = Math.max(this.latest, atMs);
  }

  private checkTime(ms: number, what: string): void {
    if (!Number.isFinite(ms)) {
      throw new MetricsUsageError(`${what}: time ${ms} is not a finite number of ms`);
    }
  }

  private checkCount(v: number, what: string, integer = true): void {
    if (!Number.isFinite(v) || v < 0 || (integer && !Number.isInteger(v))) {
      throw new MetricsUsageError(
        `${what} must be a ${integer ? "non-negative integer" : "finite number ≥ 0"}, got ${v}`,
      );
    }
  }
}

/** Total length of a union of closed intervals. */
function unionLength(intervals: readonly [number, number][]): number {
  const sorted = [...intervals].sort((a, b) => a[0] - b[0]);
  let total = 0, curStart = -Infinity, curEnd = -Infinity;
  for (const [s, e] of sorted) {
    if (s > curEnd) {
      if (curEnd > curStart) total += curEnd - curStart;
      curStart = s;
      curEnd = e;
    } else curEnd = Math.max(curEnd, e);
  }
  if (curEnd > curStart) total += curEnd - curStart;
  return total;
}

const COLUMNS: [header: string, width: number, get: (s: MetricsSummary) => string][] = [
  ["ttft p50", 9, (s) => fixed(s.ttft.p50, 1)],
  ["ttft p99", 9, (s) => fixed(s.ttft.p99, 1)],
  ["tbt p50", 8, (s) => fixed(s.tbt.p50, 1)],
  ["tbt p99", 8, (s) => fixed(s.tbt.p99, 1)],
  ["e2e p50", 9, (s) => fixed(s.e2e.p50, 0)],
  ["slo %", 6, (s) => fixed(s.slo.attainment === null ? null : s.slo.attainment * 100, 1)],
  ["tok/s", 8, (s) => fixed(s.throughputTokensPerSecond, 1)],
  ["gpu %", 6, (s) => fixed(s.gpuBusyFraction === null ? null : s.gpuBusyFraction * 100, 1)],
  ["ft pairs/s", 10, (s) => fixed(s.finetune.pairsPerSecond, 2)],
  ["stale avg", 9, (s) => fixed(s.staleness.meanOverTime, 1)],
  ["stale max", 9, (s) => String(s.staleness.max)],
  ["done/arrived", 12, (s) => `${s.requests.finished}/${s.requests.arrived}`],
];

function fixed(v: number | null, digits: number): string {
  return v === null ? "-" : v.toFixed(digits);
}

/**
 * A fixed-width text table, one row per policy; times in ms, "-" for no data. Columns wider
 * than their header widen only that row's cell (values are never cut).
 */
export function formatSummaryTable(
  rows: readonly { name: string; summary: MetricsSummary }[],
): string {
  const nameWidth = Math.max(6, ...rows.map((r) => r.name.length));
  const line = (name: string, cells: string[]) =>
    [name.padEnd(nameWidth), ...cells.map((c, i) => c.padStart(COLUMNS[i][1]))].join("  ")
      .trimEnd();
  const out = [line("policy", COLUMNS.map(([h]) => h))];
  out.push("-".repeat(out[0].length));
  for (const { name, summary } of rows) {
    out.push(line(name, COLUMNS.map(([, , get]) => get(summary))));
  }
  return out.join("\n") + "\n";
}

/** The same table as formatSummaryTable, as Markdown (for docs/). */
export function formatSummaryMarkdown(
  rows: readonly { name: string; summary: MetricsSummary }[],
): string {
  const out = [
    `| policy | ${COLUMNS.map(([h]) => h).join(" | ")} |`,
    `|---|${COLUMNS.map(() => "---:").join("|")}|`,
  ];
  for (const { name, summary } of rows) {
    out.push(`| ${name} | ${COLUMNS.map(([, , get]) => get(summary)).join(" | ")} |`);
  }
  return out.join("\n") + "\n";
}
