import assert from "node:assert/strict";
import {
  distribution,
  formatSummaryTable,
  MetricsRecorder,
  MetricsUsageError,
  percentile,
} from "../../src/scheduler/metrics.ts";

/** Interpolated percentiles like 100 + 0.6·30 are exact on paper, not in binary floating point. */
function near(actual: number | null, expected: number) {
  assert.ok(actual !== null && Math.abs(actual - expected) < 1e-9, `${actual} ≉ ${expected}`);
}

/**
 * The scripted run (SLOs: TTFT 100 ms, TBT 50 ms; window 0 .. 250 ms):
 *   A arrives 0,  tokens 100 130 180, done 180: TTFT 100 = SLO, gaps 30 50 (max = SLO) → met
 *   B arrives 20, tokens 150 170, done 200:     TTFT 130 > SLO                         → missed
 *   C arrives 50, tokens 120 180 190 200, done 200: TTFT 70, gap 60 > SLO              → missed
 *   D arrives 100, no token (EOS first), done 140: TTFT = 40 (finish)                  → met
 *   E arrives 150, token 190, unfinished: open gap 250-190 = 60 > SLO → known violation
 *   F arrives 240, nothing yet: waited 10 < TTFT SLO → not (yet) a violation
 * GPU: [0,50] ∪ [40,100] ∪ [150,200] = 150 ms, plus 25 ms of gpuTime.
 * Feedback: p1 p2 at 10, p3 at 60, p4 at 210; trained p1 p3 at 110, p1 p2 at 220.
 *   untrained: 0 on [0,10), 2 on [10,60), 3 on [60,110), 1 on [110,210), 2 on [210,220), 1 after.
 */
function scripted(): MetricsRecorder {
  const m = new MetricsRecorder(0);
  m.arrived(0, "A");
  m.feedback(10, ["p1", "p2"]);
  m.arrived(20, "B");
  m.arrived(50, "C");
  m.feedback(60, ["p3"]);
  m.token(100, "A");
  m.arrived(100, "D");
  m.trained(110, [{ id: "p1", dpoLoss: 0.5 }, { id: "p3", dpoLoss: 0.25 }]);
  m.token(120, "C");
  m.token(130, "A");
  m.finished(140, "D", { promptTokens: 3, outputTokens: 0 });
  m.token(150, "B");
  m.arrived(150, "E");
  m.token(170, "B");
  m.token(180, "A");
  m.token(180, "C");
  m.finished(180, "A", { promptTokens: 10, outputTokens: 3 });
  m.token(190, "C");
  m.token(190, "E");
  m.token(200, "C");
  m.finished(200, "B", { promptTokens: 5, outputTokens: 2 });
  m.finished(200, "C", { promptTokens: 7, outputTokens: 4 });
  m.feedback(210, ["p4"]);
  m.trained(220, [{ id: "p1", dpoLoss: 0.25 }, { id: "p2", dpoLoss: 1.0 }]);
  m.arrived(240, "F");
  m.gpuBusy(0, 50);
  m.gpuBusy(40, 100);
  m.gpuBusy(150, 200);
  m.gpuTime(25);
  return m;
}

const SLO = { ttftSloMs: 100, tbtSloMs: 50 };

Deno.test("metrics: a scripted run gives the hand-computed summary", () => {
  const s = scripted().summary({ ...SLO, wallMs: 250 });
  assert.equal(s.wallMs, 250);
  assert.deepEqual(s.requests, { arrived: 6, finished: 4, cancelled: 0, unfinished: 2 });
  assert.deepEqual(s.tokens, { prompt: 25, output: 10 });
  // TTFT over A B C D E = [40 40 70 100 130]: h = 4p/100.
  assert.equal(s.ttft.count, 5);
  assert.equal(s.ttft.p50, 70);
  near(s.ttft.p90, 118); // 100 + 0.6·30
  near(s.ttft.p99, 128.8); // 100 + 0.96·30
  assert.equal(s.ttft.mean, 76);
  assert.equal(s.ttft.max, 130);
  // TBT pooled = [10 10 20 30 50 60]: h = 5p/100.
  assert.deepEqual({ ...s.tbt, p99: null }, {
    count: 6,
    p50: 25,
    p90: 55,
    p99: null,
    mean: 30,
    max: 60,
  });
  near(s.tbt.p99, 59.5);
  // E2E over A B C D = [40 150 180 180].
  assert.deepEqual({ ...s.e2e, p90: null }, {
    count: 4,
    p50: 165,
    p90: null,
    p99: 180,
    mean: 137.5,
    max: 180,
  });
  near(s.e2e.p90, 180);
  assert.deepEqual(s.slo, {
    ttftMs: 100,
    tbtMs: 50,
    met: 2,
    attainment: 0.5,
    unfinishedViolated: 1,
  });
  assert.equal(s.throughputTokensPerSecond, 40); // 10 tokens / 0.25 s
  assert.equal(s.gpuBusyMs, 175);
  assert.equal(s.gpuBusyFraction, 0.7);
  assert.deepEqual(s.finetune, {
    pairsTrained: 4,
    uniquePairsTrained: 3,
    pairsPerSecond: 16,
    meanDpoLoss: 0.5,
    lastDpoLoss: 0.625,
  });
  assert.equal(s.feedbackReceived, 4);
  // Area 2·50 + 3·50 + 1·100 + 2·10 + 1·30 = 400 over 250 ms; delays p1 100, p3 50, p2 210.
  assert.deepEqual(s.staleness, {
    current: 1,
    meanOverTime: 1.6,
    max: 3,
    meanAgeMs: 40,
    meanTrainDelayMs: 120,
  });
});

