/**
 * The `mace generate` command line, run as a user runs it (a subprocess on wgpu): JSON output,
 * a JSONL workload, and clear errors for bad input.
 */
import assert from "node:assert/strict";
import { mace, ROOT } from "../helpers/cli.ts";

const GOLDEN = (await Deno.readTextFile(ROOT + "models/stories260K/greedy_200.txt")).replace(
  /\n$/,
  "",
);

Deno.test("cli: generate --json from BOS: golden greedy start, TTFT, token times", async () => {
  const { code, stdout } = await mace(
    "generate",
    "--backend",
    "wgpu",
    "--max-tokens",
    "30",
    "--json",
  );
  assert.equal(code, 0);
  const out = JSON.parse(stdout);
  assert.equal(out.tokens.length, 30);
  assert.ok(GOLDEN.startsWith(out.text), `"${out.text}" is not the start of the golden text`);
  assert.equal(out.tokenTimesMs.length, 29);
  assert.ok(out.ttftMs > 0 && out.decodeTokensPerSecond > 0);
  assert.equal(out.loraAdapter, null);
});

Deno.test("cli: generate --prompts runs a JSONL workload, one line per prompt", async () => {
  const file = await Deno.makeTempFile({ suffix: ".jsonl" });
  await Deno.writeTextFile(
    file,
    [
      JSON.stringify({ prompt: "", max_tokens: 12 }),
      JSON.stringify({ prompt: "Lily went", max_tokens: 5, seed: 3, temperature: 0.8 }),
      "",
      JSON.stringify({ prompt: "Once upon a time", max_tokens: 7 }),
    ].join("\n"),
  );
  const { code, stdout } = await mace("generate", "--backend", "wgpu", "--prompts", file);
  assert.equal(code, 0);
  const lines = stdout.trim().split("\n").map((l) => JSON.parse(l));
  assert.deepEqual(lines.map((l) => l.tokens.length), [12, 5, 7]);
  assert.ok(GOLDEN.startsWith(lines[0].text));
  for (const l of lines) assert.equal(l.tokenTimesMs.length, l.tokens.length - 1);
});

Deno.test("cli: bad input is a named error with the fix, exit 1 or 2, no crash", async (t) => {
  const file = await Deno.makeTempFile({ suffix: ".jsonl" });
  await Deno.writeTextFile(file, `{"prompt": "ok"}\n{"prompt": 3}\n`);
  const cases: [string[], number, RegExp][] = [
    [["generate", "--prompts", file], 1, /InvalidRequestError: .*:2: "prompt" must be a string/],
    [
      ["generate", "--max-tokens", "0"],
      1,
      /InvalidRequestError: --max-tokens 0 is not a valid value/,
    ],
    [["generate", "--frobnicate"], 1, /InvalidRequestError: generate: .*frobnicate/],
    [["generate", "--backend", "metal"], 1, /--backend metal: expected auto, wgpu or dawn/],
    [
      ["generate", "--backend", "wgpu", "--max-tokens", "600"],
      1,
      /exceeds the context of 512 tokens/,
    ],
    [["generate", "--model", "/nonexistent"], 1, /ModelFormatError: \/nonexistent/],
    [["frobnicate"], 2, /unknown command "frobnicate"/],
  ];
  for (const [args, exitCode, message] of cases) {
    await t.step(args.join(" "), async () => {
      const { code, stderr } = await mace(...args);
      assert.equal(code, exitCode, stderr);
      assert.match(stderr, message);
      assert.doesNotMatch(stderr, /Uncaught|panicked/);
    });
  }
});
