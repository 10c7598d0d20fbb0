/**
 * Reads `generate --prompts FILE.jsonl`: one JSON object per line,
 * {"prompt": string, "max_tokens"?: int >= 1, "seed"?: int >= 0, "temperature"?: number >= 0,
 *  "top_k"?: int >= 0, "top_p"?: (0, 1]}. Blank lines are skipped. Any bad line is an
 * InvalidRequestError naming the file, the line and the field.
 */
import { InvalidRequestError } from "../../engine/errors.ts";

export interface PromptLine {
  prompt: string;
  maxTokens?: number;
  seed?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
}

const FIELDS: Record<string, [keyof PromptLine, (v: unknown) => boolean, string]> = {
  prompt: ["prompt", (v) => typeof v === "string", "a string"],
  max_tokens: ["maxTokens", (v) => Number.isInteger(v) && (v as number) >= 1, "an integer >= 1"],
  seed: ["seed", (v) => Number.isInteger(v) && (v as number) >= 0, "an integer >= 0"],
  temperature: ["temperature", (v) => typeof v === "number" && v >= 0, "a number >= 0"],
  top_k: ["topK", (v) => Number.isInteger(v) && (v as number) >= 0, "an integer >= 0"],
  top_p: ["topP", (v) => typeof v === "number" && v > 0 && v <= 1, "a number in (0, 1]"],
};

export function parsePromptsFile(text: string, file: string): PromptLine[] {
  const lines: PromptLine[] = [];
  text.split("\n").forEach((raw, i) => {
    const where = `${file}:${i + 1}`;
    if (raw.trim() === "") return;
    let value: unknown;
    try {
      value = JSON.parse(raw);
    } catch (e) {
      throw new InvalidRequestError(`${where}: not valid JSON (${(e as Error).message})`);
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new InvalidRequestError(`${where}: expected a JSON object with a "prompt" field`);
    }
    const line: Record<string, unknown> = {};
    for (const [key, v] of Object.entries(value)) {
      const field = FIELDS[key];
      if (!field) {
        throw new InvalidRequestError(
          `${where}: unknown field "${key}" (expected ${Object.keys(FIELDS).join(", ")})`,
        );
      }
      if (!field[1](v)) throw new InvalidRequestError(`${where}: "${key}" must be ${field[2]}`);
      line[field[0]] = v;
    }
    if (line.prompt === undefined) throw new InvalidRequestError(`${where}: missing "prompt"`);
    lines.push(line as unknown as PromptLine);
  });
  if (lines.length === 0) throw new InvalidRequestError(`${file}: no prompts`);
  return lines;
}
