/**
 * llama2.c tokenizer conversion: the converted tokenizer.json must tokenize
 * exactly like the bundled Hugging Face tokenizer.json of stories260K, and
 * like llama2.c's own encoder (run.c `encode`, re-implemented here as an
 * independent oracle).
 */
import assert from "node:assert/strict";
import { ModelFormatError } from "../../src/engine/errors.ts";
import {
  LLAMA2C_TOKENIZER_CONFIG,
  llama2cTokenizerJson,
} from "../../src/engine/tokenizer/llama2c_tokenizer.ts";
import {
  loadLlama2cTokenizer,
  loadTokenizerDir,
  tokenizerFromJson,
} from "../../src/engine/tokenizer/tokenizer.ts";

const DIR = new URL("../../models/stories260K", import.meta.url).pathname;
const TOK_BIN = `${DIR}/tok512.bin`;

/** Texts covering words, punctuation, digits, non-ASCII (byte fallback), whitespace runs. */
const SAMPLE_TEXTS = [
  "Once upon a time, there was a little girl named Lily.",
  "Lily's mom said, \"Let's go to the park!\" They didn't know what to do...",
  "1234567890 + 42 = 1276; 3.14159 (pi) & 100% [ok] {x} <y> #z @w ~v |u",
  "café ☕ 日本",
  "emoji 😀👍🏽 and math ∑√∞",
  "line one\nline two\n\n\tindented\r\nend",
  "   leading spaces",
  "trailing spaces   ",
  "  both  \n  ",
  " ",
  "",
  "a",
  "ÀÉÎÕÜ ñ ß",
  "The dog ran. The cat sat. The end.",
];

/** llama2.c's tokenizer records, read directly: [text with spaces, score]. */
function readLlama2cRecords(bytes: Uint8Array): { text: string; score: number }[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const records: { text: string; score: number }[] = [];
  for (let offset = 4; offset < bytes.byteLength;) {
    const score = view.getFloat32(offset, true);
    const length = view.getInt32(offset + 4, true);
    records.push({
      text: new TextDecoder().decode(bytes.subarray(offset + 8, offset + 8 + length)),
      score,
    });
    offset += 8 + length;
  }
  return records;
}

/**
 * run.c's encode(): a dummy " " prefix, one token per code point (UTF-8 bytes
 * as ids byte+3 when the code point is not a piece), then repeatedly merge the
 * adjacent pair whose concatenation is the best-scoring piece (leftmost on ties).
 */
function llama2cEncode(records: { text: string; score: number }[], text: string): number[] {
  const lookup = new Map(records.map((r, id) => [r.text, id]));
  const tokens: number[] = text === "" ? [] : [lookup.get(" ")!];
  for (const ch of text) {
    const id = lookup.get(ch);
    if (id !== undefined) tokens.push(id);
    else for (const b of new TextEncoder().encode(ch)) tokens.push(b + 3);
  }
  for (;;) {
    let bestScore = -Infinity, bestAt = -1, bestId = -1;
    for (let i = 0; i + 1 < tokens.length; i++) {
      const id = lookup.get(records[tokens[i]].text + records[tokens[i + 1]].text);
      if (id !== undefined && records[id].score > bestScore) {
        bestScore = records[id].score;
        bestAt = i;
        bestId = id;
      }
    }
    if (bestAt < 0) return tokens;
    tokens.splice(bestAt, 2, bestId);
  }
}

Deno.test("the converted llama2.c tokenizer works like the bundled tokenizer.json", async () => {
  const bundled = await loadTokenizerDir(DIR);
  const converted = await loadLlama2cTokenizer(TOK_BIN);
  assert.equal(converted.vocabSize, bundled.vocabSize);
  assert.equal(converted.bosId, bundled.bosId);
  assert.deepEqual(converted.eosIds, bundled.eosIds);
  for (const text of [...SAMPLE_TEXTS, "<s>inline</s> special"]) {
    for (const addSpecialTokens of [true, false]) {
      const ids = converted.encode(text, { addSpecialTokens });
      assert.deepEqual(
        ids,
        bundled.encode(text, { addSpecialTokens }),
        `encode ${JSON.stringify(text)}`,
      );
      for (const skipSpecialTokens of [true, false]) {
        assert.equal(
          converted.decode(ids, { skipSpecialTokens }),
          bundled.decode(ids, { skipSpecialTokens }),
          `decode ${JSON.stringify(text)}`,
        );
      }
    }
  }
  for (const text of SAMPLE_TEXTS) {
    assert.equal(
      converted.decode(converted.encode(text), { skipSpecialTokens: true }),
      text,
      "round trip",
    );
  }
});

