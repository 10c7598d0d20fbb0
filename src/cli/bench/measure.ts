/** Small measurement helpers shared by the benchmarks: prompts, medians, token clocks, rates. */
import type { ScheduledStep } from "../../scheduler/batch_scheduler.ts";
import type { RequestOutput } from "../../scheduler/request.ts";

/** Seeded token ids in [3, vocab): a prompt of the right length, content irrelevant to speed. */
export function promptIds(n: number, vocab: number, seed = 12345): number[] {
  let x = seed >>> 0;
  return Array.from({ length: n }, () => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return 3 + (x % (vocab - 3));
  });
}

export function median(values: readonly number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/**
 * Decode rate of one request's own token stream: tokens after its first / ms from its first
 * to its last token (RequestOutput.tokenTimesMs holds exactly those gaps), so its prefill
 * and time to first token are left out.
 */
export function decodeRate(
  output: RequestOutput,
): { tokens: number; ms: number; tokensPerSecond: number } {
  const tokens = output.tokenTimesMs.length;
  const ms = output.tokenTimesMs.reduce((a, b) => a + b, 0);
  return { tokens, ms, tokensPerSecond: ms > 0 ? tokens / (ms / 1000) : 0 };
}

/** Steps the benchmarks keep in flight on the serving engine (its default). */
export const BENCH_PIPELINE_DEPTH = 3;

/** A request stream observer: first and last token times (performance.now()). */
export class TokenClock {
  first = -1;
  last = -1;
  readonly onToken = () => {
    const now = performance.now();
    if (this.first < 0) this.first = now;
    this.last = now;
  };
}

/** Prompt tokens (positions < prompt length) a step computes. */
export function prefillTokensOf(step: ScheduledStep): number {
  let n = 0;
  for (const e of step.entries) {
    const promptLength = e.request.request.prompt.length;
    n += Math.max(0, Math.min(e.start + e.count, promptLength) - e.start);
  }
  return n;
}