Deno.test("metrics: without wallMs the window runs from the start to the latest event", () => {
  const s = scripted().summary(SLO);
  assert.equal(s.wallMs, 240);
  // E's open gap is now 240 - 190 = 50 = SLO: not a violation.
  assert.equal(s.slo.unfinishedViolated, 0);
  assert.equal(s.staleness.meanAgeMs, 30);
  // Without a startMs the window starts at the earliest event.
  const m = new MetricsRecorder();
  m.arrived(1000, 1);
  m.token(1100, 1);
  m.finished(1100, 1, { promptTokens: 1, outputTokens: 1 });
  const t = m.summary(SLO);
  assert.equal(t.wallMs, 100);
  assert.equal(t.throughputTokensPerSecond, 10);
});

Deno.test("metrics: empty recorders give nulls and zeros, never NaN", () => {
  const empty = { count: 0, p50: null, p90: null, p99: null, mean: null, max: null };
  const s = new MetricsRecorder().summary(SLO);
  assert.equal(s.wallMs, 0);
  assert.deepEqual([s.ttft, s.tbt, s.e2e], [empty, empty, empty]);
  assert.equal(s.slo.attainment, null);
  assert.equal(s.throughputTokensPerSecond, null);
  assert.equal(s.gpuBusyFraction, null);
  assert.equal(s.finetune.pairsPerSecond, null);
  assert.equal(s.finetune.meanDpoLoss, null);
  assert.deepEqual(s.staleness, {
    current: 0,
    meanOverTime: null,
    max: 0,
    meanAgeMs: null,
    meanTrainDelayMs: null,
  });
  // An empty window of known length: rates are 0, not null.
  const w = new MetricsRecorder(0).summary({ ...SLO, wallMs: 1000 });
  assert.equal(w.throughputTokensPerSecond, 0);
  assert.equal(w.gpuBusyFraction, 0);
  assert.equal(w.finetune.pairsPerSecond, 0);
  assert.equal(w.staleness.meanOverTime, 0);
  assert.doesNotThrow(() => assertPlainJson(w));
  assert.doesNotThrow(() => assertPlainJson(s));
});

Deno.test("metrics: percentiles interpolate linearly between closest ranks", () => {
  assert.equal(percentile([], 50), null);
  assert.equal(percentile([7], 99), 7);
  const hundredAndOne = Array.from({ length: 101 }, (_, i) => i * 2); // h = p exactly
  assert.equal(percentile(hundredAndOne, 50), 100);
  assert.equal(percentile(hundredAndOne, 99), 198);
  assert.equal(percentile([1, 3], 50), 2);
  assert.equal(percentile([1, 3], 100), 3);
  assert.deepEqual(distribution([3, 1, 2]), {
    count: 3,
    p50: 2,
    p90: 2.8,
    p99: 2.98,
    mean: 2,
    max: 3,
  });
});

Deno.test("metrics: SLO edges — exactly at the SLO meets it, just above misses it", () => {
  const m = new MetricsRecorder(0);
  const run = (id: string, arrive: number, tokens: number[]) => {
    m.arrived(arrive, id);
    for (const t of tokens) m.token(t, id);
    m.finished(tokens.at(-1) ?? arrive, id, { promptTokens: 1, outputTokens: tokens.length });
  };
  run("ttft-at", 0, [100, 150, 200]); // TTFT 100, gaps 50 50: met
  run("ttft-over", 0, [100.5]); // TTFT 100.5: missed
  run("tbt-over", 0, [10, 60, 110.25]); // second gap 50.25: missed (max, not mean, decides)
  run("one-token", 0, [100]); // no gap: the TBT part is met
  run("zero-tokens", 0, []); // TTFT = finish - arrival = 0: met
  const s = m.summary(SLO);
  assert.equal(s.slo.met, 3);
  assert.equal(s.slo.attainment, 3 / 5);
  // Zero SLOs are legal: only instantaneous requests meet them.
  assert.equal(m.summary({ ttftSloMs: 0, tbtSloMs: 0 }).slo.met, 1);
});

Deno.test("metrics: unfinished requests count as violations once an SLO is already missed", () => {
  const m = new MetricsRecorder(0);
  m.arrived(0, "waiting"); // no token by the end
  m.arrived(0, "stalled");
  m.token(10, "stalled");
  const at = (wallMs: number) => m.summary({ ...SLO, wallMs }).slo.unfinishedViolated;
  assert.equal(at(60), 0); // waited 60 ≤ 100, open gap 50 ≤ 50
  assert.equal(at(61), 1); // stalled: open gap 51
  assert.equal(at(101), 2); // waiting: no first token after 101 ms
  assert.equal(m.summary({ ...SLO, wallMs: 101 }).slo.attainment, null); // nothing finished
});

