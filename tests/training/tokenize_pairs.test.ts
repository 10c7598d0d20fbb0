/** TRL-style tokenization of preference pairs on the bundled stories260K tokenizer. */
import assert from "node:assert/strict";
import { InvalidRequestError } from "../../src/engine/errors.ts";
import {
  loadTokenizerDir,
  type Tokenizer,
  tokenizerFromJson,
} from "../../src/engine/tokenizer/tokenizer.ts";
import {
  type ChatMessage,
  type PreferencePair,
  readPreferencePairs,
} from "../../src/engine/training/preferences.ts";
import {
  type TokenizedPair,
  tokenizePair,
  tokenizePairs,
} from "../../src/engine/training/tokenize_pairs.ts";

const DIR = new URL("../../models/stories260K", import.meta.url).pathname;
const tok = await loadTokenizerDir(DIR);
const BOS = 1, EOS = 2;
const tokenizerJson = JSON.parse(await Deno.readTextFile(`${DIR}/tokenizer.json`));
const tokenizerConfig = JSON.parse(await Deno.readTextFile(`${DIR}/tokenizer_config.json`));
const withTemplate = (template: string) =>
  tokenizerFromJson(tokenizerJson, { ...tokenizerConfig, chat_template: template });

const WIDE = { maxLength: 1000, maxPromptLength: 500 };

function plainPair(prompt: string, chosen: string, rejected: string, line = 1): PreferencePair {
  return {
    line,
    prompt: [{ role: "user", content: prompt }],
    chosen: [{ role: "assistant", content: chosen }],
    rejected: [{ role: "assistant", content: rejected }],
    isChat: false,
  };
}

function tokenized(t: Tokenizer, pair: PreferencePair, opts = WIDE): TokenizedPair {
  const r = tokenizePair(t, pair, opts);
  assert.ok(!("reason" in r), `skipped: ${"reason" in r ? r.reason : ""}`);
  return r;
}

const count = (ids: number[], id: number) => ids.filter((x) => x === id).length;

Deno.test("tokenize pairs: BOS once, at the prompt start; EOS ends each response", () => {
  const pair = plainPair(
    "Once upon a time, there was a little cat.",
    " The cat was happy.",
    " The dog was sad.",
  );
  const t = tokenized(tok, pair);
  const prompt = pair.prompt[0].content;
  assert.deepEqual(t.prompt, [BOS, ...tok.encode(prompt, { addSpecialTokens: false })]);
  assert.equal(count(t.prompt, BOS), 1);
  // Each response is tokenized as it follows the prompt: prompt + response is exactly the
  // tokenization of the whole text (a response tokenized alone would start with an extra "▁").
  const texts = [[t.chosen, " The cat was happy."], [t.rejected, " The dog was sad."]] as const;
  for (const [ids, text] of texts) {
    assert.deepEqual([...t.prompt, ...ids], [...tok.encode(prompt + text), EOS]);
    assert.equal(tok.decode([...t.prompt, ...ids], { skipSpecialTokens: true }), prompt + text);
    assert.equal(count(ids, BOS), 0);
    assert.equal(count(ids, EOS), 1);
    assert.equal(ids.at(-1), EOS);
  }
  assert.equal(t.line, 1);
});

Deno.test("tokenize pairs: prompts keep BOS and their end; responses keep their start", () => {
  const pair = plainPair(
    "Once upon a time, there was a little girl named Lily. She liked to play outside.",
    " One day she found a big red ball in the park and she was very happy.",
    " No.",
  );
  const full = tokenized(tok, pair);
  const opts = { maxLength: 20, maxPromptLength: 8 };
  const t = tokenized(tok, pair, opts);
  // BOS, then the prompt's last 7 tokens.
  assert.deepEqual(t.prompt, [BOS, ...full.prompt.slice(-7)]);
  // Responses fit in maxLength − prompt = 12 tokens: the long one loses its end and its EOS.
  assert.ok(full.chosen.length > 12);
  assert.deepEqual(t.chosen, full.chosen.slice(0, 12));
  assert.notEqual(t.chosen.at(-1), EOS);
  assert.deepEqual(t.rejected, full.rejected, "the short response is whole, EOS included");
  assert.ok(t.prompt.length + t.chosen.length <= opts.maxLength);

  // maxPromptLength 1 leaves BOS alone.
  assert.deepEqual(tokenized(tok, pair, { maxLength: 20, maxPromptLength: 1 }).prompt, [BOS]);
});

