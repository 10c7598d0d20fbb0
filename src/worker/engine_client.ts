/**
 * The engine in a worker, seen from the thread that spawned it: spawnEngine() starts
 * engine_worker.ts, sends it the options, waits for the engine to be built and returns the
 * typed Engine interface over comlink. Errors thrown in the worker arrive with their class
 * (error_transfer.ts); a worker that dies rejects every pending call instead of leaving it
 * unanswered forever.
 */
import { proxy, wrap } from "comlink";
import { InvalidRequestError } from "../engine/errors.ts";
import type { Engine, EngineOptions } from "../host/engine_api.ts";
import type { InitMessage, InitReply } from "./engine_worker.ts";
import { deserializeThrown, EngineWorkerError, installErrorTransfer } from "./error_transfer.ts";

export interface EngineHandle {
  /**
   * The engine in the worker. `onToken` is a plain function, proxied across; every call to it
   * has run before generate() resolves, and an error it throws rejects generate() once the
   * request has ended. A call pending when the worker dies rejects with EngineWorkerError.
   */
  engine: Engine;
  /** Closes the engine (finishes or cancels what runs, frees the GPU), then ends the worker. */
  terminate(): Promise<void>;
}

/**
 * Starts an engine worker and builds the engine in it. Rejects with the class the worker threw
 * (a missing model: ModelFormatError; no GPU: WebGPUNotAvailableError) or with EngineWorkerError
 * when the worker itself fails; either way no worker is left running.
 */
export function spawnEngine(options: EngineOptions = {}): Promise<EngineHandle> {
  // The literal `new Worker(new URL(..., import.meta.url))` is what bundlers look for.
  const worker = new Worker(new URL("./engine_worker.ts", import.meta.url), {
    type: "module",
    name: "mace-engine",
  });
  return connectEngine(worker, options);
}

/**
 * spawnEngine for a worker made elsewhere (a bundler's URL for engine_worker.ts, a page's own
 * Worker): sends it the init message and takes ownership of it; it is terminated on failure.
 */
export async function connectEngine(
  worker: Worker,
  options: EngineOptions = {},
): Promise<EngineHandle> {
  installErrorTransfer();
  // Settles (rejects) once, when the worker can no longer answer; raced against every call.
  let gone: EngineWorkerError | null = null;
  let rejectGone!: (error: EngineWorkerError) => void;
  const goneSignal = new Promise<never>((_, reject) => (rejectGone = reject));
  goneSignal.catch(() => {}); // nobody may be waiting when it happens
  const end = (error: EngineWorkerError) => {
    if (gone) return;
    gone = error;
    worker.terminate();
    rejectGone(error);
  };
  // Never removed: an error event left unhandled is rethrown in this thread and ends the process.
  const onError = (event: ErrorEvent) => {
    event.preventDefault();
    const where = event.filename ? ` (${event.filename}:${event.lineno})` : "";
    end(
      new EngineWorkerError(
        `the engine worker stopped on an uncaught error: ${event.message}${where}; ` +
          "its engine is gone: spawn a new one",
      ),
    );
  };
  const onMessageError = () =>
    end(
      new EngineWorkerError(
        "a message from the engine worker could not be read, so a call would never be answered; " +
          "the worker was ended: spawn a new one",
      ),
    );
  worker.addEventListener("error", onError);
  worker.addEventListener("messageerror", onMessageError);

  let onInitReply: ((event: MessageEvent) => void) | null = null;
  const built = new Promise<void>((resolve, reject) => {
    onInitReply = (event: MessageEvent) => {
      const reply = event.data as InitReply | null;
      if (reply?.type === "ready") resolve();
      else if (reply?.type === "init-failed") reject(deserializeThrown(reply.error));
    };
    worker.addEventListener("message", onInitReply);
  });
  const init: InitMessage = { type: "init", options };
  try {
    try {
      worker.postMessage(init);
    } catch (error) {
      throw new InvalidRequestError(
        `engine options must be plain data that postMessage can copy: ${(error as Error).message}`,
      );
    }
    await Promise.race([built, goneSignal]);
  } catch (error) {
    end(new EngineWorkerError("the engine could not be built"));
    throw error;
  } finally {
    worker.removeEventListener("message", onInitReply!);
  }

  const remote = wrap<Engine>(worker);
  const call = <T>(run: () => Promise<T>): Promise<T> =>
    gone ? Promise.reject(gone) : Promise.race([run(), goneSignal]);
  const engine: Engine = {
    info: () => call(() => remote.info()),
    generate: (request, onToken) =>
      // A fresh function is proxied: comlink.proxy marks the object it is given, the caller's own.
      call(() =>
        onToken
          ? remote.generate(request, proxy((token: number) => onToken(token)))
          : remote.generate(request)
      ),
    cancel: (requestId) => call(() => remote.cancel(requestId)),
    submitFeedback: (pairs) => call(() => remote.submitFeedback(pairs)),
    adapters: () => call(() => remote.adapters()),
    publishAdapter: (name, weights) => call(() => remote.publishAdapter(name, weights)),
    metrics: (slo) => call(() => remote.metrics(slo)),
    close: () => call(() => remote.close()),
  };

  const terminate = async () => {
    if (gone) return;
    try {
      await engine.close();
    } finally {
      end(new EngineWorkerError("the engine worker was terminated; spawn a new engine to go on"));
    }
  };
  return { engine, terminate };
}
