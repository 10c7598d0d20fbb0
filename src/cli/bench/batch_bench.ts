/**
 * `mace bench --batch`: what continuous batching and prefix sharing buy on the serving path
 * (MaceEngine, inference-only, pipelined steps), on one model:
 *  (a) decode throughput at several numbers of concurrent sequences;
 *  (b) KV memory per token and the KV pool;
 *  (c) a shared-system-prompt workload run with prefix sharing on and off (prefix_bench.ts).
 * Every number comes from real requests through MaceEngine.generate.
 */
import type { GpuContext } from "../../engine/gpu/context.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import type { ScheduledStep } from "../../scheduler/batch_scheduler.ts";
import { BENCH_PIPELINE_DEPTH, prefillTokensOf, promptIds, TokenClock } from "./measure.ts";
import {
  PREFIX_ARRIVAL,
  PREFIX_CHUNK_TOKENS,
  type PrefixRun,
  runPrefixWorkload,
  SUFFIX_TOKENS,
} from "./prefix_bench.ts";

export interface BatchBenchOptions {
  batchSizes: number[];
  /** Prompt tokens of each request of the decode workload. */
  promptTokens: number;
  /** Tokens each request generates (both workloads). */
  genTokens: number;
  prefixTokens: number;
  requests: number;
  /** Each measurement is repeated this many times (interleaved) and the fastest kept. */
  rounds: number;
  weightDtype: "f32" | "f16";
}

export interface DecodeRun {
  batch: number;
  /** Generated tokens over all requests (first tokens included). */
  generatedTokens: number;
  /** Tokens counted in tokensPerSecond: every request's tokens after its first. */
  decodeTokens: number;
  decodeWallMs: number;
  tokensPerSecond: number;
  /** tokensPerSecond / the batch-1 figure (null without a batch-1 run). */
  ratioToBatch1: number | null;
  /** Engine steps that held prefill tokens (1: every prompt was prefilled in one step). */
  prefillSteps: number;
  /**
   * Steps without prefill tokens. Includes the engine's trailing step that only writes the
   * final tokens' K/V (it samples nothing and runs after the window closes).
   */
  decodeSteps: number;
  /** decodeWallMs / (genTokens - 1): the window's length per decode step. */
  msPerDecodeStep: number;
}

export interface BatchBenchResult {
  kind: "batch";
  name: string;
  date: string;
  backend: string;
  adapter: string;
  software: boolean;
  weightDtype: string;
  config: ModelSource["config"];
  layers: number;
  /** Host load averages (1, 5, 15 min) at the end: on a software adapter other work slows it. */
  hostLoadAverage: number[];
  sizes: {
    batchSizes: number[];
    promptTokens: number;
    genTokens: number;
    prefixTokens: number;
    suffixTokens: number;
    requests: number;
    prefixChunkTokens: number;
    pipelineDepth: number;
    /** Runs per measurement; each figure is its fastest run. */
    rounds?: number;
  };
  loadMs: number;
  decode: {
    definition: string;
    /** Per batch size, the fastest of `rounds` runs. */
    runs: DecodeRun[];
    /** Throughput rises with every step up in batch size. */
    grows: boolean;
  };
  kv: {
    bytesPerToken: number;
    blockSize: number;
    poolBlocks: number;
    poolTokens: number;
    poolBytes: number;
  };
  prefix: {
    arrival: string;
    /** Per mode, the run with the fastest prefill of `rounds` runs. */
    on: PrefixRun;
    off: PrefixRun;
    /** off / on: how much sharing saves (> 1 = better with sharing). */
    ratios: { prefillMs: number; peakUsedBlocks: number; prefillTokensComputed: number };
  };
}

const DECODE_DEFINITION =
  "tokensPerSecond = sum over the batch's requests of (generated tokens - 1) / (ms from the " +
  "earliest first token to the latest last token of the batch). All requests are submitted at " +
  "once with distinct prompts and are prefilled together (prefillSteps = 1 when one step held " +
  "them all), so the window holds decode steps only. EOS is ignored: every request generates " +
  "genTokens.";