Deno.test("tokenize pairs: no room for a response token skips the pair as over-length", () => {
  const pair = plainPair("Once upon a time there was a cat.", " Yes.", " No.", 7);
  const n = tokenized(tok, pair).prompt.length;
  assert.deepEqual(tokenizePair(tok, pair, { maxLength: n, maxPromptLength: 2 * n }), {
    line: 7,
    reason: `over-length: prompt has ${n} tokens, max_length ${n}`,
  });
  // One token of room: each response is its first token.
  const t = tokenized(tok, pair, { maxLength: n + 1, maxPromptLength: 2 * n });
  assert.equal(t.chosen.length, 1);
  assert.equal(t.rejected.length, 1);

  const batch = tokenizePairs(tok, [pair, plainPair("Hi.", " Yes.", " No.", 8)], {
    maxLength: n,
    maxPromptLength: 2 * n,
  });
  assert.deepEqual(batch.pairs.map((p) => p.line), [8]);
  assert.deepEqual(batch.skipped.map((s) => s.line), [7]);
});

Deno.test("tokenize pairs: options must be positive integers", () => {
  const pair = plainPair("Hi.", " Yes.", " No.");
  for (
    const opts of [{ maxLength: 0, maxPromptLength: 4 }, { maxLength: 8, maxPromptLength: 1.5 }]
  ) {
    assert.throws(() => tokenizePair(tok, pair, opts), InvalidRequestError);
  }
});

const SYS: ChatMessage = { role: "system", content: "Be kind." };
const USER: ChatMessage = { role: "user", content: "Tell me a story." };

function chatPair(chosen: string, rejected: string): PreferencePair {
  return {
    line: 3,
    prompt: [SYS, USER],
    chosen: [{ role: "assistant", content: chosen }],
    rejected: [{ role: "assistant", content: rejected }],
    isChat: true,
  };
}

/** A Llama-2-like template: writes bos_token itself and ends assistant turns with eos_token. */
const TEMPLATE_WITH_BOS = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'assistant' %}[assistant]{{ m.content }}{{ eos_token }}" +
  "{% else %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}[assistant]{% endif %}";

/** A ChatML-like template without special tokens. */
const TEMPLATE_PLAIN = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n" +
  "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

Deno.test("tokenize pairs: a chat template renders all three; BOS and EOS never doubled", () => {
  const pair = chatPair(" Once there was a cat.", " No.");

  const llama = withTemplate(TEMPLATE_WITH_BOS);
  const a = tokenized(llama, pair);
  const promptText = "<s>[system] Be kind.\n[user] Tell me a story.\n[assistant]";
  assert.deepEqual(a.prompt, llama.encode(promptText, { addSpecialTokens: false }));
  assert.equal(a.prompt[0], BOS);
  assert.equal(count(a.prompt, BOS), 1, "the template's <s> is the only BOS");
  assert.deepEqual(
    [...a.prompt, ...a.chosen],
    llama.encode(promptText + " Once there was a cat.</s>", { addSpecialTokens: false }),
  );
  assert.equal(a.chosen.at(-1), EOS);
  assert.equal(count(a.chosen, EOS), 1, "the template's </s> is the only EOS");

  const chatml = withTemplate(TEMPLATE_PLAIN);
  const b = tokenized(chatml, pair);
  const plainPrompt = "<system>Be kind.</system>\n<user>Tell me a story.</user>\n<assistant>";
  assert.deepEqual(b.prompt, chatml.encode(plainPrompt));
  assert.equal(b.prompt[0], BOS, "the tokenizer adds BOS to a template that does not write it");
  // The response text is the whole render minus the rendered prompt, then EOS.
  assert.deepEqual(
    [...b.prompt, ...b.chosen],
    [...chatml.encode(plainPrompt + " Once there was a cat.</assistant>\n"), EOS],
  );
  assert.equal(count(b.chosen, BOS), 0);
});

