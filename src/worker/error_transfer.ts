/**
 * Errors that keep their class across a comlink boundary (the engine worker and its client).
 *
 * Comlink's own "throw" handler sends only {message, name, stack} and rebuilds a plain Error, so a
 * caller could not tell an UnknownAdapterError from a GPU failure. This file replaces it: a thrown
 * error travels as {className, name, message, stack, fields, cause} (fields: its own enumerable
 * data properties that structured cloning can carry, e.g. `code`, ModelFormatError.file/detail)
 * and is rebuilt as an instance of the same class, without running its constructor (subclasses
 * take different arguments). Both sides must call installErrorTransfer().
 *
 * The registry below is the one list of classes that can be rebuilt. A class that is not in it
 * comes back as its nearest registered ancestor (an unregistered subclass of InvalidRequestError
 * is still an InvalidRequestError) with its own name, code and fields; anything else that is an
 * Error comes back as a plain Error with its name and message. Thrown non-errors (strings,
 * numbers, plain objects) come back as they were thrown.
 */
import { type TransferHandler, transferHandlers } from "comlink";
import * as engineErrors from "../engine/errors.ts";
import { MaceError } from "../engine/errors.ts";
import * as schedulerErrors from "../scheduler/errors.ts";
import { MetricsUsageError } from "../scheduler/metrics.ts";
import { ProfileNotFoundError } from "../scheduler/profiles.ts";

/** The engine worker died, could not be started, or was already terminated. */
export class EngineWorkerError extends MaceError {
  override readonly code = "engine_worker";
}

/** A class whose instances are errors; rebuilt with its prototype, never by calling it. */
export type ErrorClass = abstract new (...args: never[]) => Error;

/** A thrown Error (or error-like object) on the wire. Plain data: structured-cloneable. */
export interface SerializedError {
  kind: "error";
  /** The registered class to rebuild: the error's own class or its nearest registered ancestor. */
  className: string;
  name: string;
  message: string;
  stack?: string;
  /** Own enumerable data properties that structured cloning can carry (`code` among them). */
  fields: Record<string, unknown>;
  cause?: SerializedThrown;
  /** AggregateError's errors. */
  errors?: SerializedThrown[];
}

/** Anything that was thrown, on the wire. */
export type SerializedThrown = SerializedError | { kind: "value"; value: unknown };

const BUILTIN_ERRORS: ErrorClass[] = [
  Error,
  TypeError,
  RangeError,
  SyntaxError,
  ReferenceError,
  EvalError,
  URIError,
  AggregateError,
  DOMException,
];

function isErrorClass(value: unknown): value is ErrorClass {
  return typeof value === "function" && (value === Error || value.prototype instanceof Error);
}

let registry: Map<string, ErrorClass> | null = null;

/**
 * Every class that crosses the boundary with its identity, by name, built on first use. The
 * error modules are imported whole so that a class added to one of them is registered without
 * touching this file.
 */
export function registeredErrorClasses(): ReadonlyMap<string, ErrorClass> {
  if (registry) return registry;
  const classes: ErrorClass[] = [
    ...BUILTIN_ERRORS,
    ...Object.values(engineErrors).filter(isErrorClass),
    ...Object.values(schedulerErrors).filter(isErrorClass),
    MetricsUsageError,
    ProfileNotFoundError,
    EngineWorkerError,
  ];
  const map = new Map<string, ErrorClass>();
  for (const cls of classes) {
    const other = map.get(cls.name);
    // Two classes with one name would rebuild as whichever came last: refuse at once.
    if (other && other !== cls) throw new TypeError(`two error classes are named ${cls.name}`);
    map.set(cls.name, cls);
  }
  registry = map;
  return map;
}

/** The error's own class if registered, else its nearest registered ancestor, else Error. */
function registeredClassOf(error: Error): string {
  const classes = registeredErrorClasses();
  for (
    let proto = Object.getPrototypeOf(error);
    proto !== null;
    proto = Object.getPrototypeOf(proto)
  ) {
    const ctor = Object.prototype.hasOwnProperty.call(proto, "constructor")
      ? proto.constructor
      : null;
    if (ctor && classes.get(ctor.name) === ctor) return ctor.name;
  }
  return "Error";
}

function isCloneable(value: unknown): boolean {
  try {
    structuredClone(value);
    return true;
  } catch {
    return false;
  }
}

/** Properties rebuilt on their own (name, message, stack, cause, errors), not as fields. */
const NOT_FIELDS = new Set(["name", "message", "stack", "cause", "errors"]);

/** Causes nest; a cycle (e.cause = e) or a very deep chain stops here. */
const MAX_DEPTH = 8;

/**
 * An object with a string message that is not an Error of this realm (GPUValidationError, a
 * foreign realm's Error).
 */
