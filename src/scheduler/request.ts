/**
 * A generation request as the scheduler tracks it: the token sequence so far,
 * how much of it has K/V scheduled, samples still in flight on the GPU, and the
 * timings the metrics need (TTFT, TBT).
 */
import type { SamplingParams } from "../engine/step.ts";

export interface GenerationRequest {
  /** Unique among live requests; also the KV block manager's sequence id. */
  id: number;
  /** Prompt token ids (BOS included); at least one. */
  prompt: readonly number[];
  /** Most tokens to generate (the EOS token, when sampled, is not counted or returned). */
  maxTokens: number;
  sampling: SamplingParams;
  eosIds: readonly number[];
  /** Called on the CPU as each generated token becomes known. */
  onToken?: (id: number) => void;
  /** KV entries kept for this request before pruning (0: never prune; default: the engine's). */
  kvBudget?: number;
  /**
   * The LoRA adapter the request runs on, as loaded in the engine (a resolved, versioned id such
   * as "name@2"); undefined: the base model. Fixed for the request's life.
   */
  adapterId?: string;
}

export type StopReason = "eos" | "length" | "cancelled";

export interface RequestOutput {
  id: number;
  promptTokens: number[];
  tokens: number[];
  stopReason: StopReason;
  /** ms from submit to the first generated token on the CPU. */
  ttftMs: number;
  /** ms between consecutive generated tokens (TBT), one per token after the first. */
  tokenTimesMs: number[];
  totalMs: number;
  /** Prompt tokens whose K/V came from the prefix cache. */
  prefixHitTokens: number;
  /** KV entries evicted by pruning. */
  evictedTokens: number;
  /** Times the request was preempted (its K/V dropped and recomputed later). */
  preemptions: number;
}

export class RequestState {
  /** Generated tokens known on the CPU. */
  readonly output: number[] = [];
  /**
   * Tokens (prompt, then output) whose K/V are computed or scheduled in a submitted step.
   * Reset to 0 (then the prefix hit) when the request is preempted.
   */
  numScheduled = 0;
  /** KV slots the block manager holds for the request. */
  reservedSlots = 0;
  /** KV entries evicted by pruning: token X[i]'s K/V sit at slot i - evicted (once computed). */
  evicted = 0;
  /** Positions of the tokens in slots 0 .. keptPositions.length-1 after the last pruning. */
  keptPositions: number[] = [];
  /** Samples submitted to the GPU whose token is not known yet. */
  pendingSamples = 0;
  /**
   * The id of the last step that sampled for this request (FEEDBACK_TOKEN needs the previous step).
   */
  lastSampleStep = -1;
  finished: StopReason | null = null;
  prefixHitTokens = 0;
  preemptions = 0;
  readonly submittedAt: number;
  firstTokenAt = -1;
  lastTokenAt = -1;
  readonly tokenTimesMs: number[] = [];

  constructor(readonly request: GenerationRequest, now: number) {
    this.submittedAt = now;
  }

  get id(): number {
    return this.request.id;
  }

  /** The tokens the model reads: prompt, then generated tokens known so far. */
  get knownTokens(): number[] {
    return [...this.request.prompt, ...this.output];
  }

  /**
   * Known tokens X[start .. end) without copying the whole sequence (once per step on the hot
   * path); positions not known yet (samples in flight) are left out.
   */
  knownSlice(start: number, end: number): number[] {
    const prompt = this.request.prompt;
    const P = prompt.length;
    if (end <= P) return prompt.slice(start, end);
    const fromOutput = this.output.slice(Math.max(0, start - P), end - P);
    return start >= P ? fromOutput : [...prompt.slice(start), ...fromOutput];
  }

  /** Prompt tokens plus tokens generated or in flight. */
  get length(): number {
    return this.request.prompt.length + this.output.length + this.pendingSamples;
  }

  /** Samples taken or in flight; no more are scheduled once this reaches maxTokens. */
  get samplesIssued(): number {
    return this.output.length + this.pendingSamples;
  }

  /** Records a sampled token; returns true when the request is finished by it. */
  acceptSample(token: number, now: number): boolean {
    this.pendingSamples--;
    if (this.finished) return true;
    if (this.request.eosIds.includes(token)) {
      this.finish("eos", now);
      return true;
    }
    if (this.firstTokenAt < 0) this.firstTokenAt = now;
    else this.tokenTimesMs.push(now - this.lastTokenAt);
    this.lastTokenAt = now;
    this.output.push(token);
    this.request.onToken?.(token);
    if (this.output.length >= this.request.maxTokens) {
      this.finish("length", now);
      return true;
    }
    return false;
  }

  /** Ends the request where it is (its tokens so far are its output). */
  cancel(now: number): void {
    if (!this.finished) this.finish("cancelled", now);
  }

  private finish(reason: StopReason, now: number): void {
    this.finished = reason;
    if (this.firstTokenAt < 0) this.firstTokenAt = now;
    if (this.lastTokenAt < 0) this.lastTokenAt = now;
  }

  result(now: number): RequestOutput {
    return {
      id: this.id,
      promptTokens: [...this.request.prompt],
      tokens: [...this.output],
      stopReason: this.finished ?? "length",
      ttftMs: this.firstTokenAt - this.submittedAt,
      tokenTimesMs: [...this.tokenTimesMs],
      totalMs: now - this.submittedAt,
      prefixHitTokens: this.prefixHitTokens,
      evictedTokens: this.evicted,
      preemptions: this.preemptions,
    };
  }
}
