/**
 * Preference pairs (prompt, chosen, rejected) for DPO, read from the dataset formats in use:
 *
 * - hh: Anthropic HH-RLHF, `chosen` / `rejected` are whole transcripts
 *   ("\n\nHuman: … \n\nAssistant: …"); the prompt is their shared prefix up to the last
 *   "\n\nAssistant:" in it.
 * - ultrafeedback: `prompt`, `chosen`, `rejected`; each a string or a message list
 *   [{role, content}] (a response list may repeat the prompt turns before the answer).
 * - chat: the chat preference format, `input.messages`, `preferred_output`,
 *   `non_preferred_output` (message lists).
 * - llamafactory: LLaMA-Factory's sharegpt DPO demo, `conversations` [{from, value}] with
 *   `chosen` / `rejected` {from, value}; or its v1 form, `chosen_messages` /
 *   `rejected_messages` (whole conversations, content as [{type: "text", value}]).
 *
 * Files are JSONL, gzipped JSONL, or one JSON array. A bad record never aborts a file: it
 * becomes a SkippedPair with its 1-based line (JSONL) or record index (JSON array).
 */
import { DatasetFormatError, InvalidRequestError } from "../errors.ts";
import { pathKind, readFileBytes } from "../model/byte_source.ts";

export type PreferenceFormat = "auto" | "hh" | "ultrafeedback" | "chat" | "llamafactory";
type KnownFormat = Exclude<PreferenceFormat, "auto">;

export type ChatRole = "system" | "user" | "assistant" | "tool";
const ROLES: readonly ChatRole[] = ["system", "user", "assistant", "tool"];

export interface ChatMessage {
  role: ChatRole;
  content: string;
}

/**
 * One pair. A conversational record (isChat) keeps its messages for the chat template. A
 * plain-text record has one user message (the prompt text, verbatim) and one assistant
 * message per response (verbatim, e.g. HH's leading space kept); it is used as text, never
 * templated, as TRL does with its "standard" (non-conversational) format.
 */
export interface PreferencePair {
  line: number;
  prompt: ChatMessage[];
  chosen: ChatMessage[];
  rejected: ChatMessage[];
  isChat: boolean;
}

export interface SkippedPair {
  line: number;
  reason: string;
}

/** A record that cannot become a pair; `message` is the SkippedPair reason. */
class BadRecord extends Error {}

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function typeName(v: unknown): string {
  return v === null ? "null" : Array.isArray(v) ? "a list" : typeof v;
}

function field(rec: Json, key: string, where = ""): unknown {
  if (!(key in rec) || rec[key] === undefined) {
    throw new BadRecord(`missing field "${where}${key}"`);
  }
  return rec[key];
}

/** Message content: a string, or a list of text parts [{type: "text", text | value}]. */
function contentOf(v: unknown, where: string): string {
  if (typeof v === "string") return v;
  if (Array.isArray(v)) {
    return v.map((part, i) => {
      if (!isObject(part) || part.type !== "text") {
        throw new BadRecord(
          `${where}.content[${i}] must be a text part {type: "text", text}, got ${
            isObject(part) ? `type ${JSON.stringify(part.type)}` : typeName(part)
          }`,
        );
      }
      const text = part.text ?? part.value;
      if (typeof text !== "string") {
        throw new BadRecord(`${where}.content[${i}] has no "text" (or "value") string`);
      }
      return text;
    }).join("");
  }
  throw new BadRecord(
    `${where}.content must be a string or a list of text parts, got ${typeName(v)}`,
  );
}

function roleOf(v: unknown, where: string): ChatRole {
  if (typeof v === "string" && (ROLES as readonly string[]).includes(v)) return v as ChatRole;
  throw new BadRecord(`${where}.role must be one of ${ROLES.join(", ")}, got ${JSON.stringify(v)}`);
}

/** A list of {role, content} messages. */
function messagesOf(v: unknown, where: string): ChatMessage[] {
  if (!Array.isArray(v)) {
    throw new BadRecord(`"${where}" must be a list of messages, got ${typeName(v)}`);
  }
  return v.map((m, i) => {
    const at = `${where}[${i}]`;
    if (!isObject(m)) {
      throw new BadRecord(`${at} must be a {role, content} object, got ${typeName(m)}`);
    }
    return { role: roleOf(m.role, at), content: contentOf(m.content, at) };
  });
}

