import assert from "node:assert/strict";
import { expectedTensors, hfConfigJson } from "../../src/engine/model/config.ts";
import { bf16ToF32, f16ToF32, f32ToBf16Bits, f32ToF16Bits } from "../../src/engine/model/dtype.ts";
import { openModel } from "../../src/engine/model/open_model.ts";
import {
  randomModelConfig,
  randomModelSource,
  type RandomModelSpec,
  writeRandomHfModel,
} from "../../src/engine/model/random_model.ts";
import {
  readSafetensorsHeader,
  readTensor,
  type TensorToWrite,
  writeSafetensors,
} from "../../src/engine/model/safetensors.ts";
import { fileByteSource } from "../../src/engine/model/byte_source.ts";
import { assertModelError, collect, withTempDir } from "./helpers.ts";

const TINY_LLAMA: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 32,
  intermediateSize: 48,
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  vocabSize: 50,
  tieWordEmbeddings: false,
  seed: 11,
};

const TINY_QWEN: RandomModelSpec = {
  architecture: "qwen2",
  hiddenSize: 24,
  intermediateSize: 40,
  numLayers: 3,
  numHeads: 6,
  numKvHeads: 2,
  vocabSize: 37,
  tieWordEmbeddings: true,
  seed: 5,
};

Deno.test("hf: bundled stories260K streams every tensor once, with the file's values", async () => {
  const source = await openModel("models/stories260K");
  assert.equal(source.config.hiddenSize, 64);
  assert.equal(source.tokenizerDir, "models/stories260K");
  assert.equal(source.llama2cTokenizerPath, null);
  assert.deepEqual(source.generationConfig, { eosTokenIds: [2] });
  const got = await collect(source.tensors());
  const expected = expectedTensors(source.config);
  assert.deepEqual([...got.keys()].sort(), expected.map((t) => t.name).sort());
  const header = await readSafetensorsHeader(
    await fileByteSource("models/stories260K/model.safetensors"),
  );
  for (const spec of expected) {
    assert.deepEqual(got.get(spec.name)!.shape, spec.shape);
    assert.deepEqual(got.get(spec.name)!.data, await readTensor(header.byName.get(spec.name)!));
  }
  // A second pass streams again.
  assert.equal((await collect(source.tensors())).size, expected.length);
  // The folder's config.json or weights file names the same model.
  assert.deepEqual((await openModel("models/stories260K/config.json")).config, source.config);
  assert.deepEqual((await openModel("models/stories260K/model.safetensors")).config, source.config);
});

for (const spec of [TINY_LLAMA, TINY_QWEN]) {
  Deno.test(`hf: random F32 ${spec.architecture}, whole or sharded, loads its values`, async () => {
    await withTempDir(async (dir) => {
      const reference = await collect(randomModelSource(spec).tensors());
      await writeRandomHfModel(`${dir}/one`, spec, "F32");
      const written = await writeRandomHfModel(`${dir}/three`, spec, "F32", { shards: 3 });
      assert.ok(written.some((p) => p.endsWith("model-00003-of-00003.safetensors")));
      assert.ok(written.some((p) => p.endsWith("model.safetensors.index.json")));
      const one = await openModel(`${dir}/one`);
      const three = await openModel(`${dir}/three`);
      assert.deepEqual(one.config, randomModelConfig(spec));
      assert.deepEqual(three.config, one.config);
      assert.equal(one.tokenizerDir, null);
      const a = await collect(one.tensors());
      const b = await collect(three.tensors());
      assert.equal(a.size, expectedTensors(one.config).length);
      assert.deepEqual([...a.keys()].sort(), [...reference.keys()].sort());
      for (const [name, t] of reference) {
        assert.deepEqual(a.get(name), t, name);
        assert.deepEqual(b.get(name), t, name);
      }
      if (spec.architecture === "qwen2") assert.ok(a.has("model.layers.2.self_attn.v_proj.bias"));
    });
  });
}

Deno.test("hf: F16 and BF16 files load as the exactly rounded values", async () => {
  await withTempDir(async (dir) => {
    const reference = await collect(randomModelSource(TINY_QWEN).tensors());
    for (
      const [dtype, round] of [
        ["F16", (x: number) => f16ToF32(f32ToF16Bits(x))],
        ["BF16", (x: number) => bf16ToF32(f32ToBf16Bits(x))],
      ] as const
    ) {
      await writeRandomHfModel(`${dir}/${dtype}`, TINY_QWEN, dtype, {
        shards: dtype === "BF16" ? 2 : 1,
      });
      const got = await collect((await openModel(`${dir}/${dtype}`)).tensors());
      for (const [name, t] of reference) {
        assert.deepEqual(got.get(name)!.data, t.data.map(round), `${dtype} ${name}`);
      }
      const cfg = JSON.parse(await Deno.readTextFile(`${dir}/${dtype}/config.json`));
      assert.equal(cfg.torch_dtype, dtype === "F16" ? "float16" : "bfloat16");
    }
  });
});