Deno.test("tokenize pairs: chat pairs the template cannot split are skipped, with why", () => {
  const pair = chatPair(" Yes.", " No.");
  const noTemplate = tokenizePair(tok, pair, WIDE);
  assert.ok("reason" in noTemplate);
  assert.match(noTemplate.reason, /needs a chat template and the tokenizer has none/);

  // The generation prompt differs from how the template renders an assistant turn.
  const mismatched = withTemplate(
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" +
      "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
  );
  const r = tokenizePair(mismatched, pair, WIDE);
  assert.ok("reason" in r);
  assert.match(r.reason, /renders prompt \+ chosen without the rendered prompt at its start/);

  const strict = withTemplate(
    "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% " +
      "endif %}",
  );
  const s = tokenizePair(strict, pair, WIDE);
  assert.ok("reason" in s);
  assert.match(s.reason, /^the chat template failed: .*System role not supported/);

  // A plain-text pair stays plain text even when the tokenizer has a template (as TRL does).
  const plain = plainPair("Hi.", " Yes.", " No.");
  assert.deepEqual(tokenized(withTemplate(TEMPLATE_PLAIN), plain), tokenized(tok, plain));
});

Deno.test("tokenize pairs: a token across the prompt/response edge: the response alone", () => {
  // "ti" + "me" tokenizes as "time" in the whole text, so the prompt's ids are no prefix of it.
  const pair = plainPair("Once upon a ti", "me there was a cat.", "red.");
  const promptIds = tok.encode("Once upon a ti", { addSpecialTokens: false });
  const whole = tok.encode("Once upon a time there was a cat.", { addSpecialTokens: false });
  assert.notDeepEqual(whole.slice(0, promptIds.length), promptIds);
  const t = tokenized(tok, pair);
  assert.deepEqual(t.prompt, [BOS, ...promptIds]);
  assert.deepEqual(t.chosen, [
    ...tok.encode("me there was a cat.", { addSpecialTokens: false }),
    EOS,
  ]);
});

/** An HH file shipped in the repository (data/preferences/). */
const HH = new URL(
  "../../data/preferences/hh-rlhf-helpful-test/helpful-base.test.jsonl.gz",
  import.meta.url,
).pathname;

Deno.test({
  name: "tokenize pairs: the first 40 shipped HH pairs on the bundled tokenizer",
  fn: async () => {
    const { pairs } = await readPreferencePairs(HH, "hh");
    const opts = { maxLength: 512, maxPromptLength: 256 };
    const out = tokenizePairs(tok, pairs.slice(0, 40), opts);
    assert.equal(out.pairs.length + out.skipped.length, 40);
    for (const s of out.skipped) assert.match(s.reason, /^over-length: prompt has \d+ tokens/);
    let whole = 0;
    for (const t of out.pairs) {
      const text = pairs.find((p) => p.line === t.line)!;
      const promptText = text.prompt[0].content;
      const promptCut = tok.encode(promptText).length > opts.maxPromptLength;
      assert.equal(t.prompt[0], BOS);
      assert.equal(count(t.prompt, BOS), 1);
      assert.ok(t.prompt.length <= opts.maxPromptLength);
      for (
        const [ids, response] of [[t.chosen, text.chosen], [t.rejected, text.rejected]] as const
      ) {
        assert.equal(count(ids, BOS), 0);
        if (ids.at(-1) !== EOS) {
          assert.equal(t.prompt.length + ids.length, opts.maxLength, "only cut responses lack EOS");
        } else if (!promptCut) {
          assert.deepEqual([...t.prompt, ...ids], [
            ...tok.encode(promptText + response[0].content),
            EOS,
          ]);
          whole++;
        }
      }
    }
    assert.ok(whole > 40, `${whole} whole responses checked`);
  },
});
