/**
 * The engine client's failure paths with a worker that crashes (no GPU): a worker that dies
 * rejects the pending init, or every pending and later call, with EngineWorkerError instead of
 * leaving them unanswered, and the worker is terminated. Deno prints the worker's uncaught error
 * ("the GPU process went away"): that is the crash these tests cause, not a failure.
 */
import assert from "node:assert/strict";
import { InvalidRequestError, MaceError } from "../../src/engine/errors.ts";
import type { EngineOptions } from "../../src/host/engine_api.ts";
import { connectEngine } from "../../src/worker/engine_client.ts";
import { EngineWorkerError } from "../../src/worker/error_transfer.ts";
import { TrackedWorker } from "./tracked_worker.ts";

const crashingWorker = () =>
  new TrackedWorker(new URL("./fixtures/crashing_worker.ts", import.meta.url), { type: "module" });

Deno.test({
  name: "a worker that dies while the engine is built rejects connectEngine with EngineWorkerError",
}, async () => {
  const worker = crashingWorker();
  const error = await connectEngine(worker, { model: "crash-during-init" }).then(
    () => assert.fail("connectEngine resolved"),
    (e: unknown) => e,
  );
  assert.ok(error instanceof EngineWorkerError && error instanceof MaceError);
  assert.strictEqual(error.code, "engine_worker");
  assert.match(error.message, /the GPU process went away/);
  assert.strictEqual(worker.terminated, 1);
});

Deno.test({
  name: "a worker that dies during a call rejects it, and every later call, with EngineWorkerError",
}, async () => {
  const worker = crashingWorker();
  const { engine, terminate } = await connectEngine(worker, { model: "crash-on-call" });
  await assert.rejects(
    engine.info(),
    (e: unknown) => e instanceof EngineWorkerError && /went away/.test(e.message),
  );
  await assert.rejects(engine.cancel("r1"), EngineWorkerError);
  await terminate(); // already gone: resolves without waiting on the dead worker
  assert.strictEqual(worker.terminated, 1);
});

Deno.test({
  name: "options postMessage cannot copy reject with InvalidRequestError, and the worker is ended",
}, async () => {
  const worker = crashingWorker();
  const options = { model: "crash-on-call", onReady: () => {} } as unknown as EngineOptions;
  await assert.rejects(connectEngine(worker, options), InvalidRequestError);
  assert.strictEqual(worker.terminated, 1);
});
