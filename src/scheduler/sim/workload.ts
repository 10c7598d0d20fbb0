/**
 * Workloads for the scheduler's simulator (and the live Poisson load): the list of requests that
 * arrive, when, how long their prompts and outputs are, and which of them later come back with a
 * preference pair. Two sources, both deterministic for a seed:
 *
 * - a timed trace (Azure LLM inference 2023, conversation or code), replayed with its own
 *   burstiness and optionally time-scaled to a target mean rate;
 * - Poisson arrivals at a given rate, with lengths drawn from a length-only trace (ShareGPT).
 *
 * The traces ship in data/traces/ (see data/README.md). Pure TypeScript: no WebGPU here.
 */

import { fileURLToPath } from "node:url";
import { InvalidRequestError, TraceFormatError } from "../../engine/errors.ts";
import { rng } from "../../engine/training/seeded_random.ts";

/** One request of a workload, in arrival order; `id` is its index. */
export interface Arrival {
  id: number;
  /** Milliseconds since the start of the workload window. */
  atMs: number;
  promptTokens: number;
  outputTokens: number;
  /** This request later comes back with a preference pair (feedback for retraining). */
  feedback: boolean;
}

/** Prompt and output length of one traced request (ShareGPT has only these). */
export interface LengthRow {
  promptTokens: number;
  outputTokens: number;
}

/** One row of a timed trace: lengths plus arrival time in ms since the trace's first row. */
export interface TraceRow extends LengthRow {
  atMs: number;
}

// ---------------------------------------------------------------------------------------------
// Named traces

const NAMED = {
  "azure-conv": "../../../data/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv",
  "azure-code": "../../../data/traces/azure-llm-2023/AzureLLMInferenceTrace_code.csv",
  "sharegpt":
    "../../../data/traces/sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
} as const;

export type TraceName = keyof typeof NAMED;
export const TRACE_NAMES = Object.keys(NAMED) as TraceName[];

/** File path of a trace shipped in data/traces/, resolved from this module (works from any cwd). */
export function namedTrace(name: string): string {
  if (!(name in NAMED)) {
    throw new InvalidRequestError(
      `unknown trace "${name}"; known: ${TRACE_NAMES.join(", ")} (or pass a CSV file path)`,
    );
  }
  // fileURLToPath, not URL.pathname: the checkout path may hold spaces or other escaped characters.
  return fileURLToPath(new URL(NAMED[name as TraceName], import.meta.url));
}

// ---------------------------------------------------------------------------------------------
// Parsing. Malformed rows throw TraceFormatError with file and 1-based line, never skip: these are
// published files read whole, so a bad row means a wrong or damaged file and silently dropping
// rows would change the arrival rate the experiment reports. Empty lines (the trailing newline)
// are ignored; CRLF line ends (the Azure files use them) are accepted.

const AZURE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"];
const SHAREGPT_HEADER = ["num_prefill_tokens", "num_decode_tokens"];

/** Non-empty lines as [1-based line number, cells]. */
function csvLines(text: string): Array<[number, string[]]> {
  const out: Array<[number, string[]]> = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].endsWith("\r") ? lines[i].slice(0, -1) : lines[i];
    if (line.trim() === "") continue;
    out.push([i + 1, line.split(",").map((c) => c.trim())]);
  }
  return out;
}

function checkHeader(file: string, lines: Array<[number, string[]]>, want: string[]): void {
  if (lines.length === 0) throw new TraceFormatError(file, "empty file (expected a CSV header)");
  const [line, cells] = lines[0];
  if (want.some((w, i) => cells[i]?.replace(/^\uFEFF/, "") !== w)) {
    throw new TraceFormatError(
      file,
      `header is "${cells.join(",")}", expected it to start with "${want.join(",")}"`,
      line,
    );
  }
  if (lines.length === 1) throw new TraceFormatError(file, "no data rows after the header");
}

function tokenCount(file: string, line: number, column: string, cell: string | undefined): number {
  if (cell === undefined || !/^\d+$/.test(cell)) {
    throw new TraceFormatError(
      file,
      `${column} is "${cell ?? ""}", expected a non-negative integer`,
      line,
    );
  }
  return Number(cell);
}

/** 100-ns ticks per day: the Azure timestamps carry 7 fractional digits of a second. */
const TICKS_PER_DAY = 864e9;
const TIMESTAMP = /^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,7}))?$/;