function isErrorLike(value: unknown): value is { message: string; name?: unknown } {
  return typeof value === "object" && value !== null &&
    typeof (value as { message?: unknown }).message === "string";
}

function serializeError(
  error: Error | { message: string; name?: unknown },
  depth: number,
): SerializedError {
  const className = error instanceof Error ? registeredClassOf(error) : "Error";
  const name = typeof error.name === "string"
    ? error.name
    : (Object.getPrototypeOf(error)?.constructor?.name ?? "Error");
  const out: SerializedError = {
    kind: "error",
    className,
    name,
    message: String(error.message),
    fields: {},
  };
  const stack = (error as { stack?: unknown }).stack;
  if (typeof stack === "string") out.stack = stack;
  for (const [key, desc] of Object.entries(Object.getOwnPropertyDescriptors(error))) {
    // Accessors and non-cloneable values (functions, GPU objects) are left behind: sending them
    // would make postMessage fail and lose the whole error.
    if (NOT_FIELDS.has(key) || !desc.enumerable || !("value" in desc) || !isCloneable(desc.value)) {
      continue;
    }
    out.fields[key] = desc.value;
  }
  if (depth < MAX_DEPTH) {
    if ("cause" in error && error.cause !== undefined) {
      out.cause = serializeAt(error.cause, depth + 1);
    }
    if (error instanceof AggregateError && Array.isArray(error.errors)) {
      out.errors = error.errors.map((e) => serializeAt(e, depth + 1));
    }
  }
  return out;
}

function serializeAt(value: unknown, depth: number): SerializedThrown {
  if (value instanceof Error || isErrorLike(value)) return serializeError(value, depth);
  if (isCloneable(value)) return { kind: "value", value };
  // A function, symbol or host object was thrown: its text is the most that can travel.
  let text: string;
  try {
    text = String(value);
  } catch {
    text = Object.prototype.toString.call(value);
  }
  return { kind: "value", value: text };
}

/** Turns any thrown value into plain data that postMessage can carry. */
export function serializeThrown(value: unknown): SerializedThrown {
  return serializeAt(value, 0);
}

function defineHidden(target: object, key: string, value: unknown): void {
  Object.defineProperty(target, key, {
    value,
    writable: true,
    enumerable: false,
    configurable: true,
  });
}

function rebuildError(s: SerializedError): Error {
  const cls = registeredErrorClasses().get(s.className) ?? Error;
  // DOMException keeps name and message in internal slots, so it must be constructed; every other
  // class gets a real Error object (stack, Error.isError) whose prototype is the class's.
  const error: Error = cls === DOMException
    ? new DOMException(s.message, s.name)
    : Reflect.construct(Error, [s.message], cls);
  // MaceError and errors renamed after construction carry `name` as an own property; classes
  // whose prototype already gives the right name (TypeError) do not.
  if (error.name !== s.name) {
    Object.defineProperty(error, "name", {
      value: s.name,
      writable: true,
      enumerable: true,
      configurable: true,
    });
  }
  for (const [key, value] of Object.entries(s.fields)) {
    Object.defineProperty(error, key, {
      value,
      writable: true,
      enumerable: true,
      configurable: true,
    });
  }
  if (s.stack !== undefined) defineHidden(error, "stack", s.stack);
  if (s.cause !== undefined) defineHidden(error, "cause", deserializeThrown(s.cause));
  if (s.errors !== undefined) defineHidden(error, "errors", s.errors.map(deserializeThrown));
  return error;
}

/** The value serializeThrown was given, rebuilt: same class, name, message, stack and fields. */
export function deserializeThrown(s: SerializedThrown): unknown {
  return s.kind === "error" ? rebuildError(s) : s.value;
}

/** Comlink wraps a thrown value as { value, [its private marker]: 0 }. */
interface ThrownWrapper {
  value: unknown;
}

let installed = false;

/**
 * Makes comlink carry thrown values with serializeThrown / deserializeThrown. Idempotent; the
 * handler table is per realm, so the worker and the page (or the Deno main thread) each call it.
 */
export function installErrorTransfer(): void {
  if (installed) return;
  const builtin = transferHandlers.get("throw");
  if (!builtin) throw new TypeError('comlink has no "throw" transfer handler to replace');
  const handler: TransferHandler<ThrownWrapper, SerializedThrown> = {
    // Only comlink can recognise its wrapper (its marker is a private symbol), so ask it.
    canHandle: (value): value is ThrownWrapper => builtin.canHandle(value),
    serialize: (wrapper) => [serializeThrown(wrapper.value), []],
    deserialize: (serialized) => {
      throw deserializeThrown(serialized);
    },
  };
  transferHandlers.set("throw", handler as TransferHandler<unknown, unknown>);
  installed = true;
}
