import assert from "node:assert/strict";
import { fileByteSource } from "../../src/engine/model/byte_source.ts";
import { expectedTensors, parseHfConfig, ropeInvFreq } from "../../src/engine/model/config.ts";
import { convertLlama2cToHf } from "../../src/engine/model/convert.ts";
import { openLlama2c, permuteRotaryRows } from "../../src/engine/model/llama2c.ts";
import { openModel } from "../../src/engine/model/open_model.ts";
import { readSafetensorsHeader, readTensor } from "../../src/engine/model/safetensors.ts";
import { assertClose } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";
import { assertModelError, collect, withTempDir } from "./helpers.ts";

const DIR = "models/stories260K";

async function bundledHf() {
  const header = await readSafetensorsHeader(await fileByteSource(`${DIR}/model.safetensors`));
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const t of header.tensors) out.set(t.name, { shape: t.shape, data: await readTensor(t) });
  return out;
}

Deno.test("llama2c: stories260K.bin streams the bundled HF tensors (q/k permuted)", async () => {
  const source = await openModel(`${DIR}/stories260K.bin`);
  assert.equal(source.llama2cTokenizerPath, `${DIR}/tok512.bin`);
  assert.equal(source.tokenizerDir, null);
  assert.deepEqual(
    source.config,
    parseHfConfig(JSON.parse(await Deno.readTextFile(`${DIR}/config.json`)), "c"),
  );
  const got = await collect(source.tensors());
  const hf = await bundledHf();
  assert.deepEqual([...got.keys()].sort(), [...hf.keys()].sort());
  for (const [name, t] of hf) {
    assert.deepEqual(got.get(name)!.shape, t.shape, name);
    assertClose(got.get(name)!.data, t.data, { rtol: 0, atol: 1e-6 }, name);
  }
});

Deno.test("convert: stories260K.bin + tok512.bin -> the bundled HF folder", async () => {
  await withTempDir(async (out) => {
    await convertLlama2cToHf(`${DIR}/stories260K.bin`, `${DIR}/tok512.bin`, out);
    // Same tensor names, order, shapes and dtypes; values within 1e-6.
    const converted = await readSafetensorsHeader(await fileByteSource(`${out}/model.safetensors`));
    const bundled = await readSafetensorsHeader(await fileByteSource(`${DIR}/model.safetensors`));
    assert.deepEqual(
      converted.tensors.map((t) => [t.name, t.shape, t.dtype]),
      bundled.tensors.map((t) => [t.name, t.shape, t.dtype]),
    );
    // In fact byte for byte the same file.
    assert.deepEqual(
      await Deno.readFile(`${out}/model.safetensors`),
      await Deno.readFile(`${DIR}/model.safetensors`),
    );
    for (const t of bundled.tensors) {
      assertClose(await readTensor(converted.byName.get(t.name)!), await readTensor(t), {
        rtol: 0,
        atol: 1e-6,
      }, t.name);
    }
    const json = async (p: string) => JSON.parse(await Deno.readTextFile(p));
    assert.deepEqual(await json(`${out}/config.json`), await json(`${DIR}/config.json`));
    assert.deepEqual(
      await json(`${out}/generation_config.json`),
      await json(`${DIR}/generation_config.json`),
    );
    assert.deepEqual(
      await json(`${out}/tokenizer_config.json`),
      await json(`${DIR}/tokenizer_config.json`),
    );
    const tok = await json(`${out}/tokenizer.json`);
    assert.equal(typeof tok, "object");
    assert.ok("model" in tok, "tokenizer.json has a model");
    // The converted folder opens like the bundled one.
    const source = await openModel(out);
    assert.equal(source.tokenizerDir, out);
    assert.equal((await collect(source.tensors())).size, expectedTensors(source.config).length);
  });
});

Deno.test("llama2c: permuteRotaryRows maps pairs (2i, 2i+1) to (i, i + hd/2) per head", () => {
  const w = Float32Array.from({ length: 16 }, (_, i) => i); // 2 heads, hd 4, 2 columns
  const p = permuteRotaryRows(w, 2, 2);
  const rowOrder = [0, 2, 1, 3, 4, 6, 5, 7];
  assert.deepEqual([...p], rowOrder.flatMap((r) => [2 * r, 2 * r + 1]));
});

Deno.test("llama2c: rotate_half RoPE on permuted rows equals llama2.c's interleaved RoPE", () => {
  const heads = 3, hd = 8, dim = 5, pos = 7;
  const w = randn(heads * hd * dim, 3);
  const x = randn(dim, 4);
  const matvec = (m: Float32Array) =>
    Array.from(
      { length: heads * hd },
      (_, r) => x.reduce((s, xv, c) => s + m[r * dim + c] * xv, 0),
    );
  const freq = (i: number) => 1 / 10000 ** ((2 * i) / hd);
  // llama2.c: rotate pairs (2i, 2i+1) of each head.
  const q = matvec(w);
  const ref = q.slice();
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < hd / 2; i++) {
      const a = h * hd + 2 * i, b = a + 1, ang = pos * freq(i);
      ref[a] = q[a] * Math.cos(ang) - q[b] * Math.sin(ang);
      ref[b] = q[a] * Math.sin(ang) + q[b] * Math.cos(ang);
    }
  }
  // HF: rotate halves (i, i + hd/2) with the same inverse frequencies as ropeInvFreq.
  const inv = ropeInvFreq(parseHfConfig({
    architectures: ["LlamaForCausalLM"],
    hidden_size: heads * hd,
    num_attention_heads: heads,
    intermediate_size: 4,
    num_hidden_layers: 1,
    vocab_size: 4,
    rope_theta: 10000,
  }, "c"));
  const qh = matvec(permuteRotaryRows(w, heads, dim));
  const hfOut = qh.slice();
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < hd / 2; i++) {
      const a = h * hd + i, b = a + hd / 2, ang = pos * inv[i];
      hfOut[a] = qh[a] * Math.cos(ang) - qh[b] * Math.sin(ang);
      hfOut[b] = qh[b] * Math.cos(ang) + qh[a] * Math.sin(ang);
    }
  }
  // Same values, HF's order: element (h, t*hd/2 + i) is llama2.c's (h, 2i + t).
  const reordered = [...permuteRotaryRows(Float32Array.from(ref), heads, 1)];
  assertClose(hfOut, reordered, { rtol: 1e-6, atol: 1e-6 }, "rope");
});

