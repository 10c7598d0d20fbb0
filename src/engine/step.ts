/**
 * The step contract (../shared/DESIGN.md): what the engine can execute in one
 * iteration. Plain data, structured-cloneable, so a scheduler in a worker can
 * build it. The engine defines these types; the scheduler imports them.
 */

export interface SamplingParams {
  /** 0 = greedy. */
  temperature: number;
  /** 0 = no top-k limit. */
  topK: number;
  /** 1 = no top-p limit. */
  topP: number;
  /** Seed of this sequence's random stream; token n draws with (seed, n). */
  seed: number;
}

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };

/**
 * One sequence's share of a step: `tokens` are appended at positions
 * startPosition.. (a prefill chunk, or one decode token). Their K/V are written
 * at KV slots startSlot.. through `blockTable` (physical block ids covering
 * slots 0..end); attention sees slots 0..(own slot).
 */
export interface SequenceWork {
  seqId: number;
  tokens: number[];
  /** Rotary position of tokens[0]. */
  startPosition: number;
  /** KV slot of tokens[0]: startPosition (the default) unless pruning removed earlier entries. */
  startSlot?: number;
  blockTable: number[];
  /** Sample a next token from the logits of the last token of this chunk. */
  sample: boolean;
  sampling: SamplingParams;
}

export interface StepPlan {
  sequences: SequenceWork[];
}

export interface StepResult {
  /** Sampled token per sequence of the plan that asked for one (same order), else -1. */
  sampled: number[];
  /** Wall time of the step on the GPU queue, from submit to completion, in ms. */
  gpuMs: number;
}
