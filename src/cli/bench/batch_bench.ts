/**
 * `mace bench --batch`: what continuous batching and prefix sharing buy on the serving path
 * (ServingEngine, pipelined steps), on one model:
 *  (a) decode throughput at several numbers of concurrent sequences;
 *  (b) KV memory per token and the KV pool;
 *  (c) a shared-system-prompt workload run with prefix sharing on and off.
 * Every number comes from real requests through ServingEngine.generate.
 */
import type { GpuContext } from "../../engine/gpu/context.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import { GREEDY } from "../../engine/step.ts";
import { ServingEngine } from "../../host/serving_engine.ts";
import type { ScheduledStep } from "../../scheduler/batch_scheduler.ts";
import { promptIds } from "./measure.ts";

export interface BatchBenchOptions {
  batchSizes: number[];
  /** Prompt tokens of each request of the decode workload. */
  promptTokens: number;
  /** Tokens each request generates (both workloads). */
  genTokens: number;
  prefixTokens: number;
  requests: number;
  weightDtype: "f32" | "f16";
}

/** Distinct tokens after the shared prefix in the prefix workload (less than one KV block). */
export const SUFFIX_TOKENS = 8;
/** Per-step token budget (prefill chunk) of the prefix workload's engines: the runner's default. */
export const PREFIX_CHUNK_TOKENS = 512;
export const PIPELINE_DEPTH = 3;

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

