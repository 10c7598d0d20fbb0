/**
 * Per-kernel timing for the benchmark: replays each kind of dispatch of the
 * last executed step `repeats` times in one pass and divides the queue time.
 * The step data on the GPU is the last step's, so sizes are the real ones.
 */
import type { ModelRunner } from "../../engine/runner/model_runner.ts";

export interface KernelTiming {
  kind: string;
  /** ms per step for all dispatches of this kind. */
  ms: number;
  gbPerSecond: number;
  gflopPerSecond: number;
}

export async function timeKernels(runner: ModelRunner, repeats: number): Promise<KernelTiming[]> {
  const counts = runner.lastCounts;
  if (!counts) throw new Error("timeKernels: run a step first");
  const device = runner.ctx.device;
  const kinds = [...new Set(runner.forward.dispatches.map((d) => d.kind))];
  const timings: KernelTiming[] = [];
  for (const kind of kinds) {
    const group = runner.forward.dispatches.filter((d) => d.kind === kind);
    let bytes = 0, flops = 0;
    for (const d of group) {
      const cost = d.cost(counts);
      bytes += cost.bytes;
      flops += cost.flops;
    }
    if (bytes === 0 && flops === 0) continue; // nothing of this kind runs in this step
    const encoder = device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    for (let r = 0; r < repeats; r++) for (const d of group) d.run(pass, counts);
    pass.end();
    const start = performance.now();
    device.queue.submit([encoder.finish()]);
    await device.queue.onSubmittedWorkDone();
    const ms = (performance.now() - start) / repeats;
    timings.push({ kind, ms, gbPerSecond: bytes / ms / 1e6, gflopPerSecond: flops / ms / 1e6 });
  }
  runner.ctx.throwIfFailed();
  return timings;
}

/** Device copy bandwidth (GB/s): the roofline the decode's weight bandwidth is compared with. */
export async function copyBandwidth(runner: ModelRunner, bytes: number): Promise<number> {
  const device = runner.ctx.device;
  const size = Math.min(bytes, runner.ctx.limits.maxBufferSize) & ~3;
  const usage = GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST | GPUBufferUsage.STORAGE;
  const a = device.createBuffer({ size, usage }), b = device.createBuffer({ size, usage });
  const run = async (n: number) => {
    const encoder = device.createCommandEncoder();
    for (let i = 0; i < n; i++) encoder.copyBufferToBuffer(a, 0, b, 0, size);
    const start = performance.now();
    device.queue.submit([encoder.finish()]);
    await device.queue.onSubmittedWorkDone();
    return performance.now() - start;
  };
  await run(1);
  const repeats = 4;
  const ms = await run(repeats);
  a.destroy();
  b.destroy();
  return (2 * size * repeats) / ms / 1e6; // read + write
}
