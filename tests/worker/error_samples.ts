/**
 * One instance of every error class the worker boundary can rebuild (the registry in
 * src/worker/error_transfer.ts), with real constructor arguments, and the check that a rebuilt
 * error equals its original. Shared by the error-transfer tests and their fixture worker.
 */
import assert from "node:assert/strict";
import {
  AdapterFormatError,
  DatasetFormatError,
  ModelFormatError,
  ProfileFormatError,
  TraceFormatError,
  UnknownAdapterError,
} from "../../src/engine/errors.ts";
import { OutOfKvBlocksError } from "../../src/scheduler/errors.ts";
import { ProfileNotFoundError } from "../../src/scheduler/profiles.ts";
import { registeredErrorClasses } from "../../src/worker/error_transfer.ts";

/** Classes whose constructor is not (message): their arguments, as a caller would pass them. */
const SPECIAL: Record<string, () => Error> = {
  ModelFormatError: () =>
    new ModelFormatError(
      "models/x/model.safetensors",
      "shape [3, 4] expected [4, 4]",
      "lm_head.weight",
    ),
  DatasetFormatError: () => new DatasetFormatError("data/prefs.jsonl", "not UTF-8"),
  AdapterFormatError: () => new AdapterFormatError("adapters/a", "rank 0", "q_proj.lora_A"),
  UnknownAdapterError: () => new UnknownAdapterError("tone@3", ["tone@1", "tone@2"]),
  TraceFormatError: () => new TraceFormatError("traces/azure.csv", "bad timestamp", 17),
  ProfileFormatError: () => new ProfileFormatError("profiles/x.json", "schema is 2"),
  ProfileNotFoundError: () => new ProfileNotFoundError("profiles/none.json"),
  OutOfKvBlocksError: () => new OutOfKvBlocksError(3, 900, 57, 32, 16),
  AggregateError: () =>
    new AggregateError([new UnknownAdapterError("a", []), "plain"], "two failures"),
  DOMException: () => new DOMException("the operation was aborted", "AbortError"),
};

/** An instance of the registered class `name`. */
export function sampleError(name: string): Error {
  const special = SPECIAL[name];
  if (special) return special();
  const cls = registeredErrorClasses().get(name);
  if (!cls) throw new TypeError(`${name} is not a registered error class`);
  // Every other registered class takes (message) like Error does.
  return new (cls as unknown as new (message: string) => Error)(
    `sample ${name}: do the next thing`,
  );
}

/** Own enumerable properties: what a class's constructor and fields set (name, code, data). */
function ownFields(error: Error): Record<string, unknown> {
  return Object.fromEntries(Object.entries(error));
}

/**
 * Asserts `actual` was rebuilt from `expected` with its class, name, message, stack and fields.
 * `sameStack: false` when `expected` is a twin made in this realm of the error thrown elsewhere.
 */
export function assertSameError(actual: unknown, expected: Error, sameStack = true): void {
  assert.ok(actual instanceof Error, `expected an Error, got ${String(actual)}`);
  const expectedClass = Object.getPrototypeOf(expected).constructor;
  assert.strictEqual(actual.constructor, expectedClass, `class of ${expected.name}`);
  assert.ok(actual instanceof expectedClass);
  assert.strictEqual(actual.name, expected.name);
  assert.strictEqual(actual.message, expected.message);
  if (sameStack) assert.strictEqual(actual.stack, expected.stack);
  else assert.match(actual.stack ?? "", /error_samples\.ts/, "the stack is the thrower's");
  assert.strictEqual((actual as { code?: unknown }).code, (expected as { code?: unknown }).code);
  assert.deepStrictEqual(ownFields(actual), ownFields(expected));
  if (expected instanceof AggregateError) {
    const errors = (actual as AggregateError).errors;
    assert.strictEqual(errors.length, expected.errors.length);
    expected.errors.forEach((e, i) =>
      e instanceof Error
        ? assertSameError(errors[i], e, sameStack)
        : assert.deepStrictEqual(errors[i], e)
    );
  }
}
