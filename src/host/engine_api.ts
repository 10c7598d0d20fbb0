/**
 * The one typed interface every caller uses to drive the engine (the CLI, the HTTP service, the
 * browser demo): implemented by MaceEngine (src/host/mace_engine.ts) in-process, and across a
 * worker boundary by the comlink client (src/worker/engine_client.ts). Arguments and results are
 * structured-cloneable; callbacks cross the boundary as comlink proxies. Errors keep their class
 * (a MaceError subclass) across the boundary.
 */
import type { SamplingParams } from "../engine/step.ts";
import type { LoraWeights } from "../engine/lora/lora.ts";
import type { MetricsSummary } from "../scheduler/metrics.ts";
import type { RequestOutput } from "../scheduler/request.ts";

export interface EngineInfo {
  model: string;
  /** "wgpu" (Deno's WebGPU) or "dawn" (the webgpu package). */
  backend: string;
  /** The adapter, in words. */
  device: string;
  /** The scheduling policy (mace, inference-only, periodic, synchronous, fcfs). */
  policy: string;
  /** Longest prompt + output in tokens. */
  maxContext: number;
  vocabSize: number;
  eosIds: number[];
}

export interface GenerateRequest {
  /** Token ids, BOS included. */
  prompt: number[];
  maxTokens: number;
  /** Default greedy. */
  sampling?: Partial<SamplingParams>;
  /** A published adapter: a name (its newest version) or a versioned id ("name@2"). */
  adapter?: string;
  /** The caller's id for cancel(); default: one is made up. Must not be in use. */
  requestId?: string;
  /** Generate exactly maxTokens tokens, past any EOS (benchmarks, as vLLM's ignore_eos). */
  ignoreEos?: boolean;
  /** KV entries this request keeps before H2O pruning (default: the engine's). */
  kvBudget?: number;
}

export interface GenerateResult extends RequestOutput {
  requestId: string;
  /** True when cancel() ended it (tokens are those produced before). */
  cancelled: boolean;
  /** The adapter version it ran on, if any. */
  adapterId?: string;
}

/** A preference pair as token ids: prompt (BOS included), chosen and rejected responses. */
export interface FeedbackPair {
  prompt: number[];
  chosen: number[];
  rejected: number[];
}

export interface FeedbackReceipt {
  /** Pairs queued for fine-tuning. */
  accepted: number;
  /** Pairs waiting for their first training, this call's included. */
  untrained: number;
}

export interface AdapterInfo {
  /** Versioned id, "name@N". */
  id: string;
  name: string;
  version: number;
  /** Requests running on it now. */
  users: number;
  /** True for the version new requests by name get. */
  newest: boolean;
}

export interface EngineMetrics {
  summary: MetricsSummary;
  /** The cost model's prediction error over the steps run so far. */
  prediction: {
    steps: number;
    meanAbsErrorMs: number | null;
    meanAbsPercentError: number | null;
    totalBias: number | null;
  };
  /** Optimizer steps taken by the fine-tuner. */
  optimizerSteps: number;
  /** DPO slices run (reference, forward, backward, optimizer), co-scheduled with serving. */
  finetuneSlices: number;
  /** The adapter version the fine-tuner published last (null before the first). */
  publishedAdapter: string | null;
}

export interface Engine {
  info(): Promise<EngineInfo>;
  /** Generates alongside every other request; `onToken` gets each token as it is known. */
  generate(request: GenerateRequest, onToken?: (token: number) => void): Promise<GenerateResult>;
  /** Ends a running or queued request (its generate() resolves with cancelled: true). */
  cancel(requestId: string): Promise<boolean>;
  /** Queues preference pairs for continuous fine-tuning. Invalid pairs reject the whole call. */
  submitFeedback(pairs: FeedbackPair[]): Promise<FeedbackReceipt>;
  adapters(): Promise<AdapterInfo[]>;
  /** Publishes a new version of adapter `name`; returns its id ("name@N"). */
  publishAdapter(name: string, weights: LoraWeights): Promise<string>;
  /** Metrics from the engine's start up to now, with these SLOs. */
  metrics(slo?: { ttftMs?: number; tbtMs?: number }): Promise<EngineMetrics>;
  /** Finishes or cancels what runs and frees the GPU. */
  close(): Promise<void>;
}

/** How to build an engine (MaceEngine.create, or the worker's first message). Plain data. */
export interface EngineOptions {
  /** Model path: a Hugging Face folder or a llama2.c checkpoint; default: the bundled model. */
  model?: string;
  /** Tokenizer override (a tokenizer.json folder or a llama2.c tokenizer .bin). */
  tokenizer?: string;
  backend?: "auto" | "wgpu" | "dawn" | "browser";
  /** mace (default), inference-only, periodic, synchronous or fcfs. */
  policy?: string;
  /** Cost profile JSON path; default: the shipped profile for the bundled model. */
  profile?: string;
  ttftSloMs?: number;
  tbtSloMs?: number;
  /** Longest prompt + output in tokens (default: the model's context, at most 2048). */
  maxContext?: number;
  /** Serving capacity and the loop (defaults suit the bundled model). */
  serving?: {
    /** Sequences per step (default 16). */
    maxSeqs?: number;
    /** Tokens per step: the prefill chunk budget (default 512). */
    maxTokensPerStep?: number;
    /** KV pool size in blocks (default: maxSeqs sequences of maxContext tokens). */
    kvBlocks?: number;
    /** Share KV blocks of common prompt prefixes (default on). */
    prefixCaching?: boolean;
    /** KV entries a request keeps before H2O pruning (default 0: never prune, exact output). */
    kvBudget?: number;
    /** Iterations in flight (default 3 on Deno's WebGPU, 2 on Dawn). */
    pipelineDepth?: number;
    /** Weights on the GPU as f32 (default) or f16 (needs shader-f16). */
    weights?: "f32" | "f16";
    /** LoRA adapters resident at once (default 4). */
    maxAdapters?: number;
    /** Largest rank and the projections served adapters may have (default 16; the fine-tuner's). */
    adapterRank?: number;
    adapterTargets?: string[];
  };
  finetune?: {
    rank?: number;
    alpha?: number;
    targets?: string[];
    learningRate?: number;
    beta?: number;
    /** Pairs per optimizer step. */
    pairsPerStep?: number;
    /** Publish a new adapter version every K optimizer steps. */
    publishEvery?: number;
    /** Name of the adapter the fine-tuner publishes. */
    adapterName?: string;
    seed?: number;
  };
}