/** A tiny llama2.c checkpoint: header ints then `floats` random values. */
function checkpoint(header: number[], floats: number): Uint8Array {
  const out = new Uint8Array(28 + floats * 4);
  const view = new DataView(out.buffer);
  header.forEach((v, i) => view.setInt32(i * 4, v, true));
  new Float32Array(out.buffer, 28, floats).set(randn(floats, 9));
  return out;
}

Deno.test("llama2c: negative vocab_size: untied classifier (lm_head streamed last)", async () => {
  // dim 8, hidden 12, 1 layer, 2 heads, 1 kv head, vocab -10, seq_len 6; hd 4.
  const [D, I, V, S, hd] = [8, 12, 10, 6, 4];
  const n = V * D + D + D * D + 2 * (hd * D) + D * D + D + 3 * D * I + D + 2 * S * (hd / 2) + V * D;
  await withTempDir(async (dir) => {
    const bytes = checkpoint([D, I, 1, 2, 1, V * -1, S], n);
    await Deno.writeFile(`${dir}/m.bin`, bytes);
    const source = await openModel(`${dir}/m.bin`);
    assert.equal(source.config.tieWordEmbeddings, false);
    assert.equal(source.llama2cTokenizerPath, null);
    const got = await collect(source.tensors());
    assert.deepEqual(
      [...got.keys()].sort(),
      expectedTensors(source.config).map((t) => t.name).sort(),
    );
    const floats = new Float32Array(bytes.buffer, 28);
    assert.deepEqual(got.get("lm_head.weight")!.data, floats.slice(n - V * D));
    assert.deepEqual(got.get("model.embed_tokens.weight")!.data, floats.slice(0, V * D));
    // k_proj of the single kv head is permuted; v_proj is not.
    const kStart = V * D + D + D * D;
    assert.deepEqual(
      got.get("model.layers.0.self_attn.k_proj.weight")!.data,
      permuteRotaryRows(floats.slice(kStart, kStart + hd * D), 1, D),
    );
    assert.deepEqual(
      got.get("model.layers.0.self_attn.v_proj.weight")!.data,
      floats.slice(kStart + hd * D, kStart + 2 * hd * D),
    );
    // A tokenizer given explicitly is used.
    await Deno.writeFile(`${dir}/my_tok.bin`, new Uint8Array(4));
    assert.equal(
      (await openModel(`${dir}/m.bin`, { tokenizer: `${dir}/my_tok.bin` })).llama2cTokenizerPath,
      `${dir}/my_tok.bin`,
    );
  });
});

Deno.test("llama2c errors: truncated, oversized, bad header, versioned export", async (t) => {
  const good = await Deno.readFile(`${DIR}/stories260K.bin`);
  await withTempDir(async (dir) => {
    const write = async (name: string, bytes: Uint8Array) => {
      await Deno.writeFile(`${dir}/${name}`, bytes);
      return `${dir}/${name}`;
    };
    await t.step("truncated", async () => {
      const p = await write("trunc.bin", good.slice(0, good.length - 4));
      await assertModelError(openModel(p), {
        file: p,
        pattern:
          /truncated: the file has 1056536 bytes but the header dim=64 .* implies 1056540 bytes/,
      });
    });
    await t.step("oversized", async () => {
      const big = new Uint8Array(good.length + 8);
      big.set(good);
      const p = await write("big.bin", big);
      await assertModelError(openModel(p), { file: p, pattern: /8 more than the header/ });
    });
    await t.step("shorter than the header", async () => {
      const p = await write("tiny.bin", good.slice(0, 10));
      await assertModelError(openModel(p), {
        file: p,
        pattern: /too short for the 28-byte llama2.c header/,
      });
    });
    await t.step("bad header", async () => {
      const bad = good.slice();
      new DataView(bad.buffer).setInt32(12, 0, true); // n_heads = 0
      const p = await write("bad.bin", bad);
      await assertModelError(openModel(p), { file: p, pattern: /n_heads=0/ });
    });
    await t.step("versioned export", async () => {
      const v = new Uint8Array(256);
      new DataView(v.buffer).setUint32(0, 0x616b3432, true);
      new DataView(v.buffer).setInt32(4, 2, true);
      const p = await write("v2.bin", v);
      await assertModelError(openModel(p), {
        file: p,
        pattern: /version 2 \(magic "ak42"\) is not supported/,
      });
    });
    await t.step("read error after open names the file", async () => {
      const p = await write("shrinks.bin", good);
      const source = await openLlama2c(await fileByteSource(p));
      await Deno.truncate(p, 1000);
      await assertModelError(collect(source.tensors()), { file: p, pattern: /end of file/ });
    });
  });
});
