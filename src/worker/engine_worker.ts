/**
 * The engine worker's entry (a Deno Worker or a browser module worker; start it with
 * spawnEngine in engine_client.ts). Protocol: the first message is { type: "init", options };
 * the worker builds MaceEngine.create(options) and answers { type: "ready" } once the engine is
 * exposed through comlink, or { type: "init-failed", error } with the error serialized so that
 * the client rethrows it with its class. Everything after "ready" is comlink traffic.
 */
import { expose, releaseProxy, type Remote } from "comlink";
import { MaceEngine } from "../host/mace_engine.ts";
import type { LoraWeights } from "../engine/lora/lora.ts";
import type {
  Engine,
  EngineOptions,
  FeedbackPair,
  GenerateRequest,
  GenerateResult,
} from "../host/engine_api.ts";
import { installErrorTransfer, type SerializedThrown, serializeThrown } from "./error_transfer.ts";

export interface InitMessage {
  type: "init";
  options: EngineOptions;
}

export type InitReply = { type: "ready" } | { type: "init-failed"; error: SerializedThrown };

/** What this file needs of a worker's global scope; Deno's and the browser's agree on it. */
interface WorkerScope {
  addEventListener(type: "message", listener: (event: MessageEvent) => void): void;
  removeEventListener(type: "message", listener: (event: MessageEvent) => void): void;
  postMessage(message: InitReply): void;
}

type TokenCallback = Remote<(token: number) => void>;

/**
 * Runs one request with its onToken calls forwarded to the client. Each call is posted at once,
 * in order, on the callback's own port; generate's answer travels on the worker's port and could
 * overtake the last tokens, so it is held until the client has run every onToken. The first error
 * the client's onToken threw rejects the call, once the request has ended.
 */
async function generateStreaming(
  engine: Engine,
  request: GenerateRequest,
  onToken: TokenCallback,
): Promise<GenerateResult> {
  const delivered: Promise<void>[] = [];
  const callbackErrors: unknown[] = [];
  const forward = (token: number) => {
    delivered.push(
      Promise.resolve(onToken(token)).then(() => {}, (error) => void callbackErrors.push(error)),
    );
  };
  let result: GenerateResult;
  try {
    result = await engine.generate(request, forward);
  } finally {
    // Also when generate failed: its answer must not overtake the tokens sent before.
    await Promise.all(delivered);
    // Closes the callback's port pair now rather than when the garbage collector gets to it.
    onToken[releaseProxy]();
  }
  if (callbackErrors.length > 0) throw callbackErrors[0];
  return result;
}

/** The object comlink exposes: the engine, with generate's callback delivered in order. */
function workerSide(engine: Engine) {
  return {
    info: () => engine.info(),
    generate: (request: GenerateRequest, onToken?: TokenCallback) =>
      onToken ? generateStreaming(engine, request, onToken) : engine.generate(request),
    cancel: (requestId: string) => engine.cancel(requestId),
    submitFeedback: (pairs: FeedbackPair[]) => engine.submitFeedback(pairs),
    adapters: () => engine.adapters(),
    publishAdapter: (name: string, weights: LoraWeights) => engine.publishAdapter(name, weights),
    metrics: (slo?: { ttftMs?: number; tbtMs?: number }) => engine.metrics(slo),
    close: () => engine.close(),
  };
}

async function start(scope: WorkerScope, options: EngineOptions): Promise<void> {
  let engine: MaceEngine;
  try {
    engine = await MaceEngine.create(options);
  } catch (error) {
    scope.postMessage({ type: "init-failed", error: serializeThrown(error) });
    return;
  }
  // Exposed before "ready" goes out, so the client's first call finds a listener.
  expose(workerSide(engine));
  scope.postMessage({ type: "ready" });
}

installErrorTransfer();
const scope = globalThis as unknown as WorkerScope;
const onInit = (event: MessageEvent) => {
  const message = event.data as Partial<InitMessage> | null;
  if (message?.type !== "init") return;
  scope.removeEventListener("message", onInit);
  void start(scope, message.options ?? {});
};
scope.addEventListener("message", onInit);
