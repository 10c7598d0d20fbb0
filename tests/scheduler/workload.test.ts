import assert from "node:assert/strict";
import {
  type Arrival,
  type LengthRow,
  loadTrace,
  namedTrace,
  parseAzureTrace,
  parseShareGptLengths,
  poissonWorkload,
  traceRate,
  type TraceRow,
  traceWorkload,
} from "../../src/scheduler/sim/workload.ts";
import { InvalidRequestError, TraceFormatError } from "../../src/engine/errors.ts";

// The shipped traces, parsed once (about 60k rows, well under a second).
const conv = await timedTrace("azure-conv");
const code = await timedTrace("azure-code");
const sharegpt = await lengthsTrace("sharegpt");

async function timedTrace(name: string): Promise<TraceRow[]> {
  const trace = await loadTrace(name);
  assert.equal(trace.kind, "timed", name);
  return trace.rows as TraceRow[];
}

async function lengthsTrace(name: string): Promise<LengthRow[]> {
  const trace = await loadTrace(name);
  assert.equal(trace.kind, "lengths", name);
  return trace.rows as LengthRow[];
}

const feedbackShare = (a: Arrival[]) => a.filter((x) => x.feedback).length / a.length;

Deno.test("workload: the shipped traces parse whole, with the published row counts", () => {
  assert.equal(conv.length, 19_366);
  assert.equal(code.length, 8_819);
  assert.equal(sharegpt.length, 30_731);
  assert.deepEqual(conv[0], { atMs: 0, promptTokens: 374, outputTokens: 44 });
  assert.deepEqual(sharegpt[0], { promptTokens: 74, outputTokens: 918 });
  // Last conv row: 2023-11-16 19:14:08.4025270 − 18:15:46.6805900.
  assert.deepEqual(conv[conv.length - 1], {
    atMs: 3_501_721.937,
    promptTokens: 197,
    outputTokens: 183,
  });
  for (const rows of [conv, code]) {
    for (let i = 1; i < rows.length; i++) assert.ok(rows[i].atMs >= rows[i - 1].atMs);
  }
});

Deno.test("workload: Azure timestamps keep their 100 ns digits (exact to 0.1 ms and below)", () => {
  // 18:15:50.9951690 − 18:15:46.6805900 = 4.3145790 s; 18:15:51.2224670 − … = 4.5418770 s.
  assert.equal(conv[1].atMs, 4314.579);
  assert.equal(conv[2].atMs, 4541.877);
  const rows = parseAzureTrace(
    "TIMESTAMP,ContextTokens,GeneratedTokens\r\n" +
      "2023-12-31 23:59:59.9999999,1,1\r\n" +
      "2024-01-01 00:00:00.0000001,2,2\r\n" + // across midnight and a year: 0.2 µs later
      "2024-01-01 00:00:00.5,3,3\r\n" + // fewer than 7 digits: a fraction, not ticks
      "2024-01-01 00:00:01,4,4\r\n", // no fraction at all
  );
  assert.deepEqual(rows.map((r) => r.atMs), [0, 0.0002, 500.0001, 1000.0001]);
});

Deno.test("workload: named traces are the shipped files; bad names and paths throw", async () => {
  assert.match(
    namedTrace("azure-code"),
    /data\/traces\/azure-llm-2023\/AzureLLMInferenceTrace_code\.csv$/,
  );
  assert.throws(() => namedTrace("azure"), InvalidRequestError);
  await assert.rejects(loadTrace("/nonexistent/trace.csv"), TraceFormatError);
  const timed = await loadTrace("azure-conv");
  assert.equal(timed.kind, "timed");
  assert.equal(timed.rows.length, 19_366);
  assert.equal((await loadTrace(namedTrace("sharegpt"))).kind, "lengths");
});