Deno.test("hf: extra tensors (rotary_emb.inv_freq) ignored; tied lm_head copies too", async () => {
  await withTempDir(async (dir) => {
    const spec = { ...TINY_LLAMA, tieWordEmbeddings: true };
    const config = randomModelConfig(spec);
    const tensors: TensorToWrite[] = [];
    for await (const t of randomModelSource(spec).tensors()) {
      tensors.push({ ...t, dtype: "F32" as const });
    }
    tensors.push({
      name: "model.layers.0.self_attn.rotary_emb.inv_freq",
      shape: [4],
      dtype: "F32",
      data: new Float32Array(4),
    });
    tensors.push({
      name: "lm_head.weight",
      shape: [50, 32],
      dtype: "F32",
      data: new Float32Array(50 * 32),
    });
    await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(hfConfigJson(config)));
    await writeSafetensors(`${dir}/model.safetensors`, tensors);
    const got = await collect((await openModel(dir)).tensors());
    assert.equal(got.size, expectedTensors(config).length);
    assert.ok(!got.has("model.layers.0.self_attn.rotary_emb.inv_freq"));
    assert.ok(!got.has("lm_head.weight"));
  });
});

Deno.test("hf: tokenizer option overrides the folder's tokenizer", async () => {
  const a = await openModel("models/stories260K", { tokenizer: "models/stories260K/tok512.bin" });
  assert.equal(a.llama2cTokenizerPath, "models/stories260K/tok512.bin");
  assert.equal(a.tokenizerDir, null);
  const b = await openModel("models/stories260K", {
    tokenizer: "models/stories260K/tokenizer.json",
  });
  assert.equal(b.tokenizerDir, "models/stories260K");
  await assertModelError(openModel("models/stories260K", { tokenizer: "models/nope.bin" }), {
    file: "models/nope.bin",
    pattern: /tokenizer not found/,
  });
});

/** Writes a tiny llama folder, then lets `corrupt` break it. */
async function brokenModel(
  dir: string,
  corrupt: (dir: string) => Promise<void>,
  spec = TINY_LLAMA,
  shards = 1,
) {
  await writeRandomHfModel(dir, spec, "F32", { shards });
  await corrupt(dir);
  return openModel(dir);
}

async function rewriteWeights(
  dir: string,
  spec: RandomModelSpec,
  edit: (t: { name: string; shape: number[]; data: Float32Array }[]) => void,
  dtypeOf?: (name: string) => string,
) {
  const tensors: { name: string; shape: number[]; data: Float32Array }[] = [];
  for await (const t of randomModelSource(spec).tensors()) tensors.push(t);
  edit(tensors);
  await writeSafetensors(`${dir}/model.safetensors`, tensors.map((t) => ({ ...t, dtype: "F32" })));
  if (dtypeOf) {
    // Patch a dtype name in place (same length keeps offsets valid).
    const bytes = await Deno.readFile(`${dir}/model.safetensors`);
    const text = new TextDecoder().decode(bytes);
    const patched = text.replace(/"dtype":"F32"/, `"dtype":"${dtypeOf("")}"`);
    await Deno.writeFile(`${dir}/model.safetensors`, new TextEncoder().encode(patched));
  }
}

