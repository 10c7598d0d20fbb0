/**
 * Multi-adapter LoRA serving on a random-weight tiny Llama with GQA and two random adapters
 * (one on all seven projections, rank 8; one on q and v, rank 3, so zero-padded in the pool):
 *  (a) one batched step serving sequences on adapter A, adapter B and the base model gives each
 *      the tokens and logits it gets alone;
 *  (b) an adapter's logits match the float64 reference on merged weights W + scale · B·A;
 *  (c) publishing version 2 while a request on version 1 is mid-generation: the running request
 *      keeps version 1, a new request gets version 2, version 1 is freed afterwards;
 *  (d) the same prompt on the base model and on an adapter never shares KV blocks;
 * plus the named errors (unknown adapter, rank too large, pool full).
 */
import { deepStrictEqual, ok, rejects, strictEqual, throws } from "node:assert/strict";
import { randomModelSource, type RandomModelSpec } from "../../src/engine/model/random_model.ts";
import type { ModelConfig } from "../../src/engine/model/config.ts";
import { ropeInvFreq } from "../../src/engine/model/config.ts";
import { ReferenceModel } from "../reference/llama.ts";
import { ModelRunner, type RunnerOptions } from "../../src/engine/runner/model_runner.ts";
import type { GenerateResult } from "../../src/host/engine_api.ts";
import { GREEDY, type SequenceWork } from "../../src/engine/step.ts";
import {
  type LoraConfig,
  loraScale,
  type LoraTarget,
  type LoraWeights,
  targetModule,
  targetShape,
} from "../../src/engine/lora/lora.ts";
import {
  AdapterPoolFullError,
  LoraAdapterError,
  UnknownAdapterError,
} from "../../src/engine/errors.ts";
import { inferenceEngine, type InferenceOptions } from "../helpers/engine.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32, maxRelativeError, type Tolerance } from "../helpers/tolerance.ts";
import { randn } from "../helpers/random.ts";

/** The whole-model bound of logits.gpu.test.ts: f32 logits against a float64 reference. */
const LOGITS: Tolerance = { rtol: 1e-4 };

const SPEC: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 48,
  intermediateSize: 101,
  numLayers: 2,
  numHeads: 6,
  numKvHeads: 2,
  vocabSize: 97,
  tieWordEmbeddings: false,
  seed: 11,
};
const source = randomModelSource(SPEC);
const config = source.config;
const LORA = { maxAdapters: 3, maxRank: 8 };

/**
 * Random A and B of std 0.1 (the base weights have std 0.02): with scale 2 the adapter moves
 * the logits by about as much as the base model's own spread, so a missed or misplaced update
 * changes the greedy tokens.
 */
function randomAdapter(model: ModelConfig, lora: LoraConfig, seed: number): LoraWeights {
  return {
    config: lora,
    layers: Array.from(
      { length: model.numLayers },
      (_, l) =>
        Object.fromEntries(lora.targets.map((target, i) => {
          const shape = targetShape(model, target);
          const s = seed * 1000 + l * 10 + i;
          return [target, {
            a: randn(lora.rank * shape.in, s, 0.1),
            b: randn(shape.out * lora.rank, s + 500, 0.1),
          }];
        })),
    ),
  };
}

const ALL: LoraTarget[] = ["q", "k", "v", "o", "gate", "up", "down"];
const ADAPTER_A = randomAdapter(config, { rank: 8, alpha: 16, targets: ALL, dropout: 0 }, 1);
const ADAPTER_B = randomAdapter(config, { rank: 3, alpha: 6, targets: ["q", "v"], dropout: 0 }, 2);
const ADAPTER_A2 = randomAdapter(config, { rank: 5, alpha: 10, targets: ALL, dropout: 0 }, 3);

const baseWeights = new Map<string, Float32Array>();
for await (const t of source.tensors()) baseWeights.set(t.name, t.data);

/** The base weights with W += scale · B·A on every adapted projection (HF names). */
function mergedWeights(adapter: LoraWeights): Map<string, Float32Array> {
  const merged = new Map(baseWeights);
  const { rank } = adapter.config, scale = loraScale(adapter.config);
  adapter.layers.forEach((pairs, l) => {
    for (
      const [target, pair] of Object.entries(pairs) as [
        LoraTarget,
        { a: Float32Array; b: Float32Array },
      ][]
    ) {
      const name = `${targetModule(l, target)}.weight`;
      const { in: K, out: N } = targetShape(config, target);
      const w = Float32Array.from(merged.get(name)!);
      for (let n = 0; n < N; n++) {
        for (let k = 0; k < K; k++) {
          let sum = 0;
          for (let j = 0; j < rank; j++) sum += pair.b[n * rank + j] * pair.a[j * K + k];
          w[n * K + k] += scale * sum;
        }
      }
      merged.set(name, w);
    }
  });
  return merged;
}

