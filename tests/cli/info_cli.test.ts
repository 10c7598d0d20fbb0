/**
 * `mace info` run as a user runs it (a subprocess on wgpu): the adapter with its features and
 * limits, the model's config when given one, and clear errors for bad flags.
 */
import assert from "node:assert/strict";
import { mace, ROOT } from "../helpers/cli.ts";

const MODEL = "models/stories260K";

Deno.test("cli: info --json names the wgpu adapter, its features and limits", async () => {
  const { code, stdout, stderr } = await mace("info", "--backend", "wgpu", "--json");
  assert.equal(code, 0, stderr);
  const info = JSON.parse(stdout);
  assert.equal(info.backend, "wgpu");
  assert.equal(typeof info.adapter, "string");
  assert.ok(info.adapter.length > 0);
  assert.equal(info.software, true, "the test machine has lavapipe only");
  for (const feature of ["shaderF16", "subgroups", "timestampQuery"]) {
    assert.equal(typeof info.features[feature], "boolean", feature);
  }
  assert.ok(info.limits.maxStorageBufferBindingSize >= 128 << 20);
  assert.ok(info.limits.maxComputeWorkgroupsPerDimension >= 65535);
  assert.equal(info.model, undefined, "no --model, no model section");
});

Deno.test("cli: info --model reports the bundled config.json and parameter count", async () => {
  const { code, stdout, stderr } = await mace(
    "info",
    "--backend",
    "wgpu",
    "--model",
    MODEL,
    "--json",
  );
  assert.equal(code, 0, stderr);
  const model = JSON.parse(stdout).model;
  const hf = JSON.parse(await Deno.readTextFile(`${ROOT}${MODEL}/config.json`));
  assert.equal(model.path, MODEL);
  assert.equal(model.architecture, "llama");
  assert.equal(model.hiddenSize, hf.hidden_size);
  assert.equal(model.intermediateSize, hf.intermediate_size);
  assert.equal(model.numLayers, hf.num_hidden_layers);
  assert.equal(model.numHeads, hf.num_attention_heads);
  assert.equal(model.numKvHeads, hf.num_key_value_heads);
  assert.equal(model.headDim, hf.hidden_size / hf.num_attention_heads);
  assert.equal(model.vocabSize, hf.vocab_size);
  assert.equal(model.maxPositionEmbeddings, hf.max_position_embeddings);
  assert.equal(model.rmsNormEps, hf.rms_norm_eps);
  assert.equal(model.ropeTheta, hf.rope_theta);
  assert.equal(model.tieWordEmbeddings, hf.tie_word_embeddings);
  // Tied embedding [V, D] + per layer q, k, v, o, gate, up, down and two norms + final norm.
  const D = hf.hidden_size, I = hf.intermediate_size, kv = model.numKvHeads * model.headDim;
  const perLayer = 2 * D * D + 2 * D * kv + 3 * D * I + 2 * D;
  assert.equal(model.parameters, hf.vocab_size * D + hf.num_hidden_layers * perLayer + D);
  assert.equal(model.parameters, 260_032, "the 260K of stories260K");
});

Deno.test("cli: info without --json prints the same object, indented", async () => {
  const [plain, json] = await Promise.all([
    mace("info", "--backend", "wgpu", "--model", MODEL),
    mace("info", "--backend", "wgpu", "--model", MODEL, "--json"),
  ]);
  assert.equal(plain.code, 0, plain.stderr);
  assert.ok(plain.stdout.trim().split("\n").length > 10, "one field per line");
  assert.deepEqual(JSON.parse(plain.stdout), JSON.parse(json.stdout));
});

Deno.test("cli: info rejects bad flags with a named error and exit code 1", async (t) => {
  const cases: [string[], RegExp][] = [
    [["--backend", "cuda"], /InvalidRequestError: --backend cuda: expected auto, wgpu or dawn/],
    [["--model", "/nonexistent"], /ModelFormatError: \/nonexistent: no such file or folder/],
    [["--frobnicate"], /InvalidRequestError: info: .*frobnicate/],
  ];
  for (const [flags, message] of cases) {
    await t.step(flags.join(" "), async () => {
      const { code, stdout, stderr } = await mace("info", ...flags);
      assert.equal(code, 1, stderr);
      assert.match(stderr, message);
      assert.doesNotMatch(stderr, /Uncaught|panicked/);
      assert.equal(stdout, "");
    });
  }
});
