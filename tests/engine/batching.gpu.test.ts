/**
 * Continuous batching must not change what a request generates: 16 prompts of
 * different lengths, arriving at different steps, mixing prefill chunks and
 * decodes in one batch, each produce exactly the tokens they produce alone, at
 * several prefill chunk sizes, with prefix sharing, and under preemption.
 * Prompts are slices of the bundled model's own golden text; half the requests
 * sample greedily, half at temperature 0.9 with their own seed.
 */
import { deepStrictEqual, ok } from "node:assert/strict";
import { openModelWithTokenizer } from "../../src/engine/load.ts";
import type { SamplingParams } from "../../src/engine/step.ts";
import type { GenerateResult } from "../../src/host/engine_api.ts";
import { inferenceEngine, type InferenceOptions } from "../helpers/engine.ts";
import { gpuTest } from "../helpers/gpu.ts";

const MODEL_DIR = new URL("../../models/stories260K/", import.meta.url).pathname;
const GOLDEN = await Deno.readTextFile(MODEL_DIR + "greedy_200.txt");
const { source, tokenizer } = await openModelWithTokenizer(MODEL_DIR);
const BOS = source.config.bosTokenId!;
const GEN_TOKENS = 20;

interface Job {
  prompt: number[];
  sampling: SamplingParams;
}

function jobs(prompts: number[][]): Job[] {
  return prompts.map((prompt, i) => ({
    prompt,
    sampling: i % 2 === 0
      ? { temperature: 0, topK: 0, topP: 1, seed: 0 }
      : { temperature: 0.9, topK: 40, topP: 0.95, seed: 1000 + i },
  }));
}

/** 16 prompts of 1 to 91 tokens from different places of the golden text. */
const words = GOLDEN.split(" ");
const MIXED = jobs(Array.from({ length: 16 }, (_, i) => {
  const text = words.slice(i * 5, i * 5 + ((i * 7) % 45)).join(" ");
  return [BOS, ...tokenizer.encode(text, { addSpecialTokens: false })];
}));

/** A 64-token common prefix (4 full blocks), then 16 different endings. */
const COMMON = [BOS, ...tokenizer.encode(GOLDEN, { addSpecialTokens: false })].slice(0, 64);
const SHARED = jobs(Array.from({ length: 16 }, (_, i) => [
  ...COMMON,
  ...tokenizer.encode(words.slice(40 + i * 3, 40 + i * 3 + (i % 5) + 1).join(" "), {
    addSpecialTokens: false,
  }),
]));

const BASE: InferenceOptions = { maxContext: 192 };

async function alone(list: Job[]): Promise<number[][]> {
  const engine = await inferenceEngine(source, {
    ...BASE,
    maxSeqs: 1,
    maxTokensPerStep: 64,
    prefixCaching: false,
  });
  const out: number[][] = [];
  for (const job of list) {
    const { prompt, sampling } = job;
    out.push((await engine.generate({ prompt, maxTokens: GEN_TOKENS, sampling })).tokens);
  }
  await engine.close();
  return out;
}

/**
 * All jobs on one engine: the first four at once, then one more each time request 0
 * emits a token, so requests join while others are mid-prefill or decoding.
 */
async function batched(list: Job[], options: InferenceOptions): Promise<GenerateResult[]> {
  const engine = await inferenceEngine(source, { ...BASE, ...options });
  const results: Promise<GenerateResult>[] = [];
  let next = 0;
  const submit = () => {
    const job = list[next++];
    results.push(engine.generate(
      { prompt: job.prompt, maxTokens: GEN_TOKENS, sampling: job.sampling, ignoreEos: true },
      results.length === 0 ? () => next < list.length && submit() : undefined,
    ));
  };
  while (next < 4) submit();
  // Request 0 ends after GEN_TOKENS tokens; submit whatever is left then.
  await results[0];
  while (next < list.length) submit();
  const outputs = await Promise.all(results);
  engine.blockManager.checkIntegrity();
  await engine.close();
  return outputs;
}

const mixedAlone = alone(MIXED.map((j) => j));

for (const chunk of [5, 16, 64]) {
  Deno.test({
    name: `16 mixed requests batched (prefill chunk ${chunk}) equal each run alone`,
    ...gpuTest,
  }, async () => {
    const expected = await mixedAlone;
    const outputs = await batched(MIXED, {
      maxSeqs: 16,
      maxTokensPerStep: chunk,
      prefixCaching: false,
    });
    deepStrictEqual(outputs.map((o) => o.tokens), expected);
  });
}

Deno.test({
  name: "16 requests sharing a 64-token prefix reuse its blocks and equal each run alone",
  ...gpuTest,
}, async () => {
  const expected = await alone(SHARED);
  const outputs = await batched(SHARED, {
    maxSeqs: 16,
    maxTokensPerStep: 32,
    prefixCaching: true,
  });
  deepStrictEqual(outputs.map((o) => o.tokens), expected);
  // Requests admitted after the first's prefix blocks were committed hit all 4 blocks.
  const hits = outputs.map((o) => o.prefixHitTokens);
  ok(hits.filter((h) => h === 64).length >= 8, `prefix hits per request: ${hits}`);
});

Deno.test({
  name: "a KV pool too small for all requests preempts and recomputes, same tokens",
  ...gpuTest,
}, async () => {
  const expected = await mixedAlone;
  // 30 blocks of 16 = 480 token slots for 16 requests of up to 91 + 20 tokens.
  const outputs = await batched(MIXED, {
    maxSeqs: 16,
    maxTokensPerStep: 32,
    kvBlocks: 30,
    prefixCaching: true,
  });
  deepStrictEqual(outputs.map((o) => o.tokens), expected);
  ok(outputs.some((o) => o.preemptions > 0), "expected at least one preemption");
});
