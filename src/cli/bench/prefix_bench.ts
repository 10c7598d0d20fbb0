/**
 * The shared-system-prompt workload of `mace bench --batch`: R requests that share a P-token
 * prefix and differ in a short suffix, on a fresh MaceEngine (inference-only) with prefix sharing
 * on or off.
 * Reports prefill time, peak KV blocks in use and the prompt tokens actually computed.
 */
import type { GpuContext } from "../../engine/gpu/context.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import type { ScheduledStep } from "../../scheduler/batch_scheduler.ts";
import { BENCH_PIPELINE_DEPTH, prefillTokensOf, promptIds, TokenClock } from "./measure.ts";

/** Distinct tokens after the shared prefix (less than one KV block). */
export const SUFFIX_TOKENS = 8;
/** Per-step token budget (prefill chunk) of the workload's engines: the runner's default. */
export const PREFIX_CHUNK_TOKENS = 512;

export interface PrefixWorkloadOptions {
  prefixTokens: number;
  requests: number;
  /** Tokens each request generates. */
  genTokens: number;
  weightDtype: "f32" | "f16";
  prefixCaching: boolean;
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

export const PREFIX_ARRIVAL =
  "request 0 (prefix + its suffix) is submitted alone; when its first token arrives the other " +
  "requests - 1 are submitted together, so they can share the prefix blocks it computed. Each " +
  "run has a fresh engine, warmed with one request of the same length and unrelated tokens.";

/** One run of the shared-system-prompt workload on a fresh engine. */
export async function runPrefixWorkload(
  ctx: GpuContext,
  source: ModelSource,
  options: PrefixWorkloadOptions,
): Promise<PrefixRun> {
  const { genTokens, prefixTokens, requests, prefixCaching } = options;
  const vocab = source.config.vocabSize;
  const promptLength = prefixTokens + SUFFIX_TOKENS;
  let onStep: ((step: ScheduledStep) => void) | null = null;
  const engine = await MaceEngine.open(ctx, source, {
    policy: "inference-only",
    maxContext: promptLength + genTokens + 1,
    serving: {
      weights: options.weightDtype,
      maxSeqs: requests,
      maxTokensPerStep: PREFIX_CHUNK_TOKENS,
      prefixCaching,
      pipelineDepth: BENCH_PIPELINE_DEPTH,
    },
  });
  engine.onStep = (step) => onStep?.(step);
  try {
    const request = { maxTokens: genTokens, ignoreEos: true };
    // Warm-up at the workload's prompt length, with tokens no request below shares.
    await engine.generate({ prompt: promptIds(promptLength, vocab, 999_999), ...request });
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
    const first = engine.generate({ prompt: prompts[0], ...request }, () => {
      clocks[0].onToken();
      firstTokenSeen();
    });
    await firstToken;
    const t1 = performance.now();
    const rest = prompts.slice(1).map((p, i) =>
      engine.generate({ prompt: p, ...request }, clocks[i + 1].onToken)
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
    await engine.close();
  }
}
