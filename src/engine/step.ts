/**
 * The step contract (docs/ARCHITECTURE.md): what the engine can execute in one
 * iteration. Plain data, structured-cloneable, so a scheduler in a worker can
 * build it. The engine defines these types; the scheduler imports them.
 */

/**
 * How a sequence picks its next token (the rules: src/shaders/sample.wgsl). The sampling kernel
 * reads one row per sequence: these plus the draw counter (SamplingRow in kernels/sample.ts).
 */
export interface SamplingParams {
  /** <= 0: greedy. */
  temperature: number;
  /** Keep the topK most likely tokens; 0: no limit. */
  topK: number;
  /** Keep the smallest most-likely set with this share of the mass; >= 1: no limit. */
  topP: number;
  /** u32 seed of this sequence's random stream; token n draws with (seed, n). */
  seed: number;
}

export const GREEDY: SamplingParams = { temperature: 0, topK: 0, topP: 1, seed: 0 };

/**
 * A token id the CPU does not know yet: the token this sequence sampled in the previous
 * executed step, fed in on the GPU. Lets a scheduler submit decode step n+1 before reading
 * step n's sample (pipelined decoding hides the readback latency). Only as tokens[0] of a
 * sequence that sampled in the immediately preceding plan.
 */
export const FEEDBACK_TOKEN = -1;

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
  /**
   * Accumulate the attention mass each of the sequence's KV slots receives (for H2O KV
   * pruning; costs about one more attention pass). Off by default.
   */
  trackMass?: boolean;
  sampling: SamplingParams;
  /**
   * The LoRA adapter the sequence runs on (an id loaded into the runner, e.g. "name@2");
   * absent: the base model. One step may mix adapters.
   */
  adapterId?: string;
}

/** Copy every layer's K and V of KV block `src` into block `dst`. */
export interface BlockCopy {
  src: number;
  dst: number;
}

/**
 * A KV edit run on its own before later steps: block copies, then moves of single KV slots
 * (physical slot = block * blockSize + offset) in every layer's K and V and in the attention
 * mass, each move reading the slot contents from before any move (used to compact a pruned
 * sequence's kept entries).
 */
export interface KvEdit {
  copies: BlockCopy[];
  moves: [src: number, dst: number][];
}

/**
 * One batched forward pass. Only full KV blocks are ever shared between sequences, so a step
 * never needs a copy-on-write copy; block copies come only with pruning, in a KvEdit.
 */
export interface StepPlan {
  sequences: SequenceWork[];
}

export interface StepResult {
  /** Sampled token per sequence of the plan that asked for one (same order), else -1. */
  sampled: number[];
  /**
   * Wall time from this step's submit until its samples were on the CPU, in ms (with
   * pipelined steps this includes the wait for the steps submitted before it).
   */
  gpuMs: number;
}
