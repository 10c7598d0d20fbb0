/**
 * `mace loadtest` run as a user runs it (a subprocess on wgpu): a short Poisson load with
 * feedback served through the engine worker on the bundled model, then simulated. The report has
 * both runs' metrics under the same names and the simulator's error per metric.
 */
import assert from "node:assert/strict";
import { mace } from "../helpers/cli.ts";

Deno.test("cli: loadtest serves load and feedback via the worker, vs the simulator", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mace-loadtest-" });
  try {
    const out = `${dir}/report.json`;
    const run = await mace(
      "loadtest",
      "--backend",
      "wgpu",
      "--duration",
      "8",
      "--rate",
      "1.5",
      "--retrain-rate",
      "0.5",
      "--max-prompt",
      "48",
      "--max-output",
      "24",
      "--seed",
      "3",
      "--out",
      out,
    );
    const { stdout, stderr } = run;
    assert.equal(run.code, 0, stderr);
    assert.match(stdout, /^live\s/m);
    assert.match(stdout, /^simulated\s/m);
    const report = JSON.parse(await Deno.readTextFile(out));
    assert.equal(report.schema, "mace.loadtest.v1");
    const live = report.live.summary, sim = report.simulated.summary;
    // Every request was served live, each with exactly its output length (EOS ignored).
    assert.equal(live.requests.finished, report.requests);
    assert.equal(sim.requests.finished, report.requests);
    assert.equal(live.tokens.output, sim.tokens.output);
    assert.equal(live.feedbackReceived, report.feedbackPairs);
    assert.ok(report.feedbackPairs > 0, "some requests sent feedback");
    assert.ok(report.live.prediction.steps > 0 && report.live.prediction.meanAbsPercentError >= 0);
    for (
      const [name, e] of Object.entries(report.comparison) as [
        string,
        { live: number | null; simulated: number | null },
      ][]
    ) {
      if (name === "ft pairs/s" || name === "slo attainment") continue;
      assert.ok(e.live !== null && e.live > 0 && e.simulated !== null && e.simulated > 0, name);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