const reference = (weights: Map<string, Float32Array>) =>
  new ReferenceModel({ ...config, invFreq: ropeInvFreq(config) }, weights);

const prompt = (length: number, seed: number) =>
  Array.from({ length }, (_, i) => (i * 37 + seed * 11 + 5) % config.vocabSize);

async function runnerWithAdapters(options: RunnerOptions = {}): Promise<ModelRunner> {
  const runner = await ModelRunner.create(await testContext(), source, {
    maxSeqs: 4,
    maxTokens: 48,
    maxContext: 64,
    blockSize: 8,
    lora: LORA,
    ...options,
  });
  runner.loadAdapter("A", ADAPTER_A);
  runner.loadAdapter("B", ADAPTER_B);
  return runner;
}

interface Trace {
  tokens: number[];
  /** Logits [V] of every sampling step. */
  logits: Float32Array[];
}

/**
 * Greedy generation of `steps` tokens for each sequence, all in the same steps: one prefill
 * step with every prompt, then decode steps. Sequence i uses blocks from firstBlock + 8i.
 */
async function generateTogether(
  runner: ModelRunner,
  seqs: { prompt: number[]; adapterId?: string }[],
  steps: number,
  firstBlock: number,
): Promise<Trace[]> {
  const V = config.vocabSize;
  const traces: Trace[] = seqs.map(() => ({ tokens: [], logits: [] }));
  const work = (i: number, tokens: number[], startPosition: number): SequenceWork => ({
    seqId: i,
    tokens,
    startPosition,
    blockTable: Array.from({ length: 8 }, (_, b) => firstBlock + 8 * i + b),
    sample: true,
    sampling: GREEDY,
    adapterId: seqs[i].adapterId,
  });
  let plan = seqs.map((s, i) => work(i, s.prompt, 0));
  for (let step = 0; step < steps; step++) {
    const { sampled } = await runner.execute({ sequences: plan });
    const logits = await runner.readLogits(seqs.length);
    sampled.forEach((token, i) => {
      traces[i].tokens.push(token);
      traces[i].logits.push(logits.slice(i * V, (i + 1) * V));
    });
    plan = seqs.map((s, i) => work(i, [sampled[i]], s.prompt.length + step));
  }
  return traces;
}

Deno.test({
  name: "one batched step serves adapter A, adapter B and the base model as each alone",
  ...gpuTest,
}, async () => {
  const runner = await runnerWithAdapters();
  const seqs = [
    { prompt: prompt(11, 1), adapterId: "A" },
    { prompt: prompt(6, 2), adapterId: "B" },
    { prompt: prompt(9, 3) },
    // The same prompt as the first, on the base model: the adapter must make a difference.
    { prompt: prompt(11, 1) },
  ];
  const alone: Trace[] = [];
  for (const seq of seqs) alone.push((await generateTogether(runner, [seq], 8, 0))[0]);
  const together = await generateTogether(runner, seqs, 8, 0);
  together.forEach((trace, i) => {
    deepStrictEqual(trace.tokens, alone[i].tokens, `sequence ${i} tokens`);
    trace.logits.forEach((logits, step) =>
      assertClose(logits, alone[i].logits[step], F32, `sequence ${i} step ${step}`)
    );
  });
  const { relative } = maxRelativeError(together[0].logits[0], together[3].logits[0]);
  ok(relative > 0.1, `adapter A barely changes the logits (relative change ${relative})`);
  ok(
    runner.lastCounts!.loraTokens === 2,
    `decode step counts ${runner.lastCounts!.loraTokens} adapter tokens`,
  );
  runner.destroy();
});

