/**
 * `mace bench --loop`: decode throughput of the one engine loop with feedback flowing, at
 * several pipeline depths, in one process. The workload, the same at every depth: `requests`
 * concurrent requests of `genTokens` tokens each (ignoreEos) and, submitted just before them,
 * `pairs` feedback pairs, so the mace policy co-schedules DPO slices with the decodes. Depth 1
 * keeps one iteration in flight (the loop before pipelining); the ratios are against it.
 *
 * Measures only through the Engine interface, so the same function times any engine.
 */
import type { Engine, FeedbackPair, GenerateResult } from "../../host/engine_api.ts";
import { promptIds, TokenClock } from "./measure.ts";

export interface LoopWorkload {
  requests: number;
  promptTokens: number;
  genTokens: number;
  /** Feedback pairs submitted with the requests (0: serving alone). */
  pairs: number;
  /** Tokens of each pair's prompt and of each response. */
  pairPromptTokens: number;
  pairResponseTokens: number;
}

export interface LoopRun {
  depth: number;
  policy: string;
  /** Decode tokens (all tokens after each request's first) per second of the decode window. */
  decodeTokensPerSecond: number;
  decodeTokens: number;
  /** From the first request's first token to the last request's last token. */
  windowMs: number;
  /** DPO slices run, optimizer steps and pairs trained by the end of the window. */
  finetuneSlices: number;
  optimizerSteps: number;
  pairsTrained: number;
  /** The cost model's mean absolute error on this run's iterations (a fraction). */
  predictionError: number | null;
}

/** Pairs of seeded token ids: content is irrelevant to speed, lengths are what cost. */
export function loopFeedback(w: LoopWorkload, vocab: number): FeedbackPair[] {
  return Array.from({ length: w.pairs }, (_, i) => ({
    prompt: promptIds(w.pairPromptTokens, vocab, 500 + i),
    chosen: promptIds(w.pairResponseTokens, vocab, 700 + i),
    rejected: promptIds(w.pairResponseTokens, vocab, 900 + i),
  }));
}

/** Runs the workload once on `engine` (fresh: its metrics start at zero). */
export async function runLoopWorkload(
  engine: Engine,
  w: LoopWorkload,
  depth: number,
): Promise<LoopRun> {
  const info = await engine.info();
  if (w.pairs > 0) await engine.submitFeedback(loopFeedback(w, info.vocabSize));
  const clocks = Array.from({ length: w.requests }, () => new TokenClock());
  const outputs: GenerateResult[] = await Promise.all(clocks.map((clock, i) =>
    engine.generate(
      {
        prompt: promptIds(w.promptTokens, info.vocabSize, 100 + i),
        maxTokens: w.genTokens,
        ignoreEos: true,
      },
      clock.onToken,
    )
  ));
  const windowMs = Math.max(...clocks.map((c) => c.last)) - Math.min(...clocks.map((c) => c.first));
  const metrics = await engine.metrics();
  const decodeTokens = outputs.reduce((n, o) => n + o.tokens.length - 1, 0);
  return {
    depth,
    policy: info.policy,
    decodeTokensPerSecond: decodeTokens / (windowMs / 1000),
    decodeTokens,
    windowMs,
    finetuneSlices: metrics.finetuneSlices,
    optimizerSteps: metrics.optimizerSteps,
    pairsTrained: metrics.summary.finetune.pairsTrained,
    predictionError: metrics.prediction.meanAbsPercentError,
  };
}