Deno.test("metrics: staleness is tracked over time, mid-run summaries included", () => {
  const m = new MetricsRecorder(0);
  m.feedback(0, [1]);
  const mid = m.summary({ ...SLO, wallMs: 100 });
  assert.deepEqual(mid.staleness, {
    current: 1,
    meanOverTime: 1,
    max: 1,
    meanAgeMs: 100,
    meanTrainDelayMs: null,
  });
  // Train pair 1 and receive pair 2 at the same instant: the count never reads 2.
  m.trained(100, [{ id: 1, dpoLoss: 0.7 }]);
  m.feedback(100, [2, 3]);
  m.trained(300, [{ id: 2, dpoLoss: 0.1 }, { id: "seed", dpoLoss: 0.1 }]); // "seed": not feedback
  const s = m.summary({ ...SLO, wallMs: 400 });
  // 1 on [0,100), 2 on [100,300), 1 on [300,400]: area 100 + 400 + 100 = 600.
  assert.deepEqual(s.staleness, {
    current: 1,
    meanOverTime: 1.5,
    max: 2,
    meanAgeMs: 300,
    meanTrainDelayMs: 150,
  });
  assert.equal(s.finetune.pairsTrained, 3);
  assert.equal(s.finetune.uniquePairsTrained, 3);
  assert.equal(s.feedbackReceived, 3);
});

Deno.test("metrics: cancelled requests leave SLO share and E2E, keep their token samples", () => {
  const m = new MetricsRecorder(0);
  m.arrived(0, 1);
  m.token(500, 1);
  m.token(600, 1);
  m.cancelled(650, 1);
  const s = m.summary(SLO);
  assert.deepEqual(s.requests, { arrived: 1, finished: 0, cancelled: 1, unfinished: 0 });
  assert.equal(s.ttft.p50, 500);
  assert.equal(s.tbt.p50, 100);
  assert.equal(s.e2e.count, 0);
  assert.equal(s.slo.attainment, null);
  assert.equal(s.slo.unfinishedViolated, 0);
});

Deno.test("metrics: events out of contract throw MetricsUsageError, change nothing", () => {
  const m = new MetricsRecorder(0);
  m.arrived(10, 1);
  m.token(20, 1);
  m.feedback(30, ["b"]);
  const before = m.summary(SLO);
  const bad: [string, () => void][] = [
    ["token before arrival", () => m.token(5, 2)],
    ["duplicate arrival", () => m.arrived(30, 1)],
    ["time backwards", () => m.token(15, 1)],
    ["before start", () => m.arrived(-1, 3)],
    ["NaN time", () => m.arrived(NaN, 4)],
    ["token count mismatch", () => m.finished(30, 1, { promptTokens: 1, outputTokens: 2 })],
    ["reversed interval", () => m.gpuBusy(50, 40)],
    ["negative gpu time", () => m.gpuTime(-1)],
    ["duplicate feedback", () => m.feedback(40, ["c", "c"])],
    ["feedback id reused", () => m.feedback(40, ["b"])],
    ["trained before received", () => m.trained(25, [{ id: "b", dpoLoss: 1 }])],
    ["NaN loss", () => m.trained(40, [{ id: "b", dpoLoss: NaN }])],
    ["window too short", () => m.summary({ ...SLO, wallMs: 10 })],
  ];
  for (const [what, f] of bad) assert.throws(f, MetricsUsageError, what);
  assert.deepEqual(m.summary(SLO), before);
  m.finished(30, 1, { promptTokens: 1, outputTokens: 1 });
  assert.throws(() => m.token(40, 1), MetricsUsageError); // already ended
});

Deno.test("metrics: the table is fixed-width with one row per policy", () => {
  const rows = [
    { name: "mace", summary: scripted().summary({ ...SLO, wallMs: 250 }) },
    { name: "inference-only", summary: new MetricsRecorder().summary(SLO) },
  ];
  const table = formatSummaryTable(rows);
  const lines = table.trimEnd().split("\n");
  assert.equal(lines.length, 4);
  assert.ok(lines[0].startsWith("policy" + " ".repeat(11) + "ttft p50"), lines[0]);
  assert.ok(lines.every((l) => l.length === lines[0].length), table);
  assert.match(
    lines[2],
    /^mace +70\.0 +128\.8 +25\.0 +59\.5 +165 +50\.0 +40\.0 +70\.0 +16\.00 +1\.6 +3 +4\/6$/,
  );
  assert.match(lines[3], /^inference-only( +-){10} +0 +0\/0$/);
});

/** Every leaf is a finite number, a string, a boolean or null. */
function assertPlainJson(v: unknown, path = "$"): void {
  if (v === null || typeof v === "string" || typeof v === "boolean") return;
  if (typeof v === "number") return assert.ok(Number.isFinite(v), `${path} = ${v}`);
  assert.ok(typeof v === "object" && v !== undefined, `${path} is ${typeof v}`);
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
    assertPlainJson(x, `${path}.${k}`);
  }
}