for (
  const [name, adapter] of [["A (all seven projections, rank 8)", ADAPTER_A], [
    "B (q, v; rank 3 padded to 8)",
    ADAPTER_B,
  ]] as const
) {
  Deno.test({
    name: `adapter ${name}: logits match the float64 reference on merged weights`,
    ...gpuTest,
  }, async () => {
    const runner = await runnerWithAdapters({ maxTokens: 4 });
    const id = adapter === ADAPTER_A ? "A" : "B";
    const merged = reference(mergedWeights(adapter));
    const base = reference(baseWeights);
    const tokens = prompt(10, 4);
    const blockTable = [5, 2, 7, 0];
    let position = 0, next = -1;
    // Prefill in chunks of 4 over cached context, then decode steps.
    const chunks = [tokens.slice(0, 4), tokens.slice(4, 8), tokens.slice(8)];
    for (let i = 0; i < chunks.length + 4; i++) {
      const chunk = chunks[i] ?? [next];
      const work: SequenceWork = {
        seqId: 0,
        tokens: chunk,
        startPosition: position,
        blockTable,
        sample: true,
        sampling: GREEDY,
        adapterId: id,
      };
      next = (await runner.execute({ sequences: [work] })).sampled[0];
      const V = config.vocabSize, last = (chunk.length - 1) * V;
      const expected = merged.forward(chunk).subarray(last, last + V);
      const baseLogits = base.forward(chunk).subarray(last, last + V);
      assertClose(await runner.readLogits(1), expected, LOGITS, `${id} at position ${position}`);
      ok(
        maxRelativeError(baseLogits, expected).relative > 0.05,
        "the adapter should change the logits",
      );
      position += chunk.length;
    }
    runner.destroy();
  });
}

/**
 * The engine's adapter pool as the runner's above: 3 adapters of rank <= 8 on all seven
 * projections. Its KV blocks are the engine's 16 tokens (the runner tests above use 8).
 */
const SERVING: InferenceOptions = {
  maxSeqs: 4,
  maxTokensPerStep: 32,
  maxContext: 64,
  maxAdapters: LORA.maxAdapters,
  adapterRank: LORA.maxRank,
  adapterTargets: ALL,
};
const GEN = { maxTokens: 10, sampling: GREEDY, ignoreEos: true };

/**
 * Tokens of each job run alone on an engine without prefix caching, adapters published in
 * order.
 */
async function aloneOutputs(
  jobs: { prompt: number[]; adapter?: LoraWeights }[],
): Promise<number[][]> {
  const engine = await inferenceEngine(source, { ...SERVING, prefixCaching: false });
  const out: number[][] = [];
  for (const job of jobs) {
    const adapter = job.adapter ? await engine.publishAdapter("x", job.adapter) : undefined;
    out.push((await engine.generate({ prompt: job.prompt, ...GEN, adapter })).tokens);
  }
  await engine.close();
  return out;
}

Deno.test({
  name:
    "publishing version 2 mid-generation: the running request keeps version 1, a new one gets 2",
  ...gpuTest,
}, async () => {
  const p1 = prompt(7, 5), p2 = prompt(13, 6);
  const [v1Alone, v2Alone, v1OnP2] = await aloneOutputs([
    { prompt: p1, adapter: ADAPTER_A },
    { prompt: p2, adapter: ADAPTER_A2 },
    { prompt: p2, adapter: ADAPTER_A },
  ]);
  ok(v1OnP2.join() !== v2Alone.join(), "versions 1 and 2 should generate differently");

  const engine = await inferenceEngine(source, SERVING);
  const resident = async () => (await engine.adapters()).map((a) => a.id);
  strictEqual(await engine.publishAdapter("style", ADAPTER_A), "style@1");
  const later: Promise<GenerateResult>[] = [];
  // Started at the first request's third token and checked after it: the engine catches what a
  // token callback throws, so an assertion failing in there would go unseen.
  const midway: Promise<[string, string[]]>[] = [];
  let seen = 0;
  const first = engine.generate({ prompt: p1, ...GEN, adapter: "style" }, () => {
    if (++seen !== 3) return;
    midway.push(Promise.all([engine.publishAdapter("style", ADAPTER_A2), resident()]));
    later.push(engine.generate({ prompt: p2, ...GEN, adapter: "style" }));
  });
  deepStrictEqual((await first).tokens, v1Alone);
  strictEqual(midway.length, 1, "version 2 was published mid-generation");
  const [v2, residentThen] = await midway[0];
  strictEqual(v2, "style@2");
  deepStrictEqual(residentThen, ["style@1", "style@2"]);
  // Version 1 is superseded and its last request ended: freed, with its cached KV blocks.
  deepStrictEqual(await resident(), ["style@2"]);
  deepStrictEqual(engine.runner.adapters, ["style@2"]);
  strictEqual(later.length, 1, "the second request was submitted mid-generation");
  deepStrictEqual((await later[0]).tokens, v2Alone);
  // A versioned id names that version; the freed one is unknown now.
  deepStrictEqual(
    (await engine.generate({ prompt: p2, ...GEN, adapter: "style@2" })).tokens,
    v2Alone,
  );
  await rejects(
    engine.generate({ prompt: p2, ...GEN, adapter: "style@1" }),
    UnknownAdapterError,
  );
  engine.blockManager.checkIntegrity();
  await engine.close();
});

