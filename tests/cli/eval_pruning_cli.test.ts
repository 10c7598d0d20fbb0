/**
 * `mace eval-pruning` run as a user runs it (a subprocess on wgpu), at a short length on the
 * bundled model: the log-likelihood of a sampled text with the full KV cache, with H2O pruning
 * and with sinks + a recency window at the same budget, printed and written as JSON.
 */
import assert from "node:assert/strict";
import { mace } from "../helpers/cli.ts";

const POLICIES = ["full KV", "H2O (sinks+window+heavy)", "sinks+window"];
/** Tokens per KV block in eval-pruning's runner. */
const BLOCK_TOKENS = 16;

Deno.test("cli: eval-pruning scores the full cache and both policies at a budget", async () => {
  const { code, stdout, stderr } = await mace(
    "eval-pruning",
    "--backend",
    "wgpu",
    "--length",
    "64",
    "--seed",
    "3",
  );
  assert.equal(code, 0, stderr);
  const written = stderr.match(/^wrote (.*\.json)$/m)?.[1];
  assert.ok(written, `no "wrote FILE" in: ${stderr}`);
  try {
    assert.match(stdout, /: 64 tokens, KV budget 32 tokens \(50%\), sinks 4, window 6, wgpu$/m);
    const report = JSON.parse(await Deno.readTextFile(written));
    assert.deepEqual([report.length, report.budget, report.sinks, report.window], [64, 32, 4, 6]);
    assert.deepEqual(Object.keys(report.runs), POLICIES);
    const full = report.runs["full KV"];
    assert.equal(full.evictedTokens, 0);
    assert.equal(full.peakBlocks * BLOCK_TOKENS, 64, "the whole text stays cached");
    for (const name of POLICIES) {
      const run = report.runs[name];
      assert.equal(run.tokensScored, 63, `${name}: every token after BOS`);
      assert.ok(Number.isFinite(run.logLikelihood) && run.logLikelihood < 0, name);
      // The printed row: log-likelihood and its change from the full cache, two decimals.
      const row = stdout.split("\n").find((l) => l.startsWith(name.padEnd(26)));
      assert.ok(row, `no row for ${name} in:\n${stdout}`);
      const [logLik, change] = row.slice(26).trim().split(/\s+/).map(Number);
      assert.equal(logLik, Number(run.logLikelihood.toFixed(2)));
      assert.equal(change, Number((run.logLikelihood - full.logLikelihood).toFixed(2)));
      if (name === "full KV") continue;
      assert.ok(run.evictedTokens > 0 && run.pruneEvents > 0, `${name} pruned`);
      assert.ok(run.peakBlocks * BLOCK_TOKENS <= report.budget, `${name} stays in the budget`);
    }
  } finally {
    await Deno.remove(written);
  }
});

Deno.test("cli: eval-pruning rejects bad flags with a named error and exit code 1", async (t) => {
  const cases: [string[], RegExp][] = [
    [["--length", "16"], /InvalidRequestError: --length 16 is not a valid value/],
    [["--budget-percent", "100"], /InvalidRequestError: --budget-percent 100 is not a valid/],
    [["--sinks", "1.5"], /InvalidRequestError: --sinks 1\.5 is not a valid value/],
    [["--model", "/nonexistent", "--backend", "wgpu"], /ModelFormatError: \/nonexistent/],
    [["--frobnicate"], /InvalidRequestError: eval-pruning: .*frobnicate/],
  ];
  for (const [flags, message] of cases) {
    await t.step(flags.join(" "), async () => {
      const { code, stderr } = await mace("eval-pruning", ...flags);
      assert.equal(code, 1, stderr);
      assert.match(stderr, message);
      assert.doesNotMatch(stderr, /Uncaught|panicked|wrote/);
    });
  }
});