/** LLaMA-Factory sharegpt tags; tool calls ("function_call", "observation") are not supported. */
const SHAREGPT_ROLES: Record<string, ChatRole> = {
  human: "user",
  gpt: "assistant",
  system: "system",
};

function sharegptMessage(v: unknown, where: string): ChatMessage {
  if (!isObject(v)) {
    throw new BadRecord(`"${where}" must be a {from, value} object, got ${typeName(v)}`);
  }
  const role = typeof v.from === "string" ? SHAREGPT_ROLES[v.from] : undefined;
  if (role === undefined) {
    throw new BadRecord(
      `${where}.from must be one of ${Object.keys(SHAREGPT_ROLES).join(", ")}, got ${
        JSON.stringify(v.from)
      }`,
    );
  }
  if (typeof v.value !== "string") {
    throw new BadRecord(`${where}.value must be a string, got ${typeName(v.value)}`);
  }
  return { role, content: v.value };
}

/** A prompt or response as the record gives it: plain text or messages. */
type Part = string | ChatMessage[];

function textOrMessages(rec: Json, key: string): Part {
  const v = field(rec, key);
  if (typeof v === "string") return v;
  if (Array.isArray(v)) return messagesOf(v, key);
  throw new BadRecord(`field "${key}" must be a string or a list of messages, got ${typeName(v)}`);
}

/** The record's parts; prompt null = implicit (shared prefix of chosen and rejected). */
interface RawPair {
  prompt: Part | null;
  chosen: Part;
  rejected: Part;
}

const EXTRACT: Record<KnownFormat, (rec: Json) => RawPair> = {
  hh: (rec) => ({
    prompt: null,
    chosen: textOrMessages(rec, "chosen"),
    rejected: textOrMessages(rec, "rejected"),
  }),
  ultrafeedback: (rec) => ({
    prompt: textOrMessages(rec, "prompt"),
    chosen: textOrMessages(rec, "chosen"),
    rejected: textOrMessages(rec, "rejected"),
  }),
  chat: (rec) => {
    const input = field(rec, "input");
    if (!isObject(input)) {
      throw new BadRecord(`field "input" must be an object, got ${typeName(input)}`);
    }
    return {
      prompt: messagesOf(field(input, "messages", "input."), "input.messages"),
      chosen: textOrMessages(rec, "preferred_output"),
      rejected: textOrMessages(rec, "non_preferred_output"),
    };
  },
  llamafactory: (rec) => {
    if ("chosen_messages" in rec || "rejected_messages" in rec) {
      return {
        prompt: null,
        chosen: messagesOf(field(rec, "chosen_messages"), "chosen_messages"),
        rejected: messagesOf(field(rec, "rejected_messages"), "rejected_messages"),
      };
    }
    const turns = field(rec, "conversations");
    if (!Array.isArray(turns)) {
      throw new BadRecord(
        `field "conversations" must be a list of {from, value}, got ${typeName(turns)}`,
      );
    }
    const prompt = turns.map((t, i) => sharegptMessage(t, `conversations[${i}]`));
    // sharegpt may carry the system prompt as a separate string field.
    if (typeof rec.system === "string" && rec.system !== "") {
      prompt.unshift({ role: "system", content: rec.system });
    }
    return {
      prompt,
      chosen: [sharegptMessage(field(rec, "chosen"), "chosen")],
      rejected: [sharegptMessage(field(rec, "rejected"), "rejected")],
    };
  },
};

/** The format a record's keys announce, or null. */
function detectFormat(rec: Json): KnownFormat | null {
  const has = (...keys: string[]) => keys.every((k) => k in rec);
  if (has("input", "preferred_output", "non_preferred_output")) return "chat";
  if (has("conversations", "chosen", "rejected") || has("chosen_messages", "rejected_messages")) {
    return "llamafactory";
  }
  if (has("prompt", "chosen", "rejected")) return "ultrafeedback";
  if (has("chosen", "rejected")) return "hh";
  return null;
}

const HH_ASSISTANT = "\n\nAssistant:";

/**
 * HH: the prompt is the longest common prefix of the transcripts, cut back to just after
 * its last "\n\nAssistant:", so that responses starting with the same words stay whole.
 */
