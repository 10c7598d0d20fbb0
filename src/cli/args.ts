/** Command-line flag parsing shared by the CLI commands; bad flags raise InvalidRequestError. */
import { parseArgs } from "node:util";
import { InvalidRequestError } from "../engine/errors.ts";
import type { BackendName } from "../engine/gpu/context.ts";

export type FlagSpec = Record<string, { type: "string" | "boolean"; default?: string | boolean }>;

export function parseFlags<T extends FlagSpec>(argv: string[], spec: T, command: string) {
  try {
    return parseArgs({ args: argv, options: spec, strict: true, allowPositionals: false }).values;
  } catch (e) {
    throw new InvalidRequestError(`${command}: ${(e as Error).message}. Run \`mace help\`.`);
  }
}

export function numberFlag(
  value: unknown,
  name: string,
  fallback: number,
  check: (n: number) => boolean = Number.isFinite,
): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || !check(n)) {
    throw new InvalidRequestError(`--${name} ${String(value)} is not a valid value`);
  }
  return n;
}

/** The --backend flag: auto, wgpu or dawn (the browser backend is no command-line choice). */
export function backendFlag(value: unknown): Exclude<BackendName, "browser"> {
  const backend = String(value ?? "auto");
  if (backend !== "auto" && backend !== "wgpu" && backend !== "dawn") {
    throw new InvalidRequestError(`--backend ${backend}: expected auto, wgpu or dawn`);
  }
  return backend;
}

export { BUNDLED_MODEL as DEFAULT_MODEL } from "../host/defaults.ts";