Deno.test({
  name: "the same prompt on the base model and on an adapter shares no KV blocks",
  ...gpuTest,
}, async () => {
  const p = prompt(21, 7); // one full block of 16 can be shared
  const [baseAlone, adapterAlone] = await aloneOutputs([{ prompt: p }, {
    prompt: p,
    adapter: ADAPTER_A,
  }]);
  ok(baseAlone.join() !== adapterAlone.join(), "the adapter should change the output");

  const engine = await inferenceEngine(source, SERVING);
  await engine.publishAdapter("x", ADAPTER_A);
  // Submitted together: both commit the same token blocks, under different trie roots.
  const [base1, adapter1] = await Promise.all([
    engine.generate({ prompt: p, ...GEN }),
    engine.generate({ prompt: p, ...GEN, adapter: "x" }),
  ]);
  engine.blockManager.checkIntegrity();
  // Then one after the other: each hits only its own cached prefix.
  const adapter2 = await engine.generate({ prompt: p, ...GEN, adapter: "x" });
  const base2 = await engine.generate({ prompt: p, ...GEN });
  engine.blockManager.checkIntegrity();
  deepStrictEqual([base1, base2].map((o) => o.tokens), [baseAlone, baseAlone]);
  deepStrictEqual([adapter1, adapter2].map((o) => o.tokens), [adapterAlone, adapterAlone]);
  deepStrictEqual([base1, adapter1, adapter2, base2].map((o) => o.prefixHitTokens), [0, 0, 16, 16]);
  await engine.close();
});

Deno.test({
  name: "adapter errors: unknown name, rank above the pool's, pool full, no pool",
  ...gpuTest,
}, async () => {
  const engine = await inferenceEngine(source, SERVING);
  await engine.publishAdapter("a", ADAPTER_A);
  await rejects(
    engine.generate({ prompt: prompt(3, 1), ...GEN, adapter: "nope" }),
    (error: unknown) => {
      ok(error instanceof UnknownAdapterError);
      deepStrictEqual(error.known, ["a", "a@1"]);
      return true;
    },
  );
  const big = randomAdapter(config, { rank: 9, alpha: 9, targets: ["q"], dropout: 0 }, 4);
  await rejects(
    engine.publishAdapter("big", big),
    /rank 9 exceeds the adapter pool's maximum rank 8/,
  );
  const bad = {
    ...ADAPTER_B,
    layers: ADAPTER_B.layers.map((l) => ({ ...l, v: { a: l.v!.a, b: l.v!.b.subarray(1) } })),
  };
  await rejects(engine.publishAdapter("bad", bad), LoraAdapterError);
  await engine.publishAdapter("b", ADAPTER_B);
  await engine.publishAdapter("c", ADAPTER_B);
  await rejects(engine.publishAdapter("d", ADAPTER_B), AdapterPoolFullError);
  // A new version of an idle adapter replaces it even when the pool is full.
  strictEqual(await engine.publishAdapter("c", ADAPTER_A2), "c@2");
  deepStrictEqual((await engine.adapters()).map((a) => a.id), ["a@1", "b@1", "c@2"]);
  await engine.close();

  const plain = await ModelRunner.create(await testContext(), source, {
    maxSeqs: 1,
    maxTokens: 8,
    maxContext: 16,
  });
  throws(
    () => plain.loadAdapter("A", ADAPTER_A),
    /no adapter pool; create it with the lora option/,
  );
  throws(
    () =>
      plain.execute({
        sequences: [{
          seqId: 0,
          tokens: [1],
          startPosition: 0,
          blockTable: [0],
          sample: true,
          sampling: GREEDY,
          adapterId: "A",
        }],
      }),
    UnknownAdapterError,
  );
  strictEqual(plain.memory.loraBytes, 0);
  plain.destroy();
});