Deno.test("hf errors: each names the file, the tensor and what to do", async (t) => {
  await withTempDir(async (root) => {
    let n = 0;
    const fresh = () => `${root}/m${n++}`;

    await t.step("path does not exist", async () => {
      await assertModelError(openModel(`${root}/nothing`), {
        file: `${root}/nothing`,
        pattern: /no such file or folder/,
      });
    });
    await t.step("missing config.json", async () => {
      const dir = fresh();
      await assertModelError(brokenModel(dir, (d) => Deno.remove(`${d}/config.json`)), {
        file: `${dir}/config.json`,
        pattern: /missing config.json/,
      });
    });
    await t.step("config.json not JSON", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(dir, (d) => Deno.writeTextFile(`${d}/config.json`, "{nope")),
        {
          file: `${dir}/config.json`,
          pattern: /not valid JSON/,
        },
      );
    });
    await t.step("unknown architecture", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(dir, async (d) => {
          const c = JSON.parse(await Deno.readTextFile(`${d}/config.json`));
          await Deno.writeTextFile(
            `${d}/config.json`,
            JSON.stringify({ ...c, architectures: ["GPT2LMHeadModel"] }),
          );
        }),
        {
          file: `${dir}/config.json`,
          pattern:
            /unknown architecture GPT2LMHeadModel; supported: LlamaForCausalLM, Qwen2ForCausalLM/,
        },
      );
    });
    await t.step("missing weights file", async () => {
      const dir = fresh();
      await assertModelError(brokenModel(dir, (d) => Deno.remove(`${d}/model.safetensors`)), {
        file: `${dir}/model.safetensors`,
        pattern: /missing weights: expected model.safetensors, or model.safetensors.index.json/,
      });
    });
    await t.step("index points at a missing shard", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(
          dir,
          (d) => Deno.remove(`${d}/model-00002-of-00003.safetensors`),
          TINY_LLAMA,
          3,
        ),
        {
          file: `${dir}/model.safetensors.index.json`,
          pattern: /lists shard model-00002-of-00003.safetensors, which is missing/,
        },
      );
    });
    await t.step("index places a tensor in the wrong shard", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(
          dir,
          async (d) => {
            const index = JSON.parse(await Deno.readTextFile(`${d}/model.safetensors.index.json`));
            index.weight_map["model.norm.weight"] = "model-00001-of-00003.safetensors";
            await Deno.writeTextFile(`${d}/model.safetensors.index.json`, JSON.stringify(index));
          },
          TINY_LLAMA,
          3,
        ),
        {
          file: `${dir}/model.safetensors.index.json`,
          tensor: "model.norm.weight",
          pattern: /places this tensor in model-00001-of-00003.safetensors, but it is in .*-00003-/,
        },
      );
    });
    await t.step("wrong shape (config disagrees with weights)", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(dir, async (d) => {
          const c = JSON.parse(await Deno.readTextFile(`${d}/config.json`));
          await Deno.writeTextFile(
            `${d}/config.json`,
            JSON.stringify({ ...c, intermediate_size: 40 }),
          );
        }),
        {
          file: `${dir}/model.safetensors`,
          tensor: "model.layers.0.mlp.gate_proj.weight",
          pattern: /shape \[48,32\] does not match the expected \[40,32\]/,
        },
      );
    });
    await t.step("wrong shape in a shard", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(
          dir,
          async (d) => {
            const c = JSON.parse(await Deno.readTextFile(`${d}/config.json`));
            await Deno.writeTextFile(`${d}/config.json`, JSON.stringify({ ...c, vocab_size: 51 }));
          },
          TINY_LLAMA,
          3,
        ),
        {
          file: `${dir}/model-00001-of-00003.safetensors`,
          tensor: "model.embed_tokens.weight",
          pattern: /shape \[50,32\] does not match the expected \[51,32\]/,
        },
      );
    });
    await t.step("missing tensor", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(
          dir,
          (d) =>
            rewriteWeights(d, TINY_LLAMA, (ts) =>
              ts.splice(
                ts.findIndex((x) => x.name === "model.layers.1.self_attn.k_proj.weight"),
                1,
              )),
        ),
        {
          file: `${dir}/model.safetensors`,
          tensor: "model.layers.1.self_attn.k_proj.weight",
          pattern: /missing tensor \(expected shape \[16,32\]/,
        },
      );
    });
    await t.step("untied config without lm_head", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(
          dir,
          (d) =>
            rewriteWeights(d, TINY_LLAMA, (ts) =>
              ts.splice(
                ts.findIndex((x) => x.name === "lm_head.weight"),
                1,
              )),
        ),
        {
          file: `${dir}/model.safetensors`,
          tensor: "lm_head.weight",
          pattern: /tie_word_embeddings=false/,
        },
      );
    });
    await t.step("qwen2 without q/k/v biases", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(
          dir,
          (d) =>
            rewriteWeights(d, TINY_QWEN, (ts) =>
              ts.splice(
                0,
                ts.length,
                ...ts.filter((x) => !x.name.endsWith(".bias")),
              )),
          TINY_QWEN,
        ),
        {
          file: `${dir}/model.safetensors`,
          tensor: "model.layers.0.self_attn.q_proj.bias",
          pattern: /q\/k\/v biases/,
        },
      );
    });
    await t.step("unknown dtype I8 in the weights", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(dir, (d) => rewriteWeights(d, TINY_LLAMA, () => {}, () => "I8 ")),
        {
          file: `${dir}/model.safetensors`,
          tensor: "model.embed_tokens.weight",
          pattern: /unsupported dtype I8 /,
        },
      );
    });
    await t.step("truncated weights file", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(dir, async (d) => {
          const size = (await Deno.stat(`${d}/model.safetensors`)).size;
          await Deno.truncate(`${d}/model.safetensors`, size - 100);
        }),
        {
          file: `${dir}/model.safetensors`,
          tensor: "lm_head.weight",
          pattern: /run past the end of the data/,
        },
      );
    });
    await t.step("header length lies", async () => {
      const dir = fresh();
      await assertModelError(
        brokenModel(dir, async (d) => {
          const bytes = await Deno.readFile(`${d}/model.safetensors`);
          new DataView(bytes.buffer).setBigUint64(0, BigInt(bytes.length), true);
          await Deno.writeFile(`${d}/model.safetensors`, bytes);
        }),
        { file: `${dir}/model.safetensors`, pattern: /header length \d+ exceeds the file size/ },
      );
    });
    await t.step("PyTorch and GGUF files", async () => {
      const dir = fresh();
      await Deno.mkdir(dir);
      await Deno.writeFile(`${dir}/pytorch_model.bin`, new Uint8Array(8));
      await Deno.writeFile(`${dir}/m.gguf`, new Uint8Array(8));
      await assertModelError(openModel(`${dir}/pytorch_model.bin`), {
        file: `${dir}/pytorch_model.bin`,
        pattern: /safetensors/,
      });
      await assertModelError(openModel(`${dir}/m.gguf`), {
        file: `${dir}/m.gguf`,
        pattern: /GGUF/,
      });
    });
  });
});
