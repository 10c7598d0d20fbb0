/** Small measurement helpers shared by the benchmarks: prompts, medians, decode rates. */
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
export function decodeRate(output: RequestOutput): { tokens: number; ms: number; tokensPerSecond: number } {
  const tokens = output.tokenTimesMs.length;
  const ms = output.tokenTimesMs.reduce((a, b) => a + b, 0);
  return { tokens, ms, tokensPerSecond: ms > 0 ? tokens / (ms / 1000) : 0 };
}
