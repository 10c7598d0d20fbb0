/** The Tokenizer interface over @huggingface/tokenizers: special tokens, config flags, errors. */
import assert from "node:assert/strict";
import { InvalidRequestError, ModelFormatError } from "../../src/engine/errors.ts";
import type { ModelFiles } from "../../src/engine/model/byte_source.ts";
import {
  loadTokenizerDir,
  loadTokenizerFiles,
  tokenizerFromJson,
} from "../../src/engine/tokenizer/tokenizer.ts";

const DIR = new URL("../../models/stories260K", import.meta.url).pathname;
const tokenizerJson = JSON.parse(await Deno.readTextFile(`${DIR}/tokenizer.json`));
const tokenizerConfig = JSON.parse(await Deno.readTextFile(`${DIR}/tokenizer_config.json`));

/** In-memory model folder. */
function memoryFiles(contents: Record<string, string>): ModelFiles {
  return {
    root: "mem",
    path: (name) => `mem/${name}`,
    exists: (name) => Promise.resolve(name in contents),
    readText: (name) => Promise.resolve(contents[name] ?? null),
    open: () => Promise.resolve(null),
  };
}

function assertFormatError(fn: () => unknown, file: string, message: RegExp) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ModelFormatError, `expected ModelFormatError, got ${e}`);
    assert.equal(e.file, file);
    assert.match(e.message, message);
    return true;
  });
}

async function assertRejectsFormat(promise: Promise<unknown>, file: string, message: RegExp) {
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof ModelFormatError, `expected ModelFormatError, got ${e}`);
    assert.equal(e.file, file);
    assert.match(e.message, message);
    return true;
  });
}

Deno.test("stories260K tokenizer: vocab, special ids, BOS per add_bos_token", async () => {
  const tok = await loadTokenizerDir(DIR);
  assert.equal(tok.vocabSize, 512);
  assert.equal(tok.bosId, 1);
  assert.deepEqual(tok.eosIds, [2]);
  assert.equal(tok.chatTemplate, null);

  const ids = tok.encode("Once upon a time");
  assert.equal(ids[0], 1, "BOS first");
  assert.deepEqual(tok.encode("Once upon a time", { addSpecialTokens: false }), ids.slice(1));
  assert.deepEqual(tok.encode(""), [1]);
  assert.deepEqual(tok.encode("", { addSpecialTokens: false }), []);

  assert.equal(tok.decode(ids, { skipSpecialTokens: true }), "Once upon a time");
  assert.equal(
    tok.decode([...ids, 2]),
    "<s> Once upon a time</s>",
    "special tokens kept by default",
  );
  assert.equal(tok.decode([]), "");
});

Deno.test("decode rejects ids outside the vocabulary", async () => {
  const tok = await loadTokenizerDir(DIR);
  for (const bad of [-1, 512, 1.5, NaN]) {
    assert.throws(() => tok.decode([1, bad]), InvalidRequestError, String(bad));
  }
});

Deno.test("add_bos_token / add_eos_token in tokenizer_config override the post-processor", () => {
  const text = "The cat sat.";
  const plain = tokenizerFromJson(tokenizerJson, tokenizerConfig).encode(text, {
    addSpecialTokens: false,
  });
  const withEos = tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, add_eos_token: true });
  assert.deepEqual(withEos.encode(text), [1, ...plain, 2]);
  const noBos = tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, add_bos_token: false });
  assert.deepEqual(noBos.encode(text), plain);

  // Without the flags, tokenizer.json's post-processor decides (here: BOS).
  const { add_bos_token: _b, add_eos_token: _e, ...noFlags } = tokenizerConfig;
  assert.deepEqual(tokenizerFromJson(tokenizerJson, noFlags).encode(text), [1, ...plain]);
  // ... and without a post-processor nothing is added.
  assert.deepEqual(
    tokenizerFromJson({ ...tokenizerJson, post_processor: null }, noFlags).encode(text),
    plain,
  );
});

Deno.test("special tokens given as AddedToken objects, or absent", () => {
  const tok = tokenizerFromJson(tokenizerJson, {
    ...tokenizerConfig,
    bos_token: { __type: "AddedToken", content: "<s>", special: true },
    eos_token: { content: "</s>" },
  });
  assert.equal(tok.bosId, 1);
  assert.deepEqual(tok.eosIds, [2]);
  const none = tokenizerFromJson(tokenizerJson, { bos_token: null });
  assert.equal(none.bosId, null);
  assert.deepEqual(none.eosIds, []);
});

Deno.test("chat template from tokenizer_config (string, named list) or .jinja file", async () => {
  const template = "{% for m in messages %}{{ m.content }}{% endfor %}";
  assert.equal(
    tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, chat_template: template }).chatTemplate,
    template,
  );
  const named = [{ name: "tool_use", template: "x" }, { name: "default", template }];
  assert.equal(
    tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, chat_template: named }).chatTemplate,
    template,
  );

  const fromJinja = await loadTokenizerFiles(memoryFiles({
    "tokenizer.json": JSON.stringify(tokenizerJson),
    "tokenizer_config.json": JSON.stringify({ ...tokenizerConfig, chat_template: "old" }),
    "chat_template.jinja": template,
  }));
  assert.equal(fromJinja.chatTemplate, template);
});

Deno.test("tokenizer_config.json is optional", async () => {
  const tok = await loadTokenizerFiles(
    memoryFiles({ "tokenizer.json": JSON.stringify(tokenizerJson) }),
  );
  assert.equal(tok.bosId, null);
  assert.deepEqual(tok.encode("hi").slice(0, 1), [1], "post-processor still adds BOS");
});

Deno.test("malformed tokenizer files raise ModelFormatError naming the file", async () => {
  await assertRejectsFormat(loadTokenizerFiles(memoryFiles({})), "mem/tokenizer.json", /not found/);
  await assertRejectsFormat(
    loadTokenizerFiles(memoryFiles({ "tokenizer.json": "{oops" })),
    "mem/tokenizer.json",
    /not valid JSON/,
  );
  await assertRejectsFormat(
    loadTokenizerFiles(
      memoryFiles({
        "tokenizer.json": JSON.stringify(tokenizerJson),
        "tokenizer_config.json": "[",
      }),
    ),
    "mem/tokenizer_config.json",
    /not valid JSON/,
  );
  await assertRejectsFormat(
    loadTokenizerDir("models/no_such_model"),
    "models/no_such_model/tokenizer.json",
    /not found/,
  );

  assertFormatError(() => tokenizerFromJson([], tokenizerConfig), "tokenizer.json", /JSON object/);
  assertFormatError(
    () => tokenizerFromJson({ version: "1.0" }, tokenizerConfig),
    "tokenizer.json",
    /"model"/,
  );
  assertFormatError(
    () => tokenizerFromJson({ ...tokenizerJson, model: { type: "NoSuchModel" } }, tokenizerConfig),
    "tokenizer.json",
    /cannot build/,
  );
  assertFormatError(
    () => tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, bos_token: "<bos>" }),
    "tokenizer_config.json",
    /bos_token "<bos>" is not in/,
  );
  assertFormatError(
    () => tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, add_bos_token: "yes" }),
    "tokenizer_config.json",
    /add_bos_token/,
  );
  assertFormatError(
    () => tokenizerFromJson(tokenizerJson, { add_bos_token: true }),
    "tokenizer_config.json",
    /bos_token is not set/,
  );
  assertFormatError(
    () => tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, chat_template: 7 }),
    "tokenizer_config.json",
    /chat_template/,
  );
});
