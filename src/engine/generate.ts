/**
 * Single-sequence generation on a ModelRunner: chunked prefill of the prompt,
 * then one decode step per token until EOS or maxTokens. Sampling happens on
 * the GPU; only the sampled id comes back each step.
 */
import type { ModelRunner } from "./runner/model_runner.ts";
import type { SamplingParams, SequenceWork } from "./step.ts";
import { InvalidRequestError } from "./errors.ts";

export interface GenerateOptions {
  maxTokens: number;
  sampling: SamplingParams;
  /** Generation stops after emitting one of these (the EOS token is not included in `tokens`). */
  eosIds: number[];
  /** Called as each token is sampled, with ms since the request started. */
  onToken?: (id: number, elapsedMs: number) => void;
}

export interface GenerationResult {
  promptTokens: number[];
  tokens: number[];
  stopReason: "eos" | "length";
  /** Time to first token (prefill + first sample), ms. */
  ttftMs: number;
  /** Time of each generated token after the first, ms since the previous one. */
  tokenTimesMs: number[];
  totalMs: number;
}

export async function generate(
  runner: ModelRunner,
  prompt: number[],
  options: GenerateOptions,
): Promise<GenerationResult> {
  const { maxTokens: chunkTokens, maxBlocksPerSeq, blockSize } = runner.capacity;
  const maxContext = maxBlocksPerSeq * blockSize;
  if (prompt.length === 0) throw new InvalidRequestError("prompt has no tokens (not even BOS)");
  if (prompt.length + options.maxTokens > maxContext) {
    throw new InvalidRequestError(
      `prompt (${prompt.length} tokens) + max tokens (${options.maxTokens}) exceeds the ` +
        `context of ${maxContext} tokens; shorten the prompt or lower --max-tokens`,
    );
  }
  const blockTable = Array.from({ length: maxBlocksPerSeq }, (_, i) => i);
  const work = (tokens: number[], startPosition: number, sample: boolean): SequenceWork => ({
    seqId: 0, tokens, startPosition, blockTable, sample, sampling: options.sampling,
  });

  const start = performance.now();
  let next = -1;
  for (let pos = 0; pos < prompt.length; pos += chunkTokens) {
    const chunk = prompt.slice(pos, pos + chunkTokens);
    const isLast = pos + chunk.length === prompt.length;
    const result = await runner.execute({ sequences: [work(chunk, pos, isLast)] });
    if (isLast) next = result.sampled[0];
  }
  const tokens: number[] = [];
  const tokenTimesMs: number[] = [];
  let ttftMs = 0;
  let last = start;
  let stopReason: GenerationResult["stopReason"] = "length";
  while (tokens.length < options.maxTokens) {
    const now = performance.now();
    if (tokens.length === 0) ttftMs = now - start;
    else tokenTimesMs.push(now - last);
    last = now;
    if (options.eosIds.includes(next)) {
      stopReason = "eos";
      break;
    }
    tokens.push(next);
    options.onToken?.(next, now - start);
    if (tokens.length === options.maxTokens) break;
    const position = prompt.length + tokens.length - 1;
    next = (await runner.execute({ sequences: [work([next], position, true)] })).sampled[0];
  }
  return { promptTokens: prompt, tokens, stopReason, ttftMs, tokenTimesMs, totalMs: performance.now() - start };
}
