/**
 * `mace convert` run as a user runs it (a subprocess): the llama2.c checkpoint bundled in
 * models/stories260K (stories260K.bin + tok512.bin) converts to a Hugging Face folder equal to
 * the bundled one, which loads and generates the golden greedy text; bad input is a named error
 * that writes nothing.
 */
import assert from "node:assert/strict";
import { mace, ROOT } from "../helpers/cli.ts";

const BUNDLED = `${ROOT}models/stories260K`;
const JSON_FILES = [
  "config.json",
  "generation_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
];
const GOLDEN = (await Deno.readTextFile(`${BUNDLED}/greedy_200.txt`)).replace(/\n$/, "");

/** 40 greedy tokens from BOS (generate --json). */
async function greedy(model: string): Promise<{ tokens: number[]; text: string }> {
  const json = await mace(
    "generate",
    "--backend",
    "wgpu",
    "--model",
    model,
    "--max-tokens",
    "40",
    "--json",
  );
  assert.equal(json.code, 0, json.stderr);
  return JSON.parse(json.stdout);
}

Deno.test("cli: convert of the llama2.c checkpoint gives the bundled HF folder", async () => {
  const out = await Deno.makeTempDir({ prefix: "mace-convert-" });
  try {
    const run = await mace("convert", "--llama2c", `${BUNDLED}/stories260K.bin`, "--out", out);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.trim(), `wrote ${out}`);
    const written = [...Deno.readDirSync(out)].map((e) => e.name).sort();
    assert.deepEqual(written, [...JSON_FILES, "model.safetensors"].sort());
    // Same tensors, same order, same F32 bytes (q/k rows in HF's rotary layout).
    assert.deepEqual(
      await Deno.readFile(`${out}/model.safetensors`),
      await Deno.readFile(`${BUNDLED}/model.safetensors`),
    );
    for (const name of JSON_FILES) {
      assert.deepEqual(
        JSON.parse(await Deno.readTextFile(`${out}/${name}`)),
        JSON.parse(await Deno.readTextFile(`${BUNDLED}/${name}`)),
        name,
      );
    }
    // The converted folder loads and decodes greedily exactly as the bundled model does.
    const converted = await greedy(out);
    assert.deepEqual(converted.tokens, (await greedy(BUNDLED)).tokens);
    assert.equal(converted.tokens.length, 40);
    assert.ok(GOLDEN.startsWith(converted.text), `"${converted.text}" is not the golden start`);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});

Deno.test("cli: convert: bad input is a named error, exit code 1, nothing written", async (t) => {
  const out = await Deno.makeTempDir({ prefix: "mace-convert-bad-" });
  const target = `${out}/model`;
  try {
    const cases: [string[], RegExp][] = [
      [
        ["--llama2c", `${BUNDLED}/stories260K.bin`],
        /InvalidRequestError: convert needs --llama2c FILE and --out DIR/,
      ],
      [["--llama2c", "/nonexistent.bin", "--out", target], /ModelFormatError: \/nonexistent\.bin/],
      [
        ["--llama2c", `${BUNDLED}/config.json`, "--out", target],
        /ModelFormatError: .*config\.json: bad llama2\.c header/,
      ],
      [
        [
          "--llama2c",
          `${BUNDLED}/stories260K.bin`,
          "--tokenizer",
          "/nonexistent.bin",
          "--out",
          target,
        ],
        /ModelFormatError: \/nonexistent\.bin: file not found/,
      ],
      [
        [
          "--llama2c",
          `${BUNDLED}/stories260K.bin`,
          "--tokenizer",
          `${BUNDLED}/config.json`,
          "--out",
          target,
        ],
        /ModelFormatError: .*config\.json/,
      ],
      [["--out", target, "--frobnicate"], /InvalidRequestError: convert: .*frobnicate/],
    ];
    for (const [flags, message] of cases) {
      await t.step(flags.join(" "), async () => {
        const { code, stderr } = await mace("convert", ...flags);
        assert.equal(code, 1, stderr);
        assert.match(stderr, message);
        assert.doesNotMatch(stderr, /Uncaught|panicked/);
        await assert.rejects(Deno.stat(target), Deno.errors.NotFound, "nothing was written");
      });
    }
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