export interface PrefixRun {
  prefixCaching: boolean;
  /** ms from the first request's submit until every request has its first token. */
  prefillMs: number;
  /** ms from the other requests' submit until every one of them has its first token. */
  restPrefillMs: number;
  meanRestTtftMs: number;
  /** Max over steps of blockManager.stats().used, read after each step (onStep). */
  peakUsedBlocks: number;
  peakUsedKvBytes: number;
  /** Prompt tokens in the steps' plans (recomputes after preemption included). */
  prefillTokensComputed: number;
  /** Block manager view: prompt tokens allocated minus those served from the prefix cache. */
  promptTokens: number;
  prefixHitTokens: number;
  preemptions: number;
  totalMs: number;
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
  };
  loadMs: number;
  decode: {
    definition: string;
    runs: DecodeRun[];
    /** Throughput rises with every step up in batch size. */
    grows: boolean;
  };
  kv: { bytesPerToken: number; blockSize: number; poolBlocks: number; poolTokens: number; poolBytes: number };
  prefix: {
    arrival: string;
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

const PREFIX_ARRIVAL =
  "request 0 (prefix + its suffix) is submitted alone; when its first token arrives the other " +
  "requests - 1 are submitted together, so they can share the prefix blocks it computed. Each " +
  "run has a fresh engine, warmed with one request of the same length and unrelated tokens.";

/** A request stream observer: first and last token times (performance.now()). */
class TokenClock {
  first = -1;
  last = -1;
  readonly onToken = () => {
    const now = performance.now();
    if (this.first < 0) this.first = now;
    this.last = now;
  };
}

/** Prompt tokens (positions < prompt length) a step computes. */
function prefillTokensOf(step: ScheduledStep): number {
  let n = 0;
  for (const e of step.entries) {
    const promptLength = e.request.request.prompt.length;
    n += Math.max(0, Math.min(e.start + e.count, promptLength) - e.start);
  }
  return n;
}

export async function runBatchBench(
  ctx: GpuContext,
  name: string,
  source: ModelSource,
  options: BatchBenchOptions,
  log: (line: string) => void = () => {},
): Promise<BatchBenchResult> {
  const { promptTokens, genTokens, prefixTokens, requests } = options;
  const batchSizes = [...options.batchSizes].sort((a, b) => a - b);
  const maxBatch = batchSizes.at(-1)!;
  const vocab = source.config.vocabSize;
  const request = { maxTokens: genTokens, sampling: GREEDY, eosIds: [] as number[] };

  // (a) Decode: one engine, big enough that the largest batch's prompts fit one step.
  let onStep: ((step: ScheduledStep) => void) | null = null;
  const loadStart = performance.now();
  const engine = await ServingEngine.create(ctx, source, {
    weightDtype: options.weightDtype,
    maxSeqs: maxBatch,
    maxTokens: maxBatch * promptTokens,
    maxContext: promptTokens + genTokens + 1,
    prefixCaching: false,
    pipelineDepth: PIPELINE_DEPTH,
    onStep: (step) => onStep?.(step),
  });
  const loadMs = performance.now() - loadStart;
  const runBatch = async (batch: number, seedBase: number, maxTokens = genTokens) => {
    const clocks = Array.from({ length: batch }, () => new TokenClock());
    let prefillSteps = 0, decodeSteps = 0;
    onStep = (step) => (prefillTokensOf(step) > 0 ? prefillSteps++ : decodeSteps++);
    const outputs = await Promise.all(clocks.map((clock, i) =>
      engine.generate(promptIds(promptTokens, vocab, seedBase + i), { ...request, maxTokens, onToken: clock.onToken })
    ));
    onStep = null;
    const start = Math.min(...clocks.map((c) => c.first));
    const end = Math.max(...clocks.map((c) => c.last));
    const generatedTokens = outputs.reduce((n, o) => n + o.tokens.length, 0);
    return { generatedTokens, decodeTokens: generatedTokens - batch, ms: end - start, prefillSteps, decodeSteps };
  };
  // Warm-up at the largest batch (a full-size prefill and decode step): first dispatches at
  // full size pay one-time costs that are not throughput.
  log(`warm-up: ${maxBatch} sequences`);
  await runBatch(maxBatch, 1_000_000, 2);
  const runs: DecodeRun[] = [];
  for (const batch of batchSizes) {
    const r = await runBatch(batch, 1000 * batch);
    const tokensPerSecond = r.ms > 0 ? r.decodeTokens / (r.ms / 1000) : 0;
    runs.push({
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
    });
    log(`decode batch ${batch}: ${tokensPerSecond.toFixed(2)} tokens/s`);
  }
  const one = runs.find((r) => r.batch === 1);
  for (const r of runs) r.ratioToBatch1 = one ? r.tokensPerSecond / one.tokensPerSecond : null;
  const grows = runs.every((r, i) => i === 0 || r.tokensPerSecond > runs[i - 1].tokensPerSecond);
  const memory = engine.runner.memory;
  const blockSize = engine.runner.capacity.blockSize;
  engine.destroy();

  // (c) Shared system prompt, with and without prefix sharing.
  const prefixRun = async (prefixCaching: boolean): Promise<PrefixRun> => {
    const r = await runPrefixWorkload(ctx, source, { ...options, prefixCaching });
    log(`prefix sharing ${prefixCaching ? "on" : "off"}: prefill ${r.prefillMs.toFixed(0)} ms`);
    return r;
  };
  const on = await prefixRun(true);
  const off = await prefixRun(false);

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
      pipelineDepth: PIPELINE_DEPTH,
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

/** One run of the shared-system-prompt workload on a fresh engine. */
async function runPrefixWorkload(
  ctx: GpuContext,
  source: ModelSource,
  options: BatchBenchOptions & { prefixCaching: boolean },
): Promise<PrefixRun> {
  const { genTokens, prefixTokens, requests, prefixCaching } = options;
  const vocab = source.config.vocabSize;
  const promptLength = prefixTokens + SUFFIX_TOKENS;
  let onStep: ((step: ScheduledStep) => void) | null = null;
  const engine = await ServingEngine.create(ctx, source, {
    weightDtype: options.weightDtype,
    maxSeqs: requests,
    maxTokens: PREFIX_CHUNK_TOKENS,
    maxContext: promptLength + genTokens + 1,
    prefixCaching,
    pipelineDepth: PIPELINE_DEPTH,
    onStep: (step) => onStep?.(step),
  });
  try {
    const request = { maxTokens: genTokens, sampling: GREEDY, eosIds: [] as number[] };
    // Warm-up at the workload's prompt length, with tokens no request below shares.
    await engine.generate(promptIds(promptLength, vocab, 999_999), request);
    const before = engine.blockManager.stats();

    const prefix = promptIds(prefixTokens, vocab, 7);
    const prompts = Array.from({ length: requests }, (_, i) => [
      ...prefix,
      ...promptIds(SUFFIX_TOKENS, vocab, 100 + i),
    ]);
    let peakUsedBlocks = 0, prefillTokensComputed = 0;
    onStep = (step) => {
      peakUsedBlocks = Math.max(peakUsedBlocks, engine.blockManager.stats().used);
      prefillTokensComputed += prefillTokensOf(step);
    };
    const clocks = prompts.map(() => new TokenClock());
    let firstTokenSeen!: () => void;
    const firstToken = new Promise<void>((resolve) => (firstTokenSeen = resolve));
    const t0 = performance.now();
    const first = engine.generate(prompts[0], {
      ...request,
      onToken: () => {
        clocks[0].onToken();
        firstTokenSeen();
      },
    });
    await firstToken;
    const t1 = performance.now();
    const rest = prompts.slice(1).map((p, i) =>
      engine.generate(p, { ...request, onToken: clocks[i + 1].onToken })
    );
    const outputs = await Promise.all([first, ...rest]);
    const end = performance.now();
    onStep = null;

    const after = engine.blockManager.stats();
    const firsts = clocks.map((c) => c.first);
    const restFirsts = firsts.slice(1);
    return {
      prefixCaching,
      prefillMs: Math.max(...firsts) - t0,
      restPrefillMs: restFirsts.length ? Math.max(...restFirsts) - t1 : 0,
      meanRestTtftMs: restFirsts.length
        ? outputs.slice(1).reduce((s, o) => s + o.ttftMs, 0) / restFirsts.length
        : 0,
      peakUsedBlocks,
      peakUsedKvBytes: peakUsedBlocks * engine.runner.capacity.blockSize *
        engine.runner.memory.kvBytesPerToken,
      prefillTokensComputed,
      promptTokens: after.promptTokens - before.promptTokens,
      prefixHitTokens: after.prefixHitTokens - before.prefixHitTokens,
      preemptions: outputs.reduce((n, o) => n + o.preemptions, 0),
      totalMs: end - t0,
    };
  } finally {
    engine.destroy();
  }
}
