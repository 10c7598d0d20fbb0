import assert from "node:assert/strict";
import { bytesByteSource, fileByteSource } from "../../src/engine/model/byte_source.ts";
import {
  bf16ToF32,
  f16ToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  type WeightDtype,
} from "../../src/engine/model/dtype.ts";
import {
  encodeSafetensors,
  readSafetensorsHeader,
  readTensor,
  writeSafetensors,
} from "../../src/engine/model/safetensors.ts";
import { randn } from "../helpers/random.ts";
import { assertModelError, rawSafetensors, withTempDir } from "./helpers.ts";

const round: Record<WeightDtype, (x: number) => number> = {
  F32: Math.fround,
  F16: (x) => f16ToF32(f32ToF16Bits(x)),
  BF16: (x) => bf16ToF32(f32ToBf16Bits(x)),
};

for (const dtype of ["F32", "F16", "BF16"] as WeightDtype[]) {
  Deno.test(`safetensors: ${dtype} round trip: values, order, metadata, padding`, async () => {
    const tensors = [
      { name: "z.last.weight", shape: [7, 13], dtype, data: randn(91, 1, 3) },
      { name: "a.bias", shape: [5], dtype, data: randn(5, 2, 1e-3) },
      { name: "scalar", shape: [], dtype, data: new Float32Array([65504.5]) },
      { name: "empty", shape: [0, 4], dtype, data: new Float32Array(0) },
      {
        name: "m.odd",
        shape: [3, 1, 3],
        dtype,
        data: Float32Array.from([1e-8, -0, 1e30, 2 ** -24, 1 / 3, -7, 0.1, 1e-40, 3e38]),
      },
    ];
    const bytes = await encodeSafetensors(tensors, { format: "pt", note: "x" });
    const headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    assert.equal(headerLen % 8, 0, "header padded to 8 bytes");
    const header = await readSafetensorsHeader(bytesByteSource("mem.safetensors", bytes));
    assert.deepEqual(header.metadata, { format: "pt", note: "x" });
    // File order is the order given.
    assert.deepEqual(header.tensors.map((t) => t.name), tensors.map((t) => t.name));
    for (const t of tensors) {
      const info = header.byName.get(t.name)!;
      assert.equal(info.dtype, dtype);
      assert.deepEqual(info.shape, t.shape);
      const back = await readTensor(info);
      assert.equal(back.length, t.data.length);
      for (let i = 0; i < back.length; i++) {
        assert.ok(
          Object.is(back[i], round[dtype](t.data[i])),
          `${t.name}[${i}]: ${back[i]} vs ${t.data[i]}`,
        );
      }
    }
    // The file writer gives the same bytes, and the file reader the same values.
    await withTempDir(async (dir) => {
      const path = `${dir}/t.safetensors`;
      await writeSafetensors(path, tensors.map((t) => ({ ...t, data: () => t.data })), {
        format: "pt",
        note: "x",
      });
      assert.deepEqual(await Deno.readFile(path), bytes);
      const h = await readSafetensorsHeader(await fileByteSource(path));
      assert.deepEqual(
        await readTensor(h.byName.get("z.last.weight")!),
        await readTensor(header.byName.get("z.last.weight")!),
      );
    });
  });
}

Deno.test("safetensors: reads the bundled stories260K weights", async () => {
  const h = await readSafetensorsHeader(
    await fileByteSource("models/stories260K/model.safetensors"),
  );
  assert.equal(h.tensors.length, 1 + 5 * 9 + 1);
  assert.deepEqual(h.byName.get("model.embed_tokens.weight")!.shape, [512, 64]);
  const norm = await readTensor(h.byName.get("model.norm.weight")!);
  assert.equal(norm.length, 64);
  assert.ok(norm.every(Number.isFinite));
});

const F32_2x2 = { dtype: "F32", shape: [2, 2], data_offsets: [0, 16] };
const DATA16 = new Uint8Array(16);