function splitTranscripts(chosen: string, rejected: string): [string, string, string] {
  if (chosen === rejected) throw new BadRecord("chosen and rejected are identical");
  let n = 0;
  const max = Math.min(chosen.length, rejected.length);
  while (n < max && chosen.charCodeAt(n) === rejected.charCodeAt(n)) n++;
  // The marker must lie wholly inside the shared prefix [0, n).
  const cut = n < HH_ASSISTANT.length
    ? -1
    : chosen.lastIndexOf(HH_ASSISTANT, n - HH_ASSISTANT.length);
  if (cut < 0) {
    throw new BadRecord(
      `chosen and rejected share no "\\n\\nAssistant:" turn, so the prompt cannot be found ` +
        `(they differ from character ${n})`,
    );
  }
  const end = cut + HH_ASSISTANT.length;
  return [chosen.slice(0, end), chosen.slice(end), rejected.slice(end)];
}

function sameMessage(a: ChatMessage, b: ChatMessage): boolean {
  return a.role === b.role && a.content === b.content;
}

/** `messages` without `prefix` at its start (a response list that repeats the prompt turns). */
function withoutPrefix(messages: ChatMessage[], prefix: ChatMessage[]): ChatMessage[] {
  const repeats = prefix.length < messages.length &&
    prefix.every((m, i) => sameMessage(m, messages[i]));
  return repeats ? messages.slice(prefix.length) : messages;
}

const isBlank = (messages: ChatMessage[]) => messages.every((m) => m.content.trim() === "");

/** Builds and checks a pair from the record's parts. */
function toPair(line: number, raw: RawPair): PreferencePair {
  const user = (content: string): ChatMessage[] => [{ role: "user", content }];
  const assistant = (content: string): ChatMessage[] => [{ role: "assistant", content }];
  let pair: PreferencePair;
  if (typeof raw.chosen === "string" && typeof raw.rejected === "string") {
    if (raw.prompt === null) {
      const [prompt, chosen, rejected] = splitTranscripts(raw.chosen, raw.rejected);
      pair = {
        line,
        prompt: user(prompt),
        chosen: assistant(chosen),
        rejected: assistant(rejected),
        isChat: false,
      };
    } else {
      const isChat = typeof raw.prompt !== "string";
      const prompt = typeof raw.prompt === "string" ? user(raw.prompt) : raw.prompt;
      pair = {
        line,
        prompt,
        chosen: assistant(raw.chosen),
        rejected: assistant(raw.rejected),
        isChat,
      };
    }
  } else if (Array.isArray(raw.chosen) && Array.isArray(raw.rejected)) {
    let prompt: ChatMessage[];
    let chosen = raw.chosen, rejected = raw.rejected;
    if (raw.prompt === null) {
      let k = 0;
      while (k < chosen.length && k < rejected.length && sameMessage(chosen[k], rejected[k])) k++;
      prompt = chosen.slice(0, k);
      chosen = chosen.slice(k);
      rejected = rejected.slice(k);
    } else {
      prompt = typeof raw.prompt === "string" ? user(raw.prompt) : raw.prompt;
      chosen = withoutPrefix(chosen, prompt);
      rejected = withoutPrefix(rejected, prompt);
    }
    pair = { line, prompt, chosen, rejected, isChat: true };
  } else {
    throw new BadRecord(
      `chosen and rejected must both be strings or both be message lists, got ${
        typeName(raw.chosen)
      } and ${typeName(raw.rejected)}`,
    );
  }
  checkPair(pair);
  return pair;
}

function checkPair(pair: PreferencePair) {
  if (pair.prompt.length === 0 || isBlank(pair.prompt)) throw new BadRecord("empty prompt");
  if (pair.isChat && pair.prompt[pair.prompt.length - 1].role === "assistant") {
    throw new BadRecord(
      "the prompt ends with an assistant message; it must end with the turn the responses answer",
    );
  }
  for (const name of ["chosen", "rejected"] as const) {
    const response = pair[name];
    if (response.length === 0 || isBlank(response)) throw new BadRecord(`empty ${name} response`);
    const last = response[response.length - 1];
    if (last.role !== "assistant") {
      throw new BadRecord(
        `the ${name} response must end with an assistant message, got role "${last.role}"`,
      );
    }
  }
  const { chosen, rejected } = pair;
  if (chosen.length === rejected.length && chosen.every((m, i) => sameMessage(m, rejected[i]))) {
    throw new BadRecord("chosen and rejected responses are identical");
  }
}

/** A decoded record (or why it could not be decoded) with its 1-based line or index. */
type RawRecord = { line: number; value: unknown } | SkippedPair;

