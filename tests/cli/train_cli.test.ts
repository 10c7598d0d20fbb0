/**
 * `mace train` run as a user runs it (a subprocess on wgpu), on the bundled model:
 *  - one SGD step from an --init-adapter with non-zero A and B, --max-grad-norm 0 and one pair
 *    writes exactly init - lr * grad, grad from the float64 CPU reference on the same tokens;
 *  - the adapter it writes serves with `generate --adapter`;
 *  - bad pairs are reported with their line and skipped; a file with none is a clear error.
 */
import assert from "node:assert/strict";
import { openModelWithTokenizer } from "../../src/engine/load.ts";
import { ropeInvFreq } from "../../src/engine/model/config.ts";
import { readPeftAdapter, writePeftAdapter } from "../../src/engine/lora/peft.ts";
import { type LoraConfig, type LoraWeights, targetShape } from "../../src/engine/lora/lora.ts";
import { dpoLossAndGrad, LoraDpoReference } from "../reference/lora_dpo.ts";
import { readPreferencePairs } from "../../src/engine/training/preferences.ts";
import { tokenizePairs } from "../../src/engine/training/tokenize_pairs.ts";
import { assertClose } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";
import { mace, ROOT } from "../helpers/cli.ts";

const MODEL = ROOT + "models/stories260K";

const PAIR = {
  prompt: "Once upon a time, there was a little girl named Lily.",
  chosen: " She went to the park with her dog.",
  rejected: " She was sad and stayed in bed.",
};

Deno.test("cli: one SGD step from --init-adapter writes init - lr * reference grad", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mace-train-cli-" });
  const { source, tokenizer } = await openModelWithTokenizer(MODEL);
  const c = source.config;
  const lora: LoraConfig = { rank: 2, alpha: 3, targets: ["q", "v", "down"], dropout: 0 };
  const init: LoraWeights = {
    config: lora,
    layers: Array.from(
      { length: c.numLayers },
      (_, l) =>
        Object.fromEntries(lora.targets.map((t, i) => {
          const s = targetShape(c, t);
          return [t, {
            a: randn(lora.rank * s.in, 10 * l + i, 0.1),
            b: randn(s.out * lora.rank, 10 * l + i + 5, 0.1),
          }];
        })),
    ),
  };
  await writePeftAdapter(`${dir}/init`, init, { baseModel: MODEL });
  await Deno.writeTextFile(`${dir}/pairs.jsonl`, JSON.stringify(PAIR) + "\n");
  const lr = 0.5;
  const { code, stdout, stderr } = await mace(
    "train",
    "--pairs",
    `${dir}/pairs.jsonl`,
    "--init-adapter",
    `${dir}/init`,
    "--optimizer",
    "sgd",
    "--lr",
    String(lr),
    "--max-grad-norm",
    "0",
    "--steps",
    "1",
    "--batch",
    "1",
    "--beta",
    "0.5",
    "--out",
    `${dir}/out`,
    "--backend",
    "wgpu",
    "--json",
  );
  assert.equal(code, 0, stderr);
  const step = JSON.parse(stdout.trim().split("\n").at(-1)!);
  assert.equal(step.kind, "step");

  // The same tokens as the CLI: the file read and tokenized by the same code.
  const { pairs } = await readPreferencePairs(`${dir}/pairs.jsonl`, "auto");
  const [pair] = tokenizePairs(tokenizer, pairs, { maxLength: 256, maxPromptLength: 128 }).pairs;
  const weights = new Map<string, Float32Array>();
  for await (const t of source.tensors()) weights.set(t.name, t.data);
  const reference = new LoraDpoReference({ ...c, invFreq: ropeInvFreq(c) }, weights);
  const expected = dpoLossAndGrad(reference, init, {
    chosen: [...pair.prompt, ...pair.chosen],
    rejected: [...pair.prompt, ...pair.rejected],
    promptLength: pair.prompt.length,
  }, 0.5);
  assertClose([step.loss], [expected.loss], { rtol: 1e-4 }, "loss");

  const out = await readPeftAdapter(`${dir}/out`, c);
  for (let l = 0; l < c.numLayers; l++) {
    for (const t of lora.targets) {
      for (const m of ["a", "b"] as const) {
        const grad = expected.grads.layers[l][t]![m];
        const want = init.layers[l][t]![m].map((x, i) => x - lr * grad[i]);
        // The f32 gradient is held to 1e-4 of its scale (dpo_gradient.gpu.test.ts): scaled by lr
        // here.
        const scale = lr * Math.max(...grad.map(Math.abs));
        assertClose(
          out.layers[l][t]![m],
          want,
          { rtol: 0, atol: 1e-4 * scale + 1e-7 },
          `layer ${l} ${t}.${m}`,
        );
      }
    }
  }

  const served = await mace(
    "generate",
    "--adapter",
    `${dir}/out`,
    "--max-tokens",
    "8",
    "--backend",
    "wgpu",
    "--json",
  );
  assert.equal(served.code, 0, served.stderr);
  assert.equal(JSON.parse(served.stdout).loraAdapter, "adapter@1");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("cli: train skips bad pairs, naming their line; no usable pair is an error", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mace-train-cli-" });
  const lines = [
    JSON.stringify(PAIR),
    "{not json",
    JSON.stringify({ ...PAIR, chosen: "" }),
    JSON.stringify({ ...PAIR, rejected: PAIR.chosen }),
  ];
  await Deno.writeTextFile(`${dir}/pairs.jsonl`, lines.join("\n") + "\n");
  const ok = await mace(
    "train",
    "--pairs",
    `${dir}/pairs.jsonl`,
    "--steps",
    "1",
    "--batch",
    "1",
    "--rank",
    "2",
    "--out",
    `${dir}/out`,
    "--backend",
    "wgpu",
  );
  assert.equal(ok.code, 0, ok.stderr);
  for (const line of [2, 3, 4]) {
    assert.match(ok.stderr, new RegExp(`pairs\\.jsonl:${line}: skipped: `));
  }
  assert.match(ok.stderr, /1 pairs, 3 skipped/);

  await Deno.writeTextFile(`${dir}/bad.jsonl`, lines.slice(1).join("\n") + "\n");
  const bad = await mace("train", "--pairs", `${dir}/bad.jsonl`, "--backend", "wgpu");
  assert.equal(bad.code, 1);
  assert.match(
    bad.stderr,
    /InvalidRequestError: .*bad\.jsonl: no usable preference pairs \(3 skipped\)/,
  );
  await Deno.remove(dir, { recursive: true });
});