export async function runBatchBench(
  ctx: GpuContext,
  name: string,
  source: ModelSource,
  options: BatchBenchOptions,
  log: (line: string) => void = () => {},
): Promise<BatchBenchResult> {
  const { promptTokens, genTokens, prefixTokens, requests, rounds } = options;
  const batchSizes = [...options.batchSizes].sort((a, b) => a - b);
  const maxBatch = batchSizes.at(-1)!;
  const vocab = source.config.vocabSize;

  // (a) Decode: one engine, big enough that the largest batch's prompts fit one step.
  let onStep: ((step: ScheduledStep) => void) | null = null;
  const loadStart = performance.now();
  const engine = await MaceEngine.open(ctx, source, {
    policy: "inference-only",
    maxContext: promptTokens + genTokens + 1,
    serving: {
      weights: options.weightDtype,
      maxSeqs: maxBatch,
      maxTokensPerStep: maxBatch * promptTokens,
      prefixCaching: false,
      pipelineDepth: BENCH_PIPELINE_DEPTH,
    },
  });
  engine.onStep = (step) => onStep?.(step);
  const loadMs = performance.now() - loadStart;
  const runBatch = async (batch: number, seedBase: number, maxTokens = genTokens) => {
    const clocks = Array.from({ length: batch }, () => new TokenClock());
    let prefillSteps = 0, decodeSteps = 0;
    onStep = (step) => (prefillTokensOf(step) > 0 ? prefillSteps++ : decodeSteps++);
    const outputs = await Promise.all(
      clocks.map((clock, i) =>
        engine.generate(
          { prompt: promptIds(promptTokens, vocab, seedBase + i), maxTokens, ignoreEos: true },
          clock.onToken,
        )
      ),
    );
    onStep = null;
    const start = Math.min(...clocks.map((c) => c.first));
    const end = Math.max(...clocks.map((c) => c.last));
    const generatedTokens = outputs.reduce((n, o) => n + o.tokens.length, 0);
    return {
      generatedTokens,
      decodeTokens: generatedTokens - batch,
      ms: end - start,
      prefillSteps,
      decodeSteps,
    };
  };
  // Warm-up at every batch size (a prefill and a decode step each): first dispatches of a
  // kernel variant (the matmul picks one by row count) pay one-time costs that are not speed.
  log(`warm-up: ${batchSizes.join(", ")} sequences`);
  for (const batch of batchSizes) await runBatch(batch, 1_000_000 + 1000 * batch, 2);
  // Rounds interleave the batch sizes and keep each one's fastest run: on a shared machine
  // (a software GPU is the CPU) other work slows some runs, and interleaving spreads that.
  const runs: DecodeRun[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const [i, batch] of batchSizes.entries()) {
      const r = await runBatch(batch, 1000 * batch + round);
      const tokensPerSecond = r.ms > 0 ? r.decodeTokens / (r.ms / 1000) : 0;
      log(
        `decode batch ${batch}, round ${round + 1}/${rounds}: ${
          tokensPerSecond.toFixed(2)
        } tokens/s`,
      );
      if (runs[i] && runs[i].tokensPerSecond >= tokensPerSecond) continue;
      runs[i] = {
        batch,
        generatedTokens: r.generatedTokens,
        decodeTokens: r.decodeTokens,
        decodeWallMs: r.ms,
        tokensPerSecond,
        ratioToBatch1: null,
        prefillSteps: r.prefillSteps,
        decodeSteps: r.decodeSteps,
        // The window spans genTokens - 1 steps, each giving every request one token.
        msPerDecodeStep: r.ms / Math.max(1, genTokens - 1),
      };
    }
  }
  const one = runs.find((r) => r.batch === 1);
  for (const r of runs) r.ratioToBatch1 = one ? r.tokensPerSecond / one.tokensPerSecond : null;
  const grows = runs.every((r, i) => i === 0 || r.tokensPerSecond > runs[i - 1].tokensPerSecond);
  const memory = engine.runner.memory;
  const blockSize = engine.runner.capacity.blockSize;
  await engine.close();

  // (c) Shared system prompt, with and without prefix sharing.
  // Same rounds, on then off, keeping each mode's fastest prefill (the other figures do not
  // depend on speed).
  let on: PrefixRun | null = null, off: PrefixRun | null = null;
  for (let round = 0; round < rounds; round++) {
    for (const prefixCaching of [true, false]) {
      const r = await runPrefixWorkload(ctx, source, { ...options, prefixCaching });
      log(
        `prefix sharing ${prefixCaching ? "on" : "off"}, round ${round + 1}/${rounds}: ` +
          `prefill ${r.prefillMs.toFixed(0)} ms`,
      );
      const best = prefixCaching ? on : off;
      if (best && best.prefillMs <= r.prefillMs) continue;
      if (prefixCaching) on = r;
      else off = r;
    }
  }
  if (!on || !off) throw new Error("bench --batch: rounds must be at least 1");

  return {
    kind: "batch",
    name,
    date: new Date().toISOString(),
    backend: ctx.backend,
    adapter: ctx.adapterDescription,
    software: ctx.isSoftware,
    weightDtype: options.weightDtype,
    config: source.config,
    layers: source.config.numLayers,
    hostLoadAverage: Deno.loadavg(),
    sizes: {
      batchSizes,
      promptTokens,
      genTokens,
      prefixTokens,
      suffixTokens: SUFFIX_TOKENS,
      requests,
      prefixChunkTokens: PREFIX_CHUNK_TOKENS,
      pipelineDepth: BENCH_PIPELINE_DEPTH,
      rounds,
    },
    loadMs,
    decode: { definition: DECODE_DEFINITION, runs, grows },
    kv: {
      bytesPerToken: memory.kvBytesPerToken,
      blockSize,
      poolBlocks: memory.kvBlocks,
      poolTokens: memory.kvTokens,
      poolBytes: memory.kvBytes,
    },
    prefix: {
      arrival: PREFIX_ARRIVAL,
      on,
      off,
      ratios: {
        prefillMs: off.prefillMs / on.prefillMs,
        peakUsedBlocks: off.peakUsedBlocks / on.peakUsedBlocks,
        prefillTokensComputed: off.prefillTokensComputed / on.prefillTokensComputed,
      },
    },
  };
}