Deno.test("workload: malformed rows throw TraceFormatError with file and line", () => {
  const H = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  const ok = "2023-11-16 18:15:46.6805900,374,44\n";
  const cases: Array<[string, number | undefined, RegExp]> = [
    [H + ok + "2023-11-16 18:15:47.0,12,x\n", 3, /GeneratedTokens is "x"/],
    [H + ok + "2023-11-16 18:15:47.0,12\n", 3, /2 columns, expected 3/],
    // The blank line still counts.
    [H + ok + "\n2023-11-16 18:15:47.0,-1,3\n", 4, /ContextTokens is "-1"/],
    [H + ok + "2023-11-16 18:15:47.12345678,1,1\n", 3, /malformed/], // 8 fractional digits
    [H + ok + "2023-11-16T18:15:47/0,1,1\n", 3, /malformed/],
    [H + ok + "2023-02-30 18:15:47.0,1,1\n", 3, /not a valid date/],
    [H + ok + "2023-11-16 24:00:00.0,1,1\n", 3, /not a valid time/],
    [H + ok + "2023-11-16 18:15:46.6805899,1,1\n", 3, /earlier than the row before/],
    ["time,ctx,gen\n" + ok, 1, /header/],
    [H, undefined, /no data rows/],
    ["", undefined, /empty file/],
  ];
  for (const [text, line, message] of cases) {
    assert.throws(() => parseAzureTrace(text, "t.csv"), (e: unknown) => {
      assert.ok(e instanceof TraceFormatError, String(e));
      assert.equal(e.file, "t.csv");
      assert.equal(e.line, line, e.message);
      assert.match(e.message, message);
      assert.ok(
        e.message.startsWith(line === undefined ? "t.csv: " : `t.csv:${line}: `),
        e.message,
      );
      return true;
    });
  }
  const S = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n";
  assert.throws(
    () => parseShareGptLengths(S + "1,2,3,0.5\n4,5,9\n", "s.csv"),
    /s\.csv:3: 3 columns, expected 4/,
  );
  assert.throws(
    () => parseShareGptLengths(S + "1.5,2,3,0.5\n", "s.csv"),
    /s\.csv:2: num_prefill_tokens/,
  );
  assert.throws(() => parseShareGptLengths("a,b\n1,2\n", "s.csv"), TraceFormatError);
});

Deno.test("workload: a trace replayed without a rate keeps its times; startS shifts", () => {
  const a = traceWorkload(conv, { durationS: 60, retrainRate: 0, seed: 1 });
  assert.deepEqual(a.map((x) => x.atMs), conv.filter((r) => r.atMs < 60_000).map((r) => r.atMs));
  assert.deepEqual(a.map((x) => x.id), a.map((_, i) => i));
  const b = traceWorkload(conv, { durationS: 60, startS: 100, retrainRate: 0, seed: 1 });
  const first = conv.findIndex((r) => r.atMs >= 100_000);
  assert.equal(b[0].promptTokens, conv[first].promptTokens);
  assert.ok(Math.abs(b[0].atMs - (conv[first].atMs - 100_000)) < 1e-6);
  assert.ok(b.every((x) => x.atMs >= 0 && x.atMs < 60_000));
});

Deno.test("workload: rate scaling hits the target mean over a long window, also looped", () => {
  for (const rows of [conv, code]) {
    for (const rate of [3, 20]) {
      // ≥ 3 loops of the trace: the trace's burstiness averages out.
      const durationS = (3.3 * rows.length) / rate;
      const a = traceWorkload(rows, { rate, durationS, retrainRate: 0, seed: 1 });
      assert.ok(
        Math.abs(a.length / durationS / rate - 1) < 0.03,
        `${a.length / durationS} vs ${rate}`,
      );
      for (let i = 1; i < a.length; i++) assert.ok(a[i].atMs >= a[i - 1].atMs);
    }
    // Exactly two periods of the scaled trace hold exactly twice its rows.
    const rate = 7;
    const a = traceWorkload(rows, {
      rate,
      durationS: (2 * rows.length) / rate,
      retrainRate: 0,
      seed: 1,
    });
    assert.ok(Math.abs(a.length - 2 * rows.length) <= 1, `${a.length}`);
    assert.equal(a[rows.length].promptTokens, rows[0].promptTokens);
  }
  assert.ok(Math.abs(traceRate(conv) - 5.53) < 0.01);
});

Deno.test("workload: Poisson arrivals hit the rate and draw lengths from the given rows", () => {
  const durationS = 2000;
  const a = poissonWorkload({ rate: 5, durationS, lengths: sharegpt, retrainRate: 0, seed: 7 });
  assert.ok(Math.abs(a.length / durationS / 5 - 1) < 0.03, `${a.length / durationS}`);
  assert.ok(a.every((x) => x.atMs > 0 && x.atMs < durationS * 1000));
  for (let i = 1; i < a.length; i++) assert.ok(a[i].atMs > a[i - 1].atMs);
  const known = new Set(sharegpt.map((r) => `${r.promptTokens},${r.outputTokens}`));
  assert.ok(a.every((x) => known.has(`${x.promptTokens},${x.outputTokens}`)));
});

