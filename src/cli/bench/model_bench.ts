/**
 * Measures one model, one sequence: prefill, decode, weight bandwidth, memory, per-kernel times.
 *
 * Runs on the MaceEngine (inference-only) so that decode is measured on the path users get
 * (pipelined steps, which hide wgpu's ~11 ms readback latency per await); prefill and the
 * per-kernel table drive the engine's ModelRunner directly while no request is live.
 */
import type { GpuContext } from "../../engine/gpu/context.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import type { ModelRunner } from "../../engine/runner/model_runner.ts";
import { GREEDY, type SequenceWork } from "../../engine/step.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import { copyBandwidth, type KernelTiming, timeKernels } from "./kernel_timing.ts";
import { BENCH_PIPELINE_DEPTH, decodeRate, median, promptIds } from "./measure.ts";

export interface ModelBenchOptions {
  promptTokens: number;
  genTokens: number;
  weightDtype: "f32" | "f16";
}

/** Timed prefill runs; prefillTokensPerSecond is taken from their median. */
export const PREFILL_RUNS = 3;

export interface ModelBenchResult {
  name: string;
  date: string;
  backend: string;
  adapter: string;
  software: boolean;
  weightDtype: string;
  config: ModelSource["config"];
  promptTokens: number;
  genTokens: number;
  loadMs: number;
  /**
   * promptTokens / median of PREFILL_RUNS prefills (each at position 0, after one untimed
   * full-size prefill). Before 2026-11 it was a single prefill right after a 2-token warm-up.
   */
  prefillTokensPerSecond: number;
  /** ms of each timed prefill run. */
  prefillRunsMs?: number[];
  /**
   * Decode on the serving path (MaceEngine.generate, pipelined steps): (tokens after the
   * first) / (ms from the first to the last token on the CPU). Before 2026-11 it was a loop of
   * one awaited step per token, which included the readback latency of every step.
   */
  decodeTokensPerSecond: number;
  /**
   * Decoded tokens behind decodeTokensPerSecond (genTokens: the request asks for
   * genTokens + 1).
   */
  decodeTokens?: number;
  /** Engine steps in flight at once during the decode measurement. */
  pipelineDepth?: number;
  /** Weight bytes read per decoded token. */
  weightBytesPerToken: number;
  weightBandwidthGBs: number;
  /** The device's copy bandwidth in the same run; weightBandwidthGBs / this = roofline fraction. */
  copyBandwidthGBs: number;
  peakGpuBytes: number;
  /**
   * Host load averages (1, 5, 15 min) when the run ended: on a software adapter the GPU is the
   * CPU, so other work on the machine slows the numbers down.
   */
  hostLoadAverage?: number[];
  memory: ModelRunner["memory"];
  kernels: { prefill: KernelTiming[]; decode: KernelTiming[] };
}

export async function runModelBench(
  ctx: GpuContext,
  name: string,
  source: ModelSource,
  options: ModelBenchOptions,
): Promise<ModelBenchResult> {
  const { promptTokens, genTokens } = options;
  const loadStart = performance.now();
  const engine = await MaceEngine.open(ctx, source, {
    policy: "inference-only",
    // The decode request generates genTokens + 1 tokens (the first comes from its prefill).
    maxContext: promptTokens + genTokens + 1,
    serving: {
      weights: options.weightDtype,
      maxSeqs: 1,
      maxTokensPerStep: promptTokens,
      prefixCaching: false,
      pipelineDepth: BENCH_PIPELINE_DEPTH,
    },
  });
  const loadMs = performance.now() - loadStart;
  const runner = engine.runner;
  const prompt = promptIds(promptTokens, source.config.vocabSize);

  // Prefill straight on the runner (no request is live, so its KV blocks are ours to scribble on).
  const blockTable = Array.from({ length: runner.capacity.maxBlocksPerSeq }, (_, i) => i);
  const prefill: SequenceWork = {
    seqId: 0,
    tokens: prompt,
    startPosition: 0,
    blockTable,
    sample: true,
    sampling: GREEDY,
  };
  // One untimed full-size prefill: the engine's warm-up runs 2 tokens, and kernels used only
  // for many rows (the tiled matmul) pay one-time costs on their first dispatch (e.g. driver
  // compilation) that are not prefill speed: 99 vs ~1700 tokens/s on stories260K on lavapipe.
  await runner.execute({ sequences: [prefill] });
  const prefillRunsMs: number[] = [];
  for (let i = 0; i < PREFILL_RUNS; i++) {
    const start = performance.now();
    await runner.execute({ sequences: [prefill] });
    prefillRunsMs.push(performance.now() - start);
  }
  const prefillKernels = await timeKernels(runner, 3);

  // Decode through the engine, as served. A short request first warms the pipelined path
  // (fed-back tokens), then the measured one: its tokens after the first are pure decode steps.
  // Random weights may sample EOS; we want a fixed length (ignoreEos).
  await engine.generate({
    prompt: prompt.slice(0, Math.min(4, promptTokens)),
    maxTokens: Math.min(3, genTokens + 1),
    ignoreEos: true,
  });
  const output = await engine.generate({ prompt, maxTokens: genTokens + 1, ignoreEos: true });
  const decode = decodeRate(output);
  // The engine's last step for a request only writes the K/V of its final token (no sample),
  // so replay one sampling decode at the end of the context for the per-kernel table.
  await runner.execute({
    sequences: [{
      seqId: 0,
      tokens: [output.tokens.at(-1)!],
      startPosition: promptTokens + genTokens,
      blockTable,
      sample: true,
      sampling: GREEDY,
    }],
  });
  const decodeCounts = runner.lastCounts!;
  const decodeKernels = await timeKernels(runner, 5);
  const weightBytesPerToken = runner.forward.weightBytesPerStep(decodeCounts);
  const copyBandwidthGBs = await copyBandwidth(runner, 64 << 20);
  const memory = runner.memory;
  await engine.close();
  return {
    name,
    date: new Date().toISOString(),
    backend: ctx.backend,
    adapter: ctx.adapterDescription,
    software: ctx.isSoftware,
    weightDtype: options.weightDtype,
    config: source.config,
    promptTokens,
    genTokens,
    loadMs,
    prefillTokensPerSecond: promptTokens / (median(prefillRunsMs) / 1000),
    prefillRunsMs,
    decodeTokensPerSecond: decode.tokensPerSecond,
    decodeTokens: decode.tokens,
    pipelineDepth: BENCH_PIPELINE_DEPTH,
    weightBytesPerToken,
    weightBandwidthGBs: (weightBytesPerToken * decode.tokensPerSecond) / 1e9,
    copyBandwidthGBs,
    peakGpuBytes: memory.weightBytes + memory.kvBytes + memory.activationBytes,
    hostLoadAverage: Deno.loadavg(),
    memory,
    kernels: { prefill: prefillKernels, decode: decodeKernels },
  };
}