Deno.test("safetensors errors: name the file and the tensor", async (t) => {
  const check = (name: string, bytes: Uint8Array, tensor: string | undefined, pattern: RegExp) =>
    t.step(name, async () => {
      await assertModelError(readSafetensorsHeader(bytesByteSource("bad.safetensors", bytes)), {
        file: "bad.safetensors",
        tensor,
        pattern,
      });
    });

  await check("shorter than 8 bytes", new Uint8Array(5), undefined, /too short/);
  await check(
    "header length beyond the file",
    rawSafetensors({ w: F32_2x2 }, DATA16, 1 << 20),
    undefined,
    /header length 1048576 exceeds the file size/,
  );
  await check(
    "header length a lie (too short)",
    rawSafetensors({ w: F32_2x2 }, DATA16, 10),
    undefined,
    /not valid JSON/,
  );
  await check(
    "header length absurd (u64 top bit)",
    (() => {
      const b = rawSafetensors({ w: F32_2x2 }, DATA16);
      new DataView(b.buffer).setBigUint64(0, 0xffff_ffff_ffff_fff0n, true);
      return b;
    })(),
    undefined,
    /exceeds the file size/,
  );
  await check(
    "bad JSON",
    (() => {
      const b = rawSafetensors({ w: F32_2x2 }, DATA16);
      b[9] = "!".charCodeAt(0);
      return b;
    })(),
    undefined,
    /not valid JSON/,
  );
  await check("header not an object", rawSafetensors([1, 2], DATA16), undefined, /JSON object/);
  await check(
    "unknown dtype I8",
    rawSafetensors({ w: { dtype: "I8", shape: [4], data_offsets: [0, 4] } }, DATA16),
    "w",
    /unsupported dtype I8; supported: F32, F16, BF16/,
  );
  await check(
    "offsets past the end",
    rawSafetensors(
      { a: F32_2x2, w: { dtype: "F32", shape: [2, 2], data_offsets: [16, 32] } },
      DATA16,
    ),
    "w",
    /run past the end of the data/,
  );
  await check(
    "offsets not matching shape x dtype",
    rawSafetensors({ w: { dtype: "F16", shape: [2, 2], data_offsets: [0, 16] } }, DATA16),
    "w",
    /span 16 bytes but shape \[2,2\] of F16 needs 8/,
  );
  await check(
    "overlapping offsets",
    rawSafetensors({
      a: { dtype: "F32", shape: [3], data_offsets: [0, 12] },
      b: { dtype: "F32", shape: [2], data_offsets: [8, 16] },
    }, DATA16),
    "b",
    /overlap tensor a/,
  );
  await check(
    "bad data_offsets",
    rawSafetensors({ w: { dtype: "F32", shape: [2], data_offsets: [8, 0] } }, DATA16),
    "w",
    /data_offsets must be/,
  );
  await check(
    "bad shape",
    rawSafetensors({ w: { dtype: "F32", shape: [-1], data_offsets: [0, 4] } }, DATA16),
    "w",
    /shape/,
  );
  // A file cut short in the data section: the last tensor runs past the end.
  const good = await encodeSafetensors([
    { name: "first", shape: [4], dtype: "F32", data: new Float32Array(4) },
    { name: "last", shape: [64], dtype: "F32", data: new Float32Array(64) },
  ]);
  await check("truncated file", good.slice(0, good.length - 10), "last", /run past the end/);
});

Deno.test("safetensors: a file truncated after its header names the tensor on read", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/w.safetensors`;
    await writeSafetensors(path, [{
      name: "big",
      shape: [1000],
      dtype: "F32",
      data: new Float32Array(1000),
    }]);
    const h = await readSafetensorsHeader(await fileByteSource(path));
    await Deno.truncate(path, 1000);
    await assertModelError(readTensor(h.byName.get("big")!), {
      file: path,
      tensor: "big",
      pattern: /end of file/,
    });
  });
});
