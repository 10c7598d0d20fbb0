/**
 * Errors keep their class across the worker boundary: every registered class round-trips through
 * the serializer, through comlink over a real MessageChannel, and out of a real Worker (another
 * realm). No GPU.
 */
import assert from "node:assert/strict";
import { expose, releaseProxy, type Remote, transferHandlers, wrap } from "comlink";
import {
  InvalidRequestError,
  MaceError,
  ModelFormatError,
  UnknownAdapterError,
} from "../../src/engine/errors.ts";
import {
  deserializeThrown,
  EngineWorkerError,
  installErrorTransfer,
  registeredErrorClasses,
  serializeThrown,
} from "../../src/worker/error_transfer.ts";
import { assertSameError, sampleError } from "./error_samples.ts";

installErrorTransfer();

/** What postMessage does to the wire form: a structured clone. */
function roundTrip(value: unknown): unknown {
  return deserializeThrown(structuredClone(serializeThrown(value)));
}

interface Thrower {
  throwSample(name: string): never;
  rejectSample(name: string): Promise<never>;
  throwValue(value: unknown): never;
}

const localThrower: Thrower = {
  throwSample: (name) => {
    throw sampleError(name);
  },
  rejectSample: async (name) => {
    await Promise.resolve();
    throw sampleError(name);
  },
  throwValue: (value) => {
    throw value;
  },
};

/** What a remote call rejected with (it must reject). */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("the call resolved; it should have rejected");
}

/** Runs fn against `thrower` exposed on one end of a MessageChannel and wrapped on the other. */
async function overChannel(fn: (remote: Remote<Thrower>) => Promise<void>): Promise<void> {
  const { port1, port2 } = new MessageChannel();
  expose(localThrower, port1);
  const remote = wrap<Thrower>(port2);
  try {
    await fn(remote);
  } finally {
    remote[releaseProxy]();
    port1.close();
    port2.close();
  }
}

const NON_ERRORS: unknown[] = [
  "a string",
  42,
  0,
  null,
  undefined,
  false,
  { reason: "plain object", retry: [1, 2] },
];

Deno.test("the registry holds the engine's, the scheduler's and the worker's error classes", () => {
  const classes = registeredErrorClasses();
  for (
    const cls of [
      MaceError,
      ModelFormatError,
      InvalidRequestError,
      UnknownAdapterError,
      EngineWorkerError,
    ]
  ) {
    assert.strictEqual(classes.get(cls.name), cls);
  }
  for (
    const name of [
      "OutOfKvBlocksError",
      "KvIntegrityError",
      "MetricsUsageError",
      "ProfileFormatError",
      "TypeError",
    ]
  ) {
    assert.ok(classes.has(name), name);
  }
});

Deno.test("every MaceError subclass declared in src/ is registered", async () => {
  // Read from the source so a class in a new file cannot be forgotten: it would cross the
  // boundary as its nearest registered ancestor, with the wrong constructor.
  const parents = new Map<string, string>();
  const where = new Map<string, string>();
  const walk = async (dir: URL) => {
    for await (const entry of Deno.readDir(dir)) {
      const url = new URL(entry.name + (entry.isDirectory ? "/" : ""), dir);
      if (entry.isDirectory) await walk(url);
      else if (entry.name.endsWith(".ts")) {
        const text = await Deno.readTextFile(url);
        for (const m of text.matchAll(/\bclass\s+(\w+)\s+extends\s+(\w+)/g)) {
          parents.set(m[1], m[2]);
          where.set(m[1], url.pathname);
        }
      }
    }
  };
  await walk(new URL("../../src/", import.meta.url));
  const descendsFromMace = (name: string): boolean => {
    for (let n: string | undefined = name, hops = 0; n && hops < 32; n = parents.get(n), hops++) {
      if (n === "MaceError") return true;
    }
    return false;
  };
  const missing = [...parents.keys()].filter((name) =>
    descendsFromMace(name) && !registeredErrorClasses().has(name)
  );
  assert.deepStrictEqual(
    missing.map((name) => `${name} (${where.get(name)})`),
    [],
    "register these in src/worker/error_transfer.ts",
  );
  assert.ok(parents.size >= 15, `found only ${parents.size} error classes: is the scan broken?`);
});

Deno.test("every registered class survives the serializer and a structured clone", () => {
  for (const name of registeredErrorClasses().keys()) {
    const original = sampleError(name);
    assertSameError(roundTrip(original), original);
  }
});

