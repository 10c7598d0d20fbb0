/** Reading preference pairs: the shipped datasets, the HH prompt split, bad records, file kinds. */
import assert from "node:assert/strict";
import { DatasetFormatError } from "../../src/engine/errors.ts";
import {
  type PreferenceFormat,
  type PreferencePair,
  readPreferencePairs,
} from "../../src/engine/training/preferences.ts";

/** The datasets shipped in the repository (data/preferences/, with their licences). */
const DATA = new URL("../../data/preferences/", import.meta.url).pathname;

async function withTempFile<T>(
  name: string,
  bytes: Uint8Array,
  fn: (path: string) => Promise<T>,
): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "mace-prefs-test-" });
  try {
    const path = `${dir}/${name}`;
    await Deno.writeFile(path, bytes);
    return await fn(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const utf8 = (s: string) => new TextEncoder().encode(s);
const jsonl = (...records: unknown[]) => records.map((r) => JSON.stringify(r)).join("\n") + "\n";

async function gzip(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream()
    .pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/**
 * Every shipped file: pairs read, and the skipped lines with their reasons (checked against an
 * independent scan of the data: HH transcripts that are identical or whose rejected answer is
 * only a space; UltraFeedback rows with identical or empty answers).
 */
const SHIPPED: {
  file: string;
  format: PreferenceFormat;
  pairs: number;
  skipped: [number, RegExp][];
  isChat: boolean;
}[] = [
  {
    file: "hh-rlhf-helpful-test/helpful-base.test.jsonl.gz",
    format: "hh",
    pairs: 2348,
    skipped: [
      [121, /^empty rejected response$/],
      [722, /^chosen and rejected are identical$/],
      [741, /^empty rejected response$/],
      [1215, /^empty rejected response$/],
      [2064, /^empty rejected response$/],
      [2169, /^chosen and rejected are identical$/],
    ],
    isChat: false,
  },
  {
    file: "hh-rlhf-helpful-test/helpful-online.test.jsonl.gz",
    format: "hh",
    pairs: 1132,
    skipped: [
      [199, /identical/],
      [553, /^empty rejected response$/],
      [737, /identical/],
      [894, /^empty rejected response$/],
      [1054, /^empty rejected response$/],
    ],
    isChat: false,
  },
  {
    file: "hh-rlhf-helpful-test/helpful-rejection-sampled.test.jsonl.gz",
    format: "hh",
    pairs: 2717,
    skipped: [
      201,
      238,
      286,
      306,
      356,
      383,
      429,
      502,
      614,
      691,
      721,
      748,
      756,
      873,
      1165,
      1272,
      1275,
      1280,
      1776,
      1795,
      1828,
      1955,
      1970,
      2205,
      2249,
      2375,
      2525,
      2571,
      2579,
      2611,
      2680,
      2730,
    ].map((line) => [line, /^chosen and rejected are identical$/]),
    isChat: false,
  },
  {
    file: "orca-dpo-pairs-validation/validation.jsonl",
    format: "chat",
    pairs: 284,
    skipped: [],
    isChat: true,
  },
  {
    file: "ultrafeedback-binarized-1k/train_clean.jsonl",
    format: "ultrafeedback",
    pairs: 994,
    skipped: [
      [307, /^chosen and rejected responses are identical$/],
      [479, /^empty rejected response$/],
      [656, /identical/],
      [834, /^empty chosen response$/],
      [911, /identical/],
      [998, /identical/],
    ],
    isChat: false,
  },
  {
    file: "ultrafeedback-binarized-1k/eval_clean.jsonl",
    format: "ultrafeedback",
    pairs: 199,
    skipped: [[44, /identical/]],
    isChat: false,
  },
  {
    file: "llamafactory-demo/dpo_en_demo.json",
    format: "llamafactory",
    pairs: 300,
    skipped: [],
    isChat: true,
  },
  {
    file: "llamafactory-demo/v1_dpo_demo.jsonl",
    format: "llamafactory",
    pairs: 10,
    skipped: [],
    isChat: true,
  },
];

for (const s of SHIPPED) {
  Deno.test({
    name: `preferences: ${s.file} gives ${s.pairs} pairs, ${s.skipped.length} skipped (auto = ` +
      `${s.format})`,
    fn: async () => {
      const auto = await readPreferencePairs(DATA + s.file, "auto");
      assert.equal(auto.pairs.length, s.pairs);
      assert.deepEqual(auto.skipped.map((k) => k.line), s.skipped.map(([line]) => line));
      auto.skipped.forEach((k, i) => assert.match(k.reason, s.skipped[i][1], `line ${k.line}`));
      for (const p of auto.pairs) {
        assert.equal(p.isChat, s.isChat);
        assert.ok(p.prompt.length > 0 && p.chosen.length > 0 && p.rejected.length > 0);
        assert.equal(p.chosen.at(-1)!.role, "assistant");
        assert.equal(p.rejected.at(-1)!.role, "assistant");
      }
      const explicit = await readPreferencePairs(DATA + s.file, s.format);
      assert.deepEqual(explicit, auto);
    },
  });
}

Deno.test({
  name: "preferences: shipped chat formats keep system and user turns in the prompt",
  fn: async () => {
    const orca = await readPreferencePairs(
      DATA + "orca-dpo-pairs-validation/validation.jsonl",
      "auto",
    );
    assert.deepEqual(orca.pairs[0].prompt.map((m) => m.role), ["system", "user"]);
    assert.match(orca.pairs[0].chosen[0].content, /^Step 1: Identify the names/);

    const lf = await readPreferencePairs(DATA + "llamafactory-demo/dpo_en_demo.json", "auto");
    assert.equal(lf.pairs[0].line, 1, "JSON array records are numbered from 1");
    assert.deepEqual(lf.pairs[0].prompt.map((m) => m.role), ["user"]);
    assert.match(lf.pairs[0].chosen[0].content, /^That sounds like a fun/);

    // v1: whole conversations; the prompt is their shared turns, text parts joined.
    const v1 = await readPreferencePairs(DATA + "llamafactory-demo/v1_dpo_demo.jsonl", "auto");
    const first = v1.pairs[0];
    assert.deepEqual(first.prompt.map((m) => m.role), ["system", "user"]);
    assert.equal(
      first.chosen[0].content,
      "Abdulah Hasanagic is the proud owner of AS Company in Gorazde, a small town located on " +
        "the banks of the Drina River, near the border with Serbia, in Eastern Bosnia.",
    );
    assert.match(
      first.rejected[0].content,
      /^ Abdulah Hasanagic is the proud owner of AS Company,/,
    );
  },
});

Deno.test({
  name:
    "preferences: HH prompt = shared prefix cut after the last \\n\\nAssistant: (shipped line 1)",
  fn: async () => {
    const { pairs } = await readPreferencePairs(
      DATA + "hh-rlhf-helpful-test/helpful-base.test.jsonl.gz",
      "hh",
    );
    const p = pairs[0];
    assert.deepEqual(p.prompt, [{
      role: "user",
      content: "\n\nHuman: Do you know why turkeys became the official food of " +
        "thanksgiving?\n\nAssistant:",
    }]);
    assert.match(p.chosen[0].content, /^ To be honest, I don’t know anything about that\./);
    assert.match(p.rejected[0].content, /^ I know that the American Indians were the first/);
    // Multi-turn: the prompt holds the earlier assistant turns.
    const multi = pairs.find((q) => q.line === 2)!;
    assert.match(
      multi.prompt[0].content,
      /^\n\nHuman: How can I find out what types of butterflies/,
    );
    assert.match(
      multi.prompt[0].content,
      new RegExp(
        String.raw`\n\nAssistant: Which location are you in\?\n\nHuman: I am in Oregon\.` +
          String.raw`\n\nAssistant: There are about 175 species[^]*` +
          String.raw`\n\nHuman: Great\. What are some common species then\?\n\nAssistant:$`,
      ),
    );
  },
});

Deno.test("preferences: HH split keeps responses with the same first words whole", async () => {
  const prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Is it sunny?\n\nAssistant:";
  const text = jsonl(
    { chosen: prompt + " I think it is sunny.", rejected: prompt + " I think it rains." },
    // The shared prefix ends inside "\n\nAssistant:": the earlier marker is the cut.
    { chosen: prompt + " Yes", rejected: prompt + " No" },
    { chosen: "\n\nHuman: a\n\nAssistant: b", rejected: "\n\nHuman: c\n\nAssistant: b" },
  );
  await withTempFile("hh.jsonl", utf8(text), async (path) => {
    const { pairs, skipped } = await readPreferencePairs(path, "hh");
    assert.equal(pairs.length, 2);
    assert.equal(pairs[0].prompt[0].content, prompt);
    assert.equal(pairs[0].chosen[0].content, " I think it is sunny.");
    assert.equal(pairs[0].rejected[0].content, " I think it rains.");
    assert.equal(pairs[1].chosen[0].content, " Yes");
    assert.equal(pairs[0].isChat, false);
    assert.deepEqual(skipped.map((s) => s.line), [3]);
    assert.match(skipped[0].reason, /share no "\\n\\nAssistant:" turn/);
  });
});

/** One file with one bad record of each kind; their lines and reasons. */
function badRecordsFile(): { bytes: Uint8Array; expected: [number, RegExp][]; good: number[] } {
  const ok = (i: number) => ({
    prompt: `Question ${i}?`,
    chosen: `Good ${i}.`,
    rejected: `Bad ${i}.`,
  });
  const lines: (string | Uint8Array)[] = [
    JSON.stringify(ok(1)), // 1
    new Uint8Array([
      ...utf8('{"prompt": "caf'),
      0xc3,
      0x28,
      ...utf8('", "chosen": "a", "rejected": "b"}'),
    ]), // 2
    '{"prompt": "x", "chosen": "a", "rejected": ', // 3
    JSON.stringify({ prompt: "p", chosen: "fine", rejected: "  \n " }), // 4
    JSON.stringify({ prompt: "p", chosen: "same", rejected: "same" }), // 5
    JSON.stringify({ prompt: "p", chosen: "a" }), // 6
    "", // 7: blank lines are no records
    JSON.stringify({ prompt: "p", chosen: 42, rejected: "b" }), // 8
    JSON.stringify({ prompt: "   ", chosen: "a", rejected: "b" }), // 9
    JSON.stringify(["not", "an", "object"]), // 10
    // 11
    JSON.stringify({ prompt: "p", chosen: "a", rejected: [{ role: "assistant", content: "b" }] }),
    JSON.stringify(ok(12)), // 12
  ];
  const parts = lines.map((l) => (typeof l === "string" ? utf8(l) : l));
  const total = parts.reduce((n, p) => n + p.length + 1, 0);
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    bytes[at + p.length] = 0x0a;
    at += p.length + 1;
  }
  return {
    bytes,
    good: [1, 12],
    expected: [
      [2, /^invalid UTF-8$/],
      [3, /^invalid JSON/],
      [4, /^empty rejected response$/],
      [5, /^chosen and rejected responses are identical$/],
      [6, /^missing field "rejected"$/],
      [8, /^field "chosen" must be a string or a list of messages, got number$/],
      [9, /^empty prompt$/],
      [10, /^record must be a JSON object, got a list$/],
      [11, /must both be strings or both be message lists/],
    ],
  };
}

function assertBadRecords(
  result: { pairs: PreferencePair[]; skipped: { line: number; reason: string }[] },
  expected: ReturnType<typeof badRecordsFile>,
) {
  assert.deepEqual(result.pairs.map((p) => p.line), expected.good);
  assert.deepEqual(result.skipped.map((s) => s.line), expected.expected.map(([line]) => line));
  result.skipped.forEach((s, i) =>
    assert.match(s.reason, expected.expected[i][1], `line ${s.line}`)
  );
  assert.deepEqual(result.pairs[0], {
    line: 1,
    prompt: [{ role: "user", content: "Question 1?" }],
    chosen: [{ role: "assistant", content: "Good 1." }],
    rejected: [{ role: "assistant", content: "Bad 1." }],
    isChat: false,
  });
}

Deno.test("preferences: bad records are skipped with their line and a precise reason", async () => {
  const file = badRecordsFile();
  await withTempFile("bad.jsonl", file.bytes, async (path) => {
    assertBadRecords(await readPreferencePairs(path, "auto"), file);
    assertBadRecords(await readPreferencePairs(path, "ultrafeedback"), file);
  });
  // The same records gzipped (detected by content, whatever the name).
  await withTempFile("bad.jsonl.gz", await gzip(file.bytes), async (path) => {
    assertBadRecords(await readPreferencePairs(path, "auto"), file);
  });
});

Deno.test("preferences: auto takes the format from the first record with known keys", async () => {
  const text = "not json\n" +
    jsonl(
      { question: "?", answer: "!" },
      { chosen: "\n\nHuman: q\n\nAssistant: yes", rejected: "\n\nHuman: q\n\nAssistant: no" },
      // Now hh: a record of another format lacks hh's fields or splits as hh.
      { prompt: "p", chosen: "a", rejected: "b" },
    );
  await withTempFile("mixed.jsonl", utf8(text), async (path) => {
    const { pairs, skipped } = await readPreferencePairs(path, "auto");
    assert.deepEqual(pairs.map((p) => p.line), [3]);
    assert.deepEqual(skipped.map((s) => s.line), [1, 2, 4]);
    assert.match(skipped[1].reason, /^unknown record keys \[question, answer\]/);
    assert.match(skipped[2].reason, /share no "\\n\\nAssistant:" turn/);
  });
});

Deno.test("preferences: message lists: chat format, implicit and repeated prompts", async () => {
  const sys = { role: "system", content: "Be brief." };
  const user = { role: "user", content: "Capital of France?" };
  const good = { role: "assistant", content: "Paris." };
  const bad = { role: "assistant", content: "Lyon." };
  await withTempFile(
    "chat.jsonl",
    utf8(jsonl(
      { input: { messages: [sys, user] }, preferred_output: [good], non_preferred_output: [bad] },
      { input: { messages: [sys, good] }, preferred_output: [good], non_preferred_output: [bad] },
      { input: { tools: [] }, preferred_output: [good], non_preferred_output: [bad] },
      { input: { messages: [user] }, preferred_output: [user], non_preferred_output: [bad] },
      {
        input: { messages: [{ role: "robot", content: "x" }] },
        preferred_output: [good],
        non_preferred_output: [bad],
      },
    )),
    async (path) => {
      const { pairs, skipped } = await readPreferencePairs(path, "auto");
      assert.deepEqual(pairs, [{
        line: 1,
        prompt: [sys, user],
        chosen: [good],
        rejected: [bad],
        isChat: true,
      }]);
      assert.deepEqual(skipped.map((s) => s.line), [2, 3, 4, 5]);
      assert.match(skipped[0].reason, /prompt ends with an assistant message/);
      assert.match(skipped[1].reason, /^missing field "input\.messages"$/);
      assert.match(
        skipped[2].reason,
        /chosen response must end with an assistant message, got role "user"/,
      );
      assert.match(
        skipped[3].reason,
        /input\.messages\[0\]\.role must be one of system, user, assistant, tool/,
      );
    },
  );
  // UltraFeedback as HuggingFaceH4 ships it: responses repeat the prompt turn; and the
  // implicit-prompt form (only chosen/rejected conversations, detected as hh).
  await withTempFile(
    "uf.jsonl",
    utf8(jsonl(
      { prompt: user.content, chosen: [user, good], rejected: [user, bad] },
      { chosen: [user, good], rejected: [user, bad] },
    )),
    async (path) => {
      const ultra = await readPreferencePairs(path, "ultrafeedback");
      assert.deepEqual(ultra.pairs[0], {
        line: 1,
        prompt: [user],
        chosen: [good],
        rejected: [bad],
        isChat: true,
      });
      const implicit = await readPreferencePairs(path, "hh");
      assert.deepEqual(implicit.pairs.map((p) => [p.line, p.prompt, p.chosen, p.rejected]), [
        [1, [user], [good], [bad]],
        [2, [user], [good], [bad]],
      ]);
    },
  );
});

Deno.test("preferences: JSON array files number records from 1; llamafactory roles", async () => {
  const conv = (from: string, value: string) => ({ from, value });
  const records = [
    {
      conversations: [conv("system", "S"), conv("human", "Q")],
      chosen: conv("gpt", "A"),
      rejected: conv("gpt", "B"),
    },
    { conversations: [conv("human", "Q")], chosen: conv("gpt", "A"), rejected: conv("gpt", "A") },
    {
      conversations: [conv("function_call", "{}")],
      chosen: conv("gpt", "A"),
      rejected: conv("gpt", "B"),
    },
    { conversations: "Q", chosen: conv("gpt", "A"), rejected: conv("gpt", "B") },
  ];
  await withTempFile("lf.json", utf8(JSON.stringify(records, null, 2)), async (path) => {
    const { pairs, skipped } = await readPreferencePairs(path, "auto");
    assert.deepEqual(pairs, [{
      line: 1,
      prompt: [{ role: "system", content: "S" }, { role: "user", content: "Q" }],
      chosen: [{ role: "assistant", content: "A" }],
      rejected: [{ role: "assistant", content: "B" }],
      isChat: true,
    }]);
    assert.deepEqual(skipped.map((s) => s.line), [2, 3, 4]);
    assert.match(skipped[0].reason, /identical/);
    assert.match(
      skipped[1].reason,
      /conversations\[0\]\.from must be one of human, gpt, system, got "function_call"/,
    );
    assert.match(skipped[2].reason, /"conversations" must be a list/);
  });
});

Deno.test("preferences: bad files are DatasetFormatErrors; no valid record, no pairs", async () => {
  const isDatasetError = (pattern: RegExp) => (e: unknown) => {
    assert.ok(e instanceof DatasetFormatError, `expected DatasetFormatError, got ${e}`);
    assert.match(e.message, pattern);
    return true;
  };
  await assert.rejects(
    readPreferencePairs("/nonexistent/prefs.jsonl", "auto"),
    isDatasetError(/^\/nonexistent\/prefs\.jsonl: file not found$/),
  );
  await withTempFile("broken.json", utf8('[{"prompt": "p",'), async (path) => {
    await assert.rejects(
      readPreferencePairs(path, "auto"),
      isDatasetError(/not a valid JSON array/),
    );
  });
  await withTempFile("obj.json", utf8('{"prompt": "p"}'), async (path) => {
    await assert.rejects(
      readPreferencePairs(path, "auto"),
      isDatasetError(/must be an array of records/),
    );
  });
  await withTempFile("bad.jsonl.gz", new Uint8Array([0x1f, 0x8b, 8, 0, 1, 2, 3]), async (path) => {
    await assert.rejects(
      readPreferencePairs(path, "auto"),
      isDatasetError(/not a valid gzip file/),
    );
  });
  await withTempFile("junk.jsonl", utf8("junk\n{}\n"), async (path) => {
    const { pairs, skipped } = await readPreferencePairs(path, "auto");
    assert.equal(pairs.length, 0);
    assert.deepEqual(skipped.map((s) => s.line), [1, 2]);
  });
});
