/**
 * `mace simulate` run as a user runs it (a subprocess), on the shipped trace and profile:
 * every policy's metrics come back under the names of docs/ARCHITECTURE.md, deterministically for
 * a seed; the Markdown table has a row per policy; bad flags are named errors.
 */
import assert from "node:assert/strict";
import { mace } from "../helpers/cli.ts";

Deno.test("cli: simulate prints each policy's metrics as JSON, same for a seed", async () => {
  const args = [
    "simulate",
    "--policy",
    "all",
    "--rate",
    "0.5",
    "--duration",
    "60",
    "--retrain-rate",
    "0.2,0.6",
    "--json",
  ];
  const first = await mace(...args);
  assert.equal(first.code, 0, first.stderr);
  const report = JSON.parse(first.stdout);
  assert.equal(report.schema, "mace.simulation.v1");
  const names = [
    "mace",
    "inference-only",
    "periodic",
    "synchronous",
    "fcfs",
    "mace-no-prefix-sharing",
    "mace-no-kv-pruning",
  ];
  assert.deepEqual(report.rows.map((r: { name: string }) => r.name), [...names, ...names]);
  for (const row of report.rows) {
    const s = row.summary;
    assert.ok(s.requests.arrived > 0 && s.requests.finished === s.requests.arrived, row.name);
    for (const d of [s.ttft, s.tbt]) assert.ok(d.p50 > 0 && d.p99 >= d.p50, row.name);
    assert.ok(s.slo.attainment >= 0 && s.slo.attainment <= 1);
    assert.ok(s.gpuBusyFraction > 0 && s.gpuBusyFraction <= 1);
    assert.ok(row.result.prediction.steps === row.result.iterations);
    if (row.name === "inference-only") assert.equal(s.finetune.pairsTrained, 0);
  }
  // Feedback grows with the retrain rate; the same arrivals at both rates.
  const at = (rate: number, name: string) =>
    report.rows.find((r: { retrainRate: number; name: string }) =>
      r.retrainRate === rate && r.name === name
    ).summary;
  assert.ok(at(0.6, "mace").feedbackReceived > at(0.2, "mace").feedbackReceived);
  assert.equal(at(0.6, "mace").requests.arrived, at(0.2, "mace").requests.arrived);
  const again = await mace(...args);
  assert.equal(again.stdout, first.stdout);
});

Deno.test("cli: simulate --markdown has a row per policy; bad flags are named errors", async () => {
  const md = await mace(
    "simulate",
    "--policy",
    "mace,periodic",
    "--duration",
    "30",
    "--rate",
    "0.5",
    "--markdown",
  );
  assert.equal(md.code, 0, md.stderr);
  assert.match(md.stdout, /^\| policy \| ttft p50 \|/m);
  assert.match(md.stdout, /^\| mace \| /m);
  assert.match(md.stdout, /^\| periodic \| /m);
  for (
    const [args, message] of [
      [["simulate"], /--policy is required/],
      [["simulate", "--policy", "best"], /--policy best: expected one of/],
      [
        ["simulate", "--policy", "mace", "--retrain-rate", "2"],
        /--retrain-rate 2 is not a valid value/,
      ],
      [["simulate", "--policy", "mace", "--trace", "no-such.csv"], /TraceFormatError/],
      [
        ["simulate", "--policy", "mace", "--profile", "no-such.json"],
        /ProfileNotFoundError.*mace profile/,
      ],
      [["simulate", "--policy", "mace", "--trace", "sharegpt"], /Poisson arrivals need --rate/],
    ] as const
  ) {
    const r = await mace(...args);
    assert.equal(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message, args.join(" "));
  }
});