Deno.test("workload: the same seed gives the same workload; another seed another", () => {
  const p = (seed: number) =>
    poissonWorkload({ rate: 4, durationS: 300, lengths: sharegpt, retrainRate: 0.3, seed });
  assert.deepEqual(p(11), p(11));
  assert.notDeepEqual(p(11).map((x) => x.atMs), p(12).map((x) => x.atMs));
  assert.notDeepEqual(p(11).map((x) => x.promptTokens), p(12).map((x) => x.promptTokens));
  const t = (seed: number) =>
    traceWorkload(conv, { rate: 4, durationS: 300, retrainRate: 0.3, seed });
  assert.deepEqual(t(11), t(11));
  // A trace fixes times and lengths; the seed picks only which requests bring feedback.
  assert.deepEqual(t(11).map((x) => x.atMs), t(12).map((x) => x.atMs));
  assert.notDeepEqual(t(11).map((x) => x.feedback), t(12).map((x) => x.feedback));
});

Deno.test("workload: the retrain rate marks that share of the same arrivals, nested", () => {
  const at = (retrainRate: number) =>
    poissonWorkload({ rate: 10, durationS: 1000, lengths: sharegpt, retrainRate, seed: 3 });
  const [r0, r1, r3, r5, r10] = [0, 0.1, 0.3, 0.5, 1].map(at);
  assert.equal(feedbackShare(r0), 0);
  assert.equal(feedbackShare(r10), 1);
  for (const [a, share] of [[r1, 0.1], [r3, 0.3], [r5, 0.5]] as const) {
    assert.ok(Math.abs(feedbackShare(a) - share) < 0.02, `${feedbackShare(a)} vs ${share}`);
    // Changing the retrain rate changes no arrival: policies compare on the same requests.
    assert.deepEqual(
      a.map((x) => [x.atMs, x.promptTokens]),
      r0.map((x) => [x.atMs, x.promptTokens]),
    );
  }
  assert.ok(r1.every((x, i) => !x.feedback || r3[i].feedback)); // 10% ⊂ 30%
  assert.ok(r3.every((x, i) => !x.feedback || r5[i].feedback)); // 30% ⊂ 50%
  const t = traceWorkload(code, { durationS: 3000, retrainRate: 0.3, seed: 5 });
  assert.ok(Math.abs(feedbackShare(t) - 0.3) < 0.02);
});

Deno.test("workload: lengths clamp to the model's limits, and never below 1 token", () => {
  const o = { durationS: 600, retrainRate: 0, seed: 1, maxPromptTokens: 200, maxOutputTokens: 64 };
  const t = traceWorkload(conv, o);
  const raw = traceWorkload(conv, { ...o, maxPromptTokens: undefined, maxOutputTokens: undefined });
  assert.ok(t.every((x) => x.promptTokens <= 200 && x.outputTokens <= 64));
  assert.ok(t.some((x) => x.promptTokens === 200) && t.some((x) => x.outputTokens === 64));
  assert.ok(t.every((x, i) => x.promptTokens === Math.min(raw[i].promptTokens, 200)));
  const p = poissonWorkload({
    ...o,
    rate: 5,
    lengths: [{ promptTokens: 0, outputTokens: 0 }, { promptTokens: 900, outputTokens: 900 }],
  });
  assert.ok(
    p.every((x) =>
      x.promptTokens >= 1 && x.promptTokens <= 200 && x.outputTokens >= 1 && x.outputTokens <= 64
    ),
  );
});

Deno.test("workload: bad options are InvalidRequestError", () => {
  const base = { durationS: 10, retrainRate: 0.1, seed: 1 };
  const bad: Array<() => unknown> = [
    () => traceWorkload(conv, { ...base, rate: 0 }),
    () => traceWorkload(conv, { ...base, durationS: -1 }),
    () => traceWorkload(conv, { ...base, startS: -5 }),
    () => traceWorkload(conv, { ...base, retrainRate: 1.5 }),
    () => traceWorkload(conv, { ...base, seed: 0.5 }),
    () => traceWorkload(conv, { ...base, maxPromptTokens: 0 }),
    () => traceWorkload([conv[0]], base),
    () => traceWorkload([conv[0], { ...conv[0] }], base), // zero span: would loop forever
    () => traceWorkload([conv[1], conv[0]], base),
    () => poissonWorkload({ ...base, rate: 1, lengths: [] }),
    () => poissonWorkload({ ...base, rate: NaN, lengths: sharegpt }),
    () => poissonWorkload({ ...base, rate: 1, lengths: sharegpt, maxOutputTokens: 2.5 }),
  ];
  for (const f of bad) assert.throws(f, InvalidRequestError);
});
