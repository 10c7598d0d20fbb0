/**
 * `mace bench` run as a user runs it (a subprocess on wgpu), at a tiny size on the bundled
 * model: the JSON result on stdout with positive prefill and decode speeds, the same result
 * written under bench/results/, and clear errors for bad flags.
 */
import assert from "node:assert/strict";
import { mace } from "../helpers/cli.ts";

Deno.test("cli: bench --json measures prefill and decode, writes what it prints", async () => {
  const { code, stdout, stderr } = await mace(
    "bench",
    "--backend",
    "wgpu",
    "--model",
    "models/stories260K",
    "--prompt-tokens",
    "8",
    "--gen-tokens",
    "8",
    "--json",
  );
  assert.equal(code, 0, stderr);
  const written = stderr.match(/^wrote (.*\.json)$/m)?.[1];
  assert.ok(written, `no "wrote FILE" in: ${stderr}`);
  try {
    const lines = stdout.trim().split("\n");
    assert.equal(lines.length, 1, "one JSON line per measured model");
    const { baseline, ...result } = JSON.parse(lines[0]);
    assert.deepEqual(JSON.parse(await Deno.readTextFile(written)), result);
    assert.equal(result.name, "stories260K");
    assert.equal(result.backend, "wgpu");
    assert.equal(result.weightDtype, "f32");
    assert.deepEqual([result.promptTokens, result.genTokens], [8, 8]);
    assert.equal(result.config.numLayers, 5);
    assert.ok(result.prefillTokensPerSecond > 0, `prefill ${result.prefillTokensPerSecond}`);
    assert.ok(result.decodeTokensPerSecond > 0, `decode ${result.decodeTokensPerSecond}`);
    assert.ok(result.weightBandwidthGBs > 0 && result.copyBandwidthGBs > 0);
    // F32 weights: 4 bytes for each of the 260,032 parameters.
    assert.equal(result.memory.weightBytes, 260_032 * 4);
    assert.ok(result.peakGpuBytes >= result.memory.weightBytes);
    for (const phase of ["prefill", "decode"]) {
      const kinds = result.kernels[phase].map((k: { kind: string }) => k.kind);
      for (const kind of ["embedding", "rms_norm", "matmul", "swiglu", "sample"]) {
        assert.ok(kinds.includes(kind), `${phase} timed ${kind}: ${kinds}`);
      }
    }
    // Baselines are recorded for other sizes; this one has none to compare with.
    assert.equal(baseline, null);
  } finally {
    await Deno.remove(written);
  }
});

Deno.test("cli: bench rejects bad flags with a named error and exit code 1", async (t) => {
  const model = ["--backend", "wgpu", "--model", "models/stories260K"];
  const cases: [string[], RegExp][] = [
    [["--steps", "3"], /InvalidRequestError: --steps: only with --train/],
    [["--rounds", "2"], /InvalidRequestError: --rounds: only with --batch/],
    [["--layers", "2"], /InvalidRequestError: --layers: only with --batch or --train/],
    [["--weights", "f8"], /InvalidRequestError: --weights f8: expected f32 or f16/],
    [[...model, "--prompt-tokens", "0"], /InvalidRequestError: --prompt-tokens 0 is not a valid/],
    [
      ["--backend", "wgpu", "--preset", "gpt-5"],
      /InvalidRequestError: --preset gpt-5: expected one of smollm2-135m, qwen2\.5-0\.5b, all/,
    ],
    [["--frobnicate"], /InvalidRequestError: bench: .*frobnicate/],
  ];
  for (const [flags, message] of cases) {
    await t.step(flags.join(" "), async () => {
      const { code, stderr } = await mace("bench", ...flags);
      assert.equal(code, 1, stderr);
      assert.match(stderr, message);
      assert.doesNotMatch(stderr, /Uncaught|panicked|wrote/);
    });
  }
});