/**
 * "2023-11-16 18:15:46.6805900" → [day number, 100-ns tick within the day], both exact integers.
 * Date parsing is not used: it keeps only milliseconds and its handling of 7 fractional digits
 * is engine-specific. Splitting day and tick keeps every value far below 2^53.
 */
function parseTimestamp(file: string, line: number, cell: string): [number, number] {
  const m = TIMESTAMP.exec(cell);
  const bad = (why: string) =>
    new TraceFormatError(
      file,
      `TIMESTAMP "${cell}" ${why} (expected "YYYY-MM-DD HH:MM:SS.fffffff")`,
      line,
    );
  if (!m) throw bad("is malformed");
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number);
  const dayMs = Date.UTC(y, mo - 1, d);
  // Date.UTC rolls 2023-02-30 over to March; a round trip catches impossible dates.
  const check = new Date(dayMs);
  if (check.getUTCMonth() !== mo - 1 || check.getUTCDate() !== d) throw bad("is not a valid date");
  if (h > 23 || mi > 59 || s > 59) throw bad("is not a valid time of day");
  const frac = Number((m[7] ?? "").padEnd(7, "0"));
  return [dayMs / 864e5, ((h * 60 + mi) * 60 + s) * 1e7 + frac];
}

/**
 * Parses an Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`). `atMs` is
 * milliseconds since the first row, exact to the trace's 100 ns (the difference is taken in
 * integer ticks, then divided once). Timestamps must not decrease (the published files are
 * sorted; a decrease means a damaged or concatenated file).
 */
export function parseAzureTrace(text: string, file = "<azure trace>"): TraceRow[] {
  const lines = csvLines(text);
  checkHeader(file, lines, AZURE_HEADER);
  const rows: TraceRow[] = [];
  let day0 = 0, tick0 = 0, prevTicks = -Infinity;
  for (let i = 1; i < lines.length; i++) {
    const [line, cells] = lines[i];
    if (cells.length !== 3) {
      throw new TraceFormatError(
        file,
        `${cells.length} columns, expected 3 (${AZURE_HEADER.join(",")})`,
        line,
      );
    }
    const [day, tick] = parseTimestamp(file, line, cells[0]);
    if (i === 1) [day0, tick0] = [day, tick];
    const ticks = (day - day0) * TICKS_PER_DAY + (tick - tick0);
    if (ticks < prevTicks) {
      throw new TraceFormatError(
        file,
        `TIMESTAMP "${cells[0]}" is earlier than the row before it`,
        line,
      );
    }
    prevTicks = ticks;
    rows.push({
      atMs: ticks / 1e4,
      promptTokens: tokenCount(file, line, "ContextTokens", cells[1]),
      outputTokens: tokenCount(file, line, "GeneratedTokens", cells[2]),
    });
  }
  return rows;
}

/**
 * Parses ShareGPT length statistics (`num_prefill_tokens,num_decode_tokens,…`; extra columns
 * ignored).
 */
export function parseShareGptLengths(text: string, file = "<sharegpt lengths>"): LengthRow[] {
  const lines = csvLines(text);
  checkHeader(file, lines, SHAREGPT_HEADER);
  const width = lines[0][1].length;
  const rows: LengthRow[] = [];
  for (let i = 1; i < lines.length; i++) {
    const [line, cells] = lines[i];
    if (cells.length !== width) {
      throw new TraceFormatError(
        file,
        `${cells.length} columns, expected ${width} as in the header`,
        line,
      );
    }
    rows.push({
      promptTokens: tokenCount(file, line, "num_prefill_tokens", cells[0]),
      outputTokens: tokenCount(file, line, "num_decode_tokens", cells[1]),
    });
  }
  return rows;
}

async function readTrace(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new TraceFormatError(path, `file not found (named traces: ${TRACE_NAMES.join(", ")})`);
    }
    throw new TraceFormatError(path, `cannot read: ${(e as Error).message}`);
  }
}

/**
 * Loads a trace by name or path, telling timed traces from length-only ones by the header, so a
 * CLI `--trace FILE|NAME` needs no separate format flag.
 */
