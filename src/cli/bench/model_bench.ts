/** Measures one model: prefill, decode, weight bandwidth, memory, per-kernel times. */
import type { GpuContext } from "../../engine/gpu/context.ts";
import type { ModelSource } from "../../engine/model/source.ts";
import { ModelRunner } from "../../engine/runner/model_runner.ts";
import { GREEDY, type SequenceWork } from "../../engine/step.ts";
import { copyBandwidth, type KernelTiming, timeKernels } from "./kernel_timing.ts";

export interface ModelBenchOptions {
  promptTokens: number;
  genTokens: number;
  weightDtype: "f32" | "f16";
}

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
  prefillTokensPerSecond: number;
  decodeTokensPerSecond: number;
  /** Weight bytes read per decoded token. */
  weightBytesPerToken: number;
  weightBandwidthGBs: number;
  /** The device's copy bandwidth in the same run; weightBandwidthGBs / this = roofline fraction. */
  copyBandwidthGBs: number;
  peakGpuBytes: number;
  memory: ModelRunner["memory"];
  kernels: { prefill: KernelTiming[]; decode: KernelTiming[] };
}

/** Seeded token ids in [3, vocab): a prompt of the right length, content irrelevant to speed. */
function promptIds(n: number, vocab: number): number[] {
  let x = 12345;
  return Array.from({ length: n }, () => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return 3 + (x % (vocab - 3));
  });
}

export async function runModelBench(
  ctx: GpuContext,
  name: string,
  source: ModelSource,
  options: ModelBenchOptions,
): Promise<ModelBenchResult> {
  const { promptTokens, genTokens } = options;
  const loadStart = performance.now();
  const runner = await ModelRunner.create(ctx, source, {
    weightDtype: options.weightDtype,
    maxSeqs: 1,
    maxTokens: promptTokens,
    maxContext: promptTokens + genTokens + 1,
  });
  const loadMs = performance.now() - loadStart;
  const prompt = promptIds(promptTokens, source.config.vocabSize);
  const blockTable = Array.from({ length: runner.capacity.maxBlocksPerSeq }, (_, i) => i);
  const work = (tokens: number[], startPosition: number): SequenceWork => ({
    seqId: 0, tokens, startPosition, blockTable, sample: true, sampling: GREEDY,
  });

  // Warm-up: first use of every pipeline (shader JIT on software adapters).
  await runner.execute({ sequences: [work(prompt.slice(0, Math.min(2, promptTokens)), 0)] });
  await runner.execute({ sequences: [work([prompt[0]], 0)] });

  let start = performance.now();
  let next = (await runner.execute({ sequences: [work(prompt, 0)] })).sampled[0];
  const prefillMs = performance.now() - start;
  const prefillKernels = await timeKernels(runner, 3);

  start = performance.now();
  for (let i = 0; i < genTokens; i++) {
    next = (await runner.execute({ sequences: [work([next], promptTokens + i)] })).sampled[0];
  }
  const decodeMs = performance.now() - start;
  const decodeCounts = runner.lastCounts!;
  const decodeKernels = await timeKernels(runner, 5);
  const decodeTokensPerSecond = genTokens / (decodeMs / 1000);
  const weightBytesPerToken = runner.forward.weightBytesPerStep(decodeCounts);
  const copyBandwidthGBs = await copyBandwidth(runner, 64 << 20);
  const memory = runner.memory;
  runner.destroy();
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
    prefillTokensPerSecond: promptTokens / (prefillMs / 1000),
    decodeTokensPerSecond,
    weightBytesPerToken,
    weightBandwidthGBs: (weightBytesPerToken * decodeTokensPerSecond) / 1e9,
    copyBandwidthGBs,
    peakGpuBytes: memory.weightBytes + memory.kvBytes + memory.activationBytes,
    memory,
    kernels: { prefill: prefillKernels, decode: decodeKernels },
  };
}
