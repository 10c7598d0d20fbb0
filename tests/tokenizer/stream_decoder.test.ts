/**
 * StreamDecoder: the pushes plus the flush must concatenate to decode(allIds),
 * for byte-fallback runs, special tokens, clean-up rules and byte-level BPE.
 */
import assert from "node:assert/strict";
import { InvalidRequestError } from "../../src/engine/errors.ts";
import { StreamDecoder } from "../../src/engine/tokenizer/stream_decoder.ts";
import {
  loadTokenizerDir,
  type Tokenizer,
  tokenizerFromJson,
} from "../../src/engine/tokenizer/tokenizer.ts";
import { randInts } from "../helpers/random.ts";

const DIR = new URL("../../models/stories260K", import.meta.url).pathname;
const tokenizerJson = JSON.parse(await Deno.readTextFile(`${DIR}/tokenizer.json`));
const tokenizerConfig = JSON.parse(await Deno.readTextFile(`${DIR}/tokenizer_config.json`));

const TEXTS = [
  "Once upon a time, there was a little girl named Lily.",
  "café ☕ 日本 😀👍🏽 — “quotes” ∑",
  "  leading and trailing  \n\n",
  "I do n't know , he said . Is it ? Yes ! It ' s hers 've 're 'm .",
];

/** Streams ids through a fresh decoder; returns every push's text and the flush. */
function stream(
  tok: Tokenizer,
  ids: number[],
  skipSpecialTokens: boolean,
): { pushes: string[]; flushed: string } {
  const decoder = new StreamDecoder(tok, { skipSpecialTokens });
  const pushes = ids.map((id) => decoder.push(id));
  return { pushes, flushed: decoder.flush() };
}

function assertStreamsLikeDecode(tok: Tokenizer, ids: number[], label: string) {
  for (const skipSpecialTokens of [false, true]) {
    const { pushes, flushed } = stream(tok, ids, skipSpecialTokens);
    assert.equal(
      pushes.join("") + flushed,
      tok.decode(ids, { skipSpecialTokens }),
      `${label} (skip ${skipSpecialTokens})`,
    );
  }
}

Deno.test("byte-fallback characters come out whole, once their last byte arrives", async () => {
  const tok = await loadTokenizerDir(DIR);
  const ids = tok.encode("日本", { addSpecialTokens: false });
  const bytes = ids.filter((id) => id >= 3 && id < 259);
  assert.equal(bytes.length, 6, "two 3-byte characters via byte fallback");
  const { pushes, flushed } = stream(tok, ids, false);
  assert.deepEqual(pushes.filter((s) => s !== ""), ["日", "本"]);
  assert.equal(pushes.join("") + flushed, "日本");
});

Deno.test("stream equals decode on the bundled tokenizer (specials mid-stream too)", async () => {
  const tok = await loadTokenizerDir(DIR);
  for (const text of TEXTS) {
    const ids = tok.encode(text);
    assertStreamsLikeDecode(tok, ids, JSON.stringify(text));
    // A finished sequence followed by a new one: EOS, BOS in the middle.
    assertStreamsLikeDecode(tok, [...ids, 2, ...ids], `${JSON.stringify(text)} twice`);
  }
});

Deno.test("stream equals decode on random id sequences (bytes, specials, clean-up)", async () => {
  const plain = await loadTokenizerDir(DIR);
  const cleaning = tokenizerFromJson(tokenizerJson, {
    ...tokenizerConfig,
    clean_up_tokenization_spaces: true,
  });
  for (let seed = 1; seed <= 40; seed++) {
    const ids = Array.from(randInts(80, 512, seed));
    assertStreamsLikeDecode(plain, ids, `seed ${seed}`);
    assertStreamsLikeDecode(cleaning, ids, `seed ${seed}, clean-up`);
  }
  for (const text of TEXTS) {
    assertStreamsLikeDecode(cleaning, cleaning.encode(text), `clean-up ${JSON.stringify(text)}`);
  }
});

/** GPT-2's byte -> printable character table (byte-level BPE, as in Qwen2 and Llama 3). */
function bytesToUnicode(): string[] {
  const printable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const table: string[] = [];
  let extra = 0;
  for (let b = 0; b < 256; b++) table[b] = String.fromCodePoint(printable(b) ? b : 256 + extra++);
  return table;
}

/** A small byte-level BPE: the 256 byte symbols, a few merges, an <|endoftext|> special. */
function byteLevelTokenizer(): Tokenizer {
  const symbols = bytesToUnicode();
  const merges: [string, string][] = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["æ", "Ĺ"], [
    "æĹ",
    "¥",
  ]];
  const vocab: Record<string, number> = {};
  symbols.forEach((s, id) => (vocab[s] = id));
  for (const [l, r] of merges) vocab[l + r] = Object.keys(vocab).length;
  const eot = Object.keys(vocab).length;
  return tokenizerFromJson({
    added_tokens: [{
      id: eot,
      content: "<|endoftext|>",
      special: true,
      normalized: false,
      lstrip: false,
      rstrip: false,
      single_word: false,
    }],
    normalizer: null,
    pre_tokenizer: {
      type: "ByteLevel",
      add_prefix_space: false,
      trim_offsets: false,
      use_regex: true,
    },
    post_processor: {
      type: "ByteLevel",
      add_prefix_space: false,
      trim_offsets: false,
      use_regex: true,
    },
    decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: false, use_regex: true },
    model: {
      type: "BPE",
      vocab,
      merges,
      unk_token: null,
      byte_fallback: false,
      ignore_merges: false,
    },
  }, { eos_token: "<|endoftext|>", clean_up_tokenization_spaces: false });
}

Deno.test("stream equals decode on a byte-level BPE tokenizer", () => {
  const tok = byteLevelTokenizer();
  assert.equal(tok.vocabSize, 262);
  for (const text of TEXTS) {
    const ids = tok.encode(text);
    assert.equal(tok.decode(ids), text);
    assertStreamsLikeDecode(tok, [...ids, tok.eosIds[0], ...ids], JSON.stringify(text));
  }
  for (let seed = 1; seed <= 40; seed++) {
    assertStreamsLikeDecode(
      tok,
      Array.from(randInts(80, 262, 1000 + seed)),
      `byte-level seed ${seed}`,
    );
  }
});

Deno.test("a rejected id leaves the stream usable; flush starts a new stream", async () => {
  const tok = await loadTokenizerDir(DIR);
  const ids = tok.encode("The cat sat.", { addSpecialTokens: false });
  const decoder = new StreamDecoder(tok);
  let text = decoder.push(ids[0]);
  assert.throws(() => decoder.push(9999), InvalidRequestError);
  for (const id of ids.slice(1)) text += decoder.push(id);
  text += decoder.flush();
  assert.equal(text, tok.decode(ids));

  // After flush the next token is first again (its leading space is stripped).
  let again = "";
  for (const id of ids) again += decoder.push(id);
  assert.equal(again + decoder.flush(), "The cat sat.");
});