async function gunzip(bytes: Uint8Array, file: string): Promise<Uint8Array> {
  try {
    // readFileBytes gives a plain ArrayBuffer-backed array.
    const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
      new DecompressionStream("gzip"),
    );
    return new Uint8Array(await new Response(stream).arrayBuffer());
  } catch (e) {
    throw new DatasetFormatError(file, `not a valid gzip file (${(e as Error).message})`);
  }
}

/** JSONL: one record per line; each line decoded on its own so one bad line costs one record. */
function jsonlRecords(bytes: Uint8Array): RawRecord[] {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const records: RawRecord[] = [];
  let start = 0;
  for (let line = 1; start < bytes.length; line++) {
    let end = bytes.indexOf(0x0a, start);
    if (end < 0) end = bytes.length;
    const lineBytes = bytes.subarray(start, end);
    start = end + 1;
    let text: string;
    try {
      text = decoder.decode(lineBytes);
    } catch {
      records.push({ line, reason: "invalid UTF-8" });
      continue;
    }
    if (text.trim() === "") continue; // blank lines separate nothing
    try {
      records.push({ line, value: JSON.parse(text) });
    } catch (e) {
      records.push({ line, reason: `invalid JSON (${(e as Error).message})` });
    }
  }
  return records;
}

/** A JSON array file: the records are its elements (index from 1). */
function arrayRecords(bytes: Uint8Array, file: string): RawRecord[] {
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new DatasetFormatError(
      file,
      `not a valid JSON array (${(e as Error).message}); a broken .json file cannot be read ` +
        "record by record, so fix it or convert it to JSONL (one record per line)",
    );
  }
  if (!Array.isArray(value)) {
    throw new DatasetFormatError(
      file,
      `a JSON dataset must be an array of records, got ${typeName(value)}`,
    );
  }
  return value.map((v, i) => ({ line: i + 1, value: v }));
}

async function readRecords(path: string): Promise<RawRecord[]> {
  const kind = await pathKind(path);
  if (kind === null) throw new DatasetFormatError(path, "file not found");
  if (kind !== "file") throw new DatasetFormatError(path, "is not a file");
  let bytes = await readFileBytes(path);
  if (bytes[0] === 0x1f && bytes[1] === 0x8b) bytes = await gunzip(bytes, path);
  let first = bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf ? 3 : 0; // UTF-8 BOM
  while (first < bytes.length && [0x20, 0x09, 0x0a, 0x0d].includes(bytes[first])) first++;
  if (bytes[first] === 0x5b /* [ */) return arrayRecords(bytes, path);
  if (/\.json(\.gz)?$/.test(path)) {
    throw new DatasetFormatError(
      path,
      "a .json dataset must be an array of records (or name it .jsonl)",
    );
  }
  return jsonlRecords(bytes);
}

/**
 * Reads the preference pairs of a dataset file. `auto` takes the format from the first
 * record whose keys name one and uses it for the rest of the file. Throws DatasetFormatError
 * only when the file as a whole is unreadable (missing, bad gzip, broken JSON array); a file
 * without one valid record returns no pairs, and the caller reports it.
 */
export async function readPreferencePairs(
  path: string,
  format: PreferenceFormat,
): Promise<{ pairs: PreferencePair[]; skipped: SkippedPair[] }> {
  if (format !== "auto" && !Object.hasOwn(EXTRACT, format)) {
    throw new InvalidRequestError(
      `unknown preference format ${JSON.stringify(format)}; use auto, ${
        Object.keys(EXTRACT).join(", ")
      }`,
    );
  }
  const pairs: PreferencePair[] = [];
  const skipped: SkippedPair[] = [];
  let known: KnownFormat | null = format === "auto" ? null : format;
  for (const record of await readRecords(path)) {
    if ("reason" in record) {
      skipped.push(record);
      continue;
    }
    const { line, value } = record;
    if (!isObject(value)) {
      skipped.push({ line, reason: `record must be a JSON object, got ${typeName(value)}` });
      continue;
    }
    known ??= detectFormat(value);
    if (known === null) {
      skipped.push({
        line,
        reason:
          `unknown record keys [${
            Object.keys(value).join(", ")
          }]; expected hh (chosen, rejected), ` +
          "ultrafeedback (prompt, chosen, rejected), chat (input, preferred_output, " +
          "non_preferred_output) or llamafactory (conversations, chosen, rejected)",
      });
      continue;
    }
    try {
      pairs.push(toPair(line, EXTRACT[known](value)));
    } catch (e) {
      if (!(e instanceof BadRecord)) throw e;
      skipped.push({ line, reason: e.message });
    }
  }
  return { pairs, skipped };
}
