/**
 * On Dawn, waiting for the GPU costs a bounded number of event-pump ticks: a few per short
 * readback, and about the schedule's count for a long job (unpumped, dawn.node spins thousands of
 * times, and Deno pays for every one at its next major GC; see dawn_event_pump.ts). Dawn only:
 * Deno's WebGPU has no event pump.
 */
import assert from "node:assert/strict";
import { pumpStats, tickDelay } from "../../src/engine/gpu/dawn_event_pump.ts";
import { readBuffer, uploadStorage } from "../../src/engine/gpu/buffers.ts";
import { gpuTest, testBackend, testContext } from "../helpers/gpu.ts";

const dawnOnly = { ...gpuTest, ignore: testBackend() !== "dawn" };

/** Ticks the pump's schedule allows for a wait of `ms` (timers that run late only take fewer). */
function scheduleTicks(ms: number): number {
  let waited = 0, ticks = 0;
  while (waited < ms) waited += tickDelay(ticks++, waited);
  return ticks;
}

const SPIN = /* wgsl */ `
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<uniform> loops: vec4<u32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) id: vec3<u32>) {
  var x = f32(id.x);
  for (var i = 0u; i < loops.x; i++) { x = x * 0.999 + 0.5; }
  out[id.x] = x;
}`;

Deno.test(
  { name: "Dawn pump: a few ticks per short readback (Dawn only)", ...dawnOnly },
  async () => {
    const ctx = await testContext();
    const buffer = uploadStorage(ctx, new Float32Array([1, 2, 3, 4]), "pump test");
    await readBuffer(ctx, buffer); // first use out of the way
    const before = pumpStats.ticks;
    for (let i = 0; i < 100; i++) await readBuffer(ctx, buffer);
    const perReadback = (pumpStats.ticks - before) / 100;
    console.log(`${perReadback} ticks per readback`);
    // At least one: the pump does see dawn.node's ticks (else it would silently do nothing).
    assert.ok(perReadback >= 1 && perReadback <= 6, `${perReadback} ticks per readback`);
    buffer.destroy();
  },
);

/** A compute job of `loops` iterations per thread, copied into a readback (for mapAsync). */
function spinJob(device: GPUDevice) {
  const module = device.createShaderModule({ code: SPIN });
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module } });
  const out = device.createBuffer({
    size: 64 * 64 * 4,
    usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC,
  });
  const loops = device.createBuffer({
    size: 16,
    usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST,
  });
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [{ binding: 0, resource: { buffer: out } }, {
      binding: 1,
      resource: { buffer: loops },
    }],
  });
  return {
    submit(n: number, readback: GPUBuffer) {
      device.queue.writeBuffer(loops, 0, new Uint32Array([n, 0, 0, 0]));
      const encoder = device.createCommandEncoder();
      const pass = encoder.beginComputePass();
      pass.setPipeline(pipeline);
      pass.setBindGroup(0, group);
      pass.dispatchWorkgroups(64);
      pass.end();
      encoder.copyBufferToBuffer(out, 0, readback, 0, 16);
      device.queue.submit([encoder.finish()]);
    },
    destroy() {
      out.destroy();
      loops.destroy();
    },
  };
}

/** Ticks and ms of one mapAsync of `readback`. */
async function timedMap(readback: GPUBuffer): Promise<{ ticks: number; ms: number }> {
  const before = pumpStats.ticks, start = performance.now();
  await readback.mapAsync(GPUMapMode.READ);
  readback.unmap();
  return { ticks: pumpStats.ticks - before, ms: performance.now() - start };
}

Deno.test(
  { name: "Dawn pump: long GPU jobs cost few ticks (Dawn only)", ...dawnOnly },
  async () => {
    const { device } = await testContext();
    const job = spinJob(device);
    const newReadback = () =>
      device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    // A readback with no history follows the backoff schedule. Double the work until one job
    // keeps the GPU busy for at least 100 ms.
    let n = 1000;
    for (;; n *= 2) {
      const readback = newReadback();
      job.submit(n, readback);
      const { ticks, ms } = await timedMap(readback);
      readback.destroy();
      if (ms < 100 && n < 1e8) continue;
      console.log(`${n} loops, new readback: a ${ms.toFixed(0)} ms wait took ${ticks} ticks`);
      assert.ok(ticks >= 3 && ticks <= scheduleTicks(ms) + 2, `${ticks} ticks, ${ms} ms wait`);
      break;
    }
    // The same job again and again into one readback: once it has history, a wait sleeps
    // through most of the job and polls only near its end.
    const readback = newReadback();
    const waits = [];
    for (let i = 0; i < 6; i++) {
      job.submit(n, readback);
      waits.push(await timedMap(readback));
    }
    console.log(`same readback: ${waits.map((w) => `${w.ticks} ticks/${w.ms.toFixed(0)} ms`)}`);
    const late = waits.slice(2);
    assert.ok(late.every((w) => w.ticks <= 8), "a wait with history polls only near its end");
    readback.destroy();
    job.destroy();
  },
);
