import assert from "node:assert/strict";
import { expectedTensors, parameterCount } from "../../src/engine/model/config.ts";
import { openModel } from "../../src/engine/model/open_model.ts";
import {
  fillRandomNormal,
  LLAMA32_1B,
  QWEN25_05B,
  randomModelConfig,
  randomModelSource,
  randomTensorData,
  SMOLLM2_135M,
  writeRandomHfModel,
} from "../../src/engine/model/random_model.ts";
import { collect, withTempDir } from "./helpers.ts";

Deno.test("random model: presets have the published shapes and parameter counts", () => {
  const smol = randomModelConfig(SMOLLM2_135M);
  assert.equal(smol.headDim, 64);
  assert.equal(parameterCount(smol), 134_515_008); // SmolLM2-135M
  const qwen = randomModelConfig(QWEN25_05B);
  assert.equal(qwen.attentionBias, true);
  assert.equal(parameterCount(qwen), 494_032_768); // Qwen2.5-0.5B
  assert.equal(parameterCount(randomModelConfig(LLAMA32_1B)), 1_235_814_400); // Llama-3.2-1B
});

Deno.test("random model: seeded, reproducible per tensor, ~N(0, 0.02), norms near 1", () => {
  const a = randomTensorData({ ...SMOLLM2_135M, seed: 1 }, "model.layers.3.mlp.up_proj.weight", [
    1536,
    576,
  ]);
  const b = randomTensorData({ ...SMOLLM2_135M, seed: 1 }, "model.layers.3.mlp.up_proj.weight", [
    1536,
    576,
  ]);
  const c = randomTensorData({ ...SMOLLM2_135M, seed: 2 }, "model.layers.3.mlp.up_proj.weight", [
    1536,
    576,
  ]);
  const d = randomTensorData({ ...SMOLLM2_135M, seed: 1 }, "model.layers.4.mlp.up_proj.weight", [
    1536,
    576,
  ]);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  assert.notDeepEqual(a, d);
  let sum = 0, sq = 0;
  for (const v of a) {
    sum += v;
    sq += v * v;
  }
  const mean = sum / a.length, std = Math.sqrt(sq / a.length - mean * mean);
  assert.ok(Math.abs(mean) < 1e-3, `mean ${mean}`);
  assert.ok(Math.abs(std - 0.02) < 1e-3, `std ${std}`);
  const norm = randomTensorData(SMOLLM2_135M, "model.layers.0.input_layernorm.weight", [576]);
  assert.ok(norm.every((v) => Math.abs(v - 1) < 0.2), "norm weights near 1");
});

Deno.test("random model: streams each tensor once; SmolLM2-135M shapes in seconds", async () => {
  const source = randomModelSource({ ...SMOLLM2_135M, seed: 3 });
  const t0 = performance.now();
  let count = 0, floats = 0;
  const seen = new Set<string>();
  for await (const t of source.tensors()) {
    assert.ok(!seen.has(t.name), t.name);
    seen.add(t.name);
    count++;
    floats += t.data.length;
  }
  const seconds = (performance.now() - t0) / 1000;
  assert.equal(count, expectedTensors(source.config).length);
  assert.equal(floats, 134_515_008);
  assert.ok(seconds < 30, `took ${seconds.toFixed(1)} s`);
});

Deno.test("random model: fillRandomNormal draws 10M values well under a second", () => {
  const out = new Float32Array(10_000_000);
  const t0 = performance.now();
  fillRandomNormal(out, 1, 0, 1);
  const ms = performance.now() - t0;
  assert.ok(ms < 3000, `${ms.toFixed(0)} ms`);
  assert.ok(out.every(Number.isFinite));
});

Deno.test("random model: writeRandomHfModel shards and validates its arguments", async () => {
  await withTempDir(async (dir) => {
    const spec = {
      ...QWEN25_05B,
      hiddenSize: 32,
      intermediateSize: 40,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      vocabSize: 30,
      seed: 9,
    };
    const files = await writeRandomHfModel(`${dir}/m`, spec, "BF16", { shards: 4 });
    const names = files.map((p) => p.slice(p.lastIndexOf("/") + 1)).sort();
    assert.deepEqual(names, [
      "config.json",
      "generation_config.json",
      "model-00001-of-00004.safetensors",
      "model-00002-of-00004.safetensors",
      "model-00003-of-00004.safetensors",
      "model-00004-of-00004.safetensors",
      "model.safetensors.index.json",
    ]);
    const index = JSON.parse(await Deno.readTextFile(`${dir}/m/model.safetensors.index.json`));
    const source = await openModel(`${dir}/m`);
    assert.deepEqual(
      Object.keys(index.weight_map).sort(),
      expectedTensors(source.config).map((t) => t.name).sort(),
    );
    assert.equal(
      index.metadata.total_size,
      2 *
        expectedTensors(source.config).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0),
    );
    assert.deepEqual(source.generationConfig, { eosTokenIds: [151645] });
    assert.equal((await collect(source.tensors())).size, expectedTensors(source.config).length);
    await assert.rejects(writeRandomHfModel(`${dir}/x`, spec, "F32", { shards: 0 }), RangeError);
  });
});