Deno.test("converted tokenizer matches llama2.c's own encoder", async () => {
  const bytes = await Deno.readFile(TOK_BIN);
  const records = readLlama2cRecords(bytes);
  const converted = tokenizerFromJson(llama2cTokenizerJson(bytes), LLAMA2C_TOKENIZER_CONFIG);
  for (const text of SAMPLE_TEXTS) {
    assert.deepEqual(
      converted.encode(text, { addSpecialTokens: false }),
      llama2cEncode(records, text),
      JSON.stringify(text),
    );
  }
});

Deno.test("tokenizer.json from llama2.c has the Llama sentencepiece layout", async () => {
  const json = llama2cTokenizerJson(await Deno.readFile(TOK_BIN)) as {
    model: { vocab: Record<string, number>; merges: [string, string][]; byte_fallback: boolean };
  };
  const vocab = json.model.vocab;
  assert.equal(Object.keys(vocab).length, 512);
  assert.equal(vocab["<unk>"], 0);
  assert.equal(vocab["<s>"], 1);
  assert.equal(vocab["</s>"], 2);
  assert.equal(vocab["<0x00>"], 3);
  assert.equal(vocab["<0xFF>"], 258);
  assert.equal(vocab["▁t"], 259, "spaces are written as ▁");
  assert.equal(json.model.byte_fallback, true);
  // Highest-scoring piece first; every merge yields a piece.
  assert.deepEqual(json.model.merges[0], ["▁", "t"]);
  for (const [l, r] of json.model.merges) assert.ok((l + r) in vocab, `${l}+${r}`);
  // A JSON round trip (what `convert` writes to disk) gives the same tokenizer.
  const reread = tokenizerFromJson(JSON.parse(JSON.stringify(json)), LLAMA2C_TOKENIZER_CONFIG);
  assert.deepEqual(
    reread.encode(SAMPLE_TEXTS[0]),
    tokenizerFromJson(json, LLAMA2C_TOKENIZER_CONFIG).encode(SAMPLE_TEXTS[0]),
  );
});

/** A llama2.c tokenizer file from records. */
function encodeTokBin(
  maxLength: number,
  records: { bytes: Uint8Array; score: number; length?: number }[],
): Uint8Array {
  const size = 4 + records.reduce((n, r) => n + 8 + r.bytes.length, 0);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setInt32(0, maxLength, true);
  let offset = 4;
  for (const r of records) {
    view.setFloat32(offset, r.score, true);
    view.setInt32(offset + 4, r.length ?? r.bytes.length, true);
    out.set(r.bytes, offset + 8);
    offset += 8 + r.bytes.length;
  }
  return out;
}

Deno.test("malformed llama2.c tokenizer files raise ModelFormatError", () => {
  const text = (s: string) => new TextEncoder().encode(s);
  const controls = [text("<unk>"), text("\n<s>\n"), text("\n</s>\n")].map((bytes) => ({
    bytes,
    score: 0,
  }));
  const good = encodeTokBin(8, [...controls, { bytes: text(" a"), score: -1 }]);
  assert.ok(llama2cTokenizerJson(good));

  const cases: [string, Uint8Array, RegExp][] = [
    ["empty file", new Uint8Array(0), /header/],
    ["truncated record", good.subarray(0, good.length - 1), /past the end/],
    ["length over max", encodeTokBin(4, [...controls]), /outside/],
    [
      "negative length",
      encodeTokBin(8, [...controls, { bytes: text("x"), score: 0, length: -1 }]),
      /outside/,
    ],
    [
      "not UTF-8",
      encodeTokBin(8, [...controls, { bytes: Uint8Array.of(0xff, 0xfe), score: 0 }]),
      /UTF-8/,
    ],
    [
      "wrong control piece",
      encodeTokBin(8, [{ bytes: text("<pad>"), score: 0 }, ...controls.slice(1)]),
      /llama2\.c/,
    ],
    [
      "duplicate piece",
      encodeTokBin(8, [...controls, { bytes: text("ab"), score: 0 }, {
        bytes: text("ab"),
        score: 0,
      }]),
      /repeats/,
    ],
  ];
  for (const [label, bytes, message] of cases) {
    assert.throws(() => llama2cTokenizerJson(bytes, "bad.bin"), (e: unknown) => {
      assert.ok(e instanceof ModelFormatError, label);
      assert.equal(e.file, "bad.bin");
      assert.match(e.message, message, label);
      return true;
    });
  }
});