export async function loadTrace(
  nameOrPath: string,
): Promise<{ kind: "timed"; rows: TraceRow[] } | { kind: "lengths"; rows: LengthRow[] }> {
  const path = nameOrPath in NAMED ? namedTrace(nameOrPath) : nameOrPath;
  const text = await readTrace(path);
  const head = text.slice(0, 200).replace(/^\uFEFF/, "");
  if (head.startsWith(AZURE_HEADER[0])) return { kind: "timed", rows: parseAzureTrace(text, path) };
  if (head.startsWith(SHAREGPT_HEADER[0])) {
    return { kind: "lengths", rows: parseShareGptLengths(text, path) };
  }
  throw new TraceFormatError(
    path,
    `unknown trace format: header should start with "${AZURE_HEADER.join(",")}" (Azure) ` +
      `or "${SHAREGPT_HEADER.join(",")}" (ShareGPT lengths)`,
    1,
  );
}

// ---------------------------------------------------------------------------------------------
// Workloads

interface CommonOptions {
  /** Length of the workload window, seconds (of workload time, after any scaling). */
  durationS: number;
  /** Share of requests marked `feedback`, 0..1. */
  retrainRate: number;
  seed: number;
  /** Clamp lengths for small models (the bundled model's context is far below the traces'). */
  maxPromptTokens?: number;
  maxOutputTokens?: number;
}

export interface TraceWorkloadOptions extends CommonOptions {
  /**
   * Requests/s: time-scale the whole trace so its mean rate is this. Absent: replay as recorded.
   */
  rate?: number;
  /** Where the window starts in the trace, in trace seconds (before scaling). Default 0. */
  startS?: number;
}

export interface PoissonWorkloadOptions extends CommonOptions {
  /** Mean arrival rate, requests/s. */
  rate: number;
  /** Rows to draw lengths from, uniformly with replacement (ShareGPT, or a timed trace's rows). */
  lengths: readonly LengthRow[];
}

// Independent PRNG streams per purpose, so that changing one knob leaves the other draws as they
// were: the same seed gives the same arrivals at every retrain rate (common random numbers across
// the 10/30/50% comparison), and the feedback sets are nested (10% ⊂ 30% ⊂ 50%), because request i
// is feedback iff its own uniform draw is below the rate.
const STREAM_TIMES = 1, STREAM_LENGTHS = 2, STREAM_FEEDBACK = 3;

/** 32-bit seed of one stream: murmur3's finalizer over the seed's two halves and the stream id. */
function streamSeed(seed: number, stream: number): number {
  let h = Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) ^ Math.floor(seed / 2 ** 32);
  h = Math.imul(h ^ Math.imul(stream, 0xc2b2ae35), 0x27d4eb2f);
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

function checkCommon(o: CommonOptions): void {
  const positive = (name: string, v: number) => {
    if (!(Number.isFinite(v) && v > 0)) {
      throw new InvalidRequestError(`${name} must be a positive number, got ${v}`);
    }
  };
  positive("durationS", o.durationS);
  if (!(o.retrainRate >= 0 && o.retrainRate <= 1)) {
    throw new InvalidRequestError(`retrainRate must be a share in [0, 1], got ${o.retrainRate}`);
  }
  if (!Number.isSafeInteger(o.seed)) {
    throw new InvalidRequestError(`seed must be an integer, got ${o.seed}`);
  }
  for (
    const [name, v] of [["maxPromptTokens", o.maxPromptTokens], [
      "maxOutputTokens",
      o.maxOutputTokens,
    ]] as const
  ) {
    if (v !== undefined && !(Number.isSafeInteger(v) && v >= 1)) {
      throw new InvalidRequestError(`${name} must be an integer ≥ 1, got ${v}`);
    }
  }
}

/**
 * Lengths as the engine will run them: at least 1 (a request prefills something and produces at
 * least its first token; the shipped traces have no zeros) and at most the clamp.
 */
function clampLengths(row: LengthRow, o: CommonOptions): LengthRow {
  return {
    promptTokens: Math.max(1, Math.min(row.promptTokens, o.maxPromptTokens ?? Infinity)),
    outputTokens: Math.max(1, Math.min(row.outputTokens, o.maxOutputTokens ?? Infinity)),
  };
}

/**
 * The trace's period when looped: its span plus one mean gap, so a trace of n rows holds exactly
 * n arrivals per period and looping keeps its mean rate.
 */
function tracePeriodMs(rows: readonly TraceRow[]): number {
  const span = rows[rows.length - 1].atMs - rows[0].atMs;
  return span + span / (rows.length - 1);
}