Deno.test({
  name: "data fields keep their values: ModelFormatError's file/detail/tensor, " +
    "UnknownAdapterError's list",
}, () => {
  const model = roundTrip(sampleError("ModelFormatError")) as ModelFormatError;
  assert.ok(model instanceof ModelFormatError && model instanceof MaceError);
  assert.strictEqual(model.code, "model_format");
  assert.strictEqual(model.file, "models/x/model.safetensors");
  assert.strictEqual(model.detail, "shape [3, 4] expected [4, 4]");
  assert.strictEqual(model.tensor, "lm_head.weight");
  const adapter = roundTrip(sampleError("UnknownAdapterError")) as UnknownAdapterError;
  assert.deepStrictEqual(adapter.known, ["tone@1", "tone@2"]);
  assert.strictEqual(adapter.adapter, "tone@3");
  assert.strictEqual(adapter.code, "unknown_adapter");
});

Deno.test({
  name: "an unregistered subclass comes back as its nearest registered ancestor, " +
    "with its own name and fields",
}, () => {
  class PromptTooLongError extends InvalidRequestError {
    readonly limit = 256;
  }
  const rebuilt = roundTrip(new PromptTooLongError("prompt has 300 tokens; the limit is 256"));
  assert.ok(rebuilt instanceof InvalidRequestError);
  assert.ok(!(rebuilt instanceof PromptTooLongError));
  assert.strictEqual(rebuilt.name, "PromptTooLongError");
  assert.strictEqual(rebuilt.code, "invalid_request");
  assert.strictEqual((rebuilt as unknown as PromptTooLongError).limit, 256);

  class Foreign extends Error {}
  const foreign = new Foreign("not ours");
  foreign.name = "ForeignError";
  const plain = roundTrip(foreign) as Error;
  assert.strictEqual(Object.getPrototypeOf(plain), Error.prototype);
  assert.strictEqual(plain.name, "ForeignError");
  assert.strictEqual(plain.message, "not ours");
});

Deno.test("thrown non-errors come back as thrown; functions and symbols as their text", () => {
  for (const value of NON_ERRORS) assert.deepStrictEqual(roundTrip(value), value);
  assert.strictEqual(roundTrip(Symbol("s")), "Symbol(s)");
  assert.match(roundTrip(() => 1) as string, /=>/);
});

Deno.test({
  name: "causes are rebuilt, cycles end, and fields structured cloning cannot carry are dropped",
}, () => {
  const cause = new ModelFormatError("config.json", "missing hidden_size");
  const outer = new MaceError("could not start the engine");
  Object.defineProperty(outer, "cause", {
    value: cause,
    enumerable: false,
    writable: true,
    configurable: true,
  });
  const rebuilt = roundTrip(outer) as Error;
  assert.ok(rebuilt instanceof MaceError);
  assertSameError(rebuilt.cause, cause);

  const looped = new InvalidRequestError("refers to itself");
  Object.defineProperty(looped, "cause", { value: looped, enumerable: false });
  let depth = 0;
  for (let e: unknown = roundTrip(looped); e instanceof InvalidRequestError; e = e.cause) depth++;
  assert.ok(depth > 1 && depth < 20, `cause chain of ${depth}`);

  const withCallback = Object.assign(new InvalidRequestError("has a callback"), {
    retry: () => 1,
    attempt: 2,
  });
  const wire = serializeThrown(withCallback);
  assert.doesNotThrow(() => structuredClone(wire));
  const back = deserializeThrown(structuredClone(wire)) as InvalidRequestError & {
    attempt: number;
  };
  assert.strictEqual(back.attempt, 2);
  assert.ok(!("retry" in back));
});

Deno.test("installErrorTransfer is idempotent", () => {
  const handler = transferHandlers.get("throw");
  installErrorTransfer();
  installErrorTransfer();
  assert.strictEqual(transferHandlers.get("throw"), handler);
});

Deno.test({
  name: "through comlink on a MessageChannel: thrown and rejected errors keep their class",
}, async () => {
  await overChannel(async (remote) => {
    for (const name of registeredErrorClasses().keys()) {
      const expected = sampleError(name);
      // Thrown in this realm from the same code: same message and fields; the stack differs.
      assertSameError(await rejection(remote.throwSample(name)), expected, false);
      assertSameError(await rejection(remote.rejectSample(name)), expected, false);
    }
    for (const value of NON_ERRORS) {
      assert.deepStrictEqual(await rejection(remote.throwValue(value)), value);
    }
  });
});

Deno.test("out of a real Worker (another realm): errors keep their class", async () => {
  const worker = new Worker(new URL("./fixtures/throwing_worker.ts", import.meta.url), {
    type: "module",
  });
  const remote = wrap<Thrower>(worker);
  try {
    for (const name of registeredErrorClasses().keys()) {
      assertSameError(await rejection(remote.throwSample(name)), sampleError(name), false);
    }
    const rejected = await rejection(remote.rejectSample("UnknownAdapterError"));
    assert.ok(rejected instanceof UnknownAdapterError);
    assert.deepStrictEqual(rejected.known, ["tone@1", "tone@2"]);
    for (const value of NON_ERRORS) {
      assert.deepStrictEqual(await rejection(remote.throwValue(value)), value);
    }
  } finally {
    remote[releaseProxy]();
    worker.terminate();
  }
});
