/**
 * The bundled model's greedy output, 200 steps from BOS with no prompt, must be
 * exactly llama2.c's golden text, from both the HF and the llama2.c layouts.
 */
import { strictEqual } from "node:assert/strict";
import { openModelWithTokenizer } from "../../src/engine/load.ts";
import { GREEDY } from "../../src/engine/step.ts";
import { inferenceEngine } from "../helpers/engine.ts";
import { gpuTest } from "../helpers/gpu.ts";

const MODEL_DIR = new URL("../../models/stories260K/", import.meta.url).pathname;
// llama2.c's run prints a newline after the last token; the tokens themselves do not.
const GOLDEN = (await Deno.readTextFile(MODEL_DIR + "greedy_200.txt")).replace(/\n$/, "");

for (const [layout, path] of [["HF", MODEL_DIR], ["llama2.c", MODEL_DIR + "stories260K.bin"]]) {
  Deno.test({
    name: `greedy 200 tokens from BOS equal llama2.c's golden text (${layout} layout)`,
    ...gpuTest,
  }, async () => {
    const { source, tokenizer } = await openModelWithTokenizer(path);
    const engine = await inferenceEngine(source, {
      maxSeqs: 1,
      maxContext: 256,
      maxTokensPerStep: 64,
    });
    const result = await engine.generate({
      prompt: [source.config.bosTokenId!],
      maxTokens: 200,
      sampling: GREEDY,
    });
    await engine.close();
    strictEqual(result.tokens.length, 200);
    strictEqual(tokenizer.decode(result.tokens), GOLDEN);
  });
}