/** The trace's own mean rate (requests/s), over its looped period. */
export function traceRate(rows: readonly TraceRow[]): number {
  if (rows.length < 2) {
    throw new InvalidRequestError("a timed trace needs at least 2 rows to have a rate");
  }
  const period = tracePeriodMs(rows);
  // All rows at one instant would make the period 0 and looping never advance.
  if (!(period > 0)) {
    throw new InvalidRequestError("a timed trace's rows must not all share one timestamp");
  }
  return rows.length / (period / 1000);
}

/**
 * Replays a timed trace over [startS, …) of the trace, for `durationS` seconds of workload time.
 * With `rate`, every gap is multiplied by (trace mean rate / rate): the mean over the whole trace
 * becomes `rate` while the trace's burstiness is kept, so a short window can run above or below
 * `rate` exactly as the trace did there. A window past the trace's end loops it (see
 * tracePeriodMs). Times are relative to the window start (startS maps to 0 ms). Only feedback
 * marks use the seed.
 */
export function traceWorkload(rows: readonly TraceRow[], o: TraceWorkloadOptions): Arrival[] {
  checkCommon(o);
  const rate = traceRate(rows);
  const startS = o.startS ?? 0;
  if (!(Number.isFinite(startS) && startS >= 0)) {
    throw new InvalidRequestError(`startS must be a non-negative number, got ${startS}`);
  }
  if (o.rate !== undefined && !(Number.isFinite(o.rate) && o.rate > 0)) {
    throw new InvalidRequestError(`rate must be a positive number of requests/s, got ${o.rate}`);
  }
  for (let i = 1; i < rows.length; i++) {
    if (!(rows[i].atMs >= rows[i - 1].atMs)) {
      throw new InvalidRequestError(
        `trace rows must be sorted by atMs (row ${i} is earlier than row ${i - 1})`,
      );
    }
  }
  const scale = o.rate === undefined ? 1 : rate / o.rate; // workload ms per trace ms
  const period = tracePeriodMs(rows);
  const t0 = rows[0].atMs;
  const startMs = startS * 1000;
  const endMs = o.durationS * 1000;

  // First row at or after startMs: which loop of the trace, then which row within it.
  let cycle = Math.floor(startMs / period);
  let i = rows.findIndex((r) => r.atMs - t0 + cycle * period >= startMs);
  if (i < 0) [cycle, i] = [cycle + 1, 0];

  const feedback = rng(streamSeed(o.seed, STREAM_FEEDBACK));
  const out: Arrival[] = [];
  for (;;) {
    // Kept as (row time − start) so that without scaling or looping the trace's exact ms survive.
    const atMs = (rows[i].atMs - t0 - startMs + cycle * period) * scale;
    if (atMs >= endMs) break;
    out.push({
      id: out.length,
      atMs,
      ...clampLengths(rows[i], o),
      feedback: feedback() < o.retrainRate,
    });
    if (++i === rows.length) [cycle, i] = [cycle + 1, 0];
  }
  return out;
}

/**
 * Poisson arrivals at `rate` over `durationS` (exponential gaps from time 0), each with the
 * lengths of a row drawn uniformly from `lengths`.
 */
export function poissonWorkload(o: PoissonWorkloadOptions): Arrival[] {
  checkCommon(o);
  if (!(Number.isFinite(o.rate) && o.rate > 0)) {
    throw new InvalidRequestError(`rate must be a positive number of requests/s, got ${o.rate}`);
  }
  if (o.lengths.length === 0) {
    throw new InvalidRequestError("poissonWorkload needs at least one length row");
  }
  const times = rng(streamSeed(o.seed, STREAM_TIMES));
  const pick = rng(streamSeed(o.seed, STREAM_LENGTHS));
  const feedback = rng(streamSeed(o.seed, STREAM_FEEDBACK));
  const meanGapMs = 1000 / o.rate;
  const endMs = o.durationS * 1000;
  const out: Arrival[] = [];
  // 1 − u lies in (0, 1], so the log is finite.
  for (
    let t = -Math.log(1 - times()) * meanGapMs;
    t < endMs;
    t += -Math.log(1 - times()) * meanGapMs
  ) {
    const row = o.lengths[Math.floor(pick() * o.lengths.length)];
    out.push({
      id: out.length,
      atMs: t,
      ...clampLengths(row, o),
      feedback: feedback() < o.retrainRate,
    });
  }
  return out;
}
