/**
 * Preference pairs to token ids, as TRL's DPOTrainer prepares them.
 *
 * Text: a conversational pair on a tokenizer with a chat template renders the prompt with
 * add_generation_prompt=true, and each response as the rendered prompt+response conversation
 * minus the rendered prompt at its start. A plain-text pair is used as it is.
 *
 * Tokens: prompt = BOS (when the tokenizer adds one and the text does not already start with
 * it) + prompt tokens; response = its tokens without special tokens, as they follow the prompt
 * in the whole text, + EOS (unless the template already ended it with EOS). The prompt keeps its
 * last maxPromptLength tokens (BOS stays first); each response keeps its first maxLength − prompt
 * tokens (its EOS is lost when cut).
 */
import { Template } from "@huggingface/jinja";
import { InvalidRequestError, ModelFormatError } from "../errors.ts";
import type { Tokenizer } from "../tokenizer/tokenizer.ts";
import type { ChatMessage, PreferencePair, SkippedPair } from "./preferences.ts";

export interface TokenizedPair {
  line: number;
  /** Prompt ids, BOS first when the tokenizer uses one. */
  prompt: number[];
  /** Response ids, ending with EOS unless truncated. */
  chosen: number[];
  rejected: number[];
}

export interface TokenizePairsOptions {
  /** Most tokens of prompt + one response. */
  maxLength: number;
  /** Most prompt tokens; longer prompts keep their end. */
  maxPromptLength: number;
}

/** What tokenizing needs from a tokenizer, derived once per tokenizer. */
interface Prepared {
  template: Template | null;
  bosText: string;
  eosText: string;
  /** BOS to put first in every prompt, or null when the tokenizer adds none (Qwen2). */
  bos: number | null;
  eos: number;
}

const prepared = new WeakMap<Tokenizer, Prepared>();

function prepare(tokenizer: Tokenizer): Prepared {
  const cached = prepared.get(tokenizer);
  if (cached) return cached;
  if (tokenizer.eosIds.length === 0) {
    throw new InvalidRequestError(
      "the tokenizer has no eos_token, so DPO responses cannot be terminated; " +
        "set eos_token in tokenizer_config.json",
    );
  }
  let template: Template | null = null;
  if (tokenizer.chatTemplate !== null) {
    try {
      template = new Template(tokenizer.chatTemplate);
    } catch (e) {
      throw new ModelFormatError(
        "chat_template",
        `cannot parse the tokenizer's chat template: ${(e as Error).message}`,
      );
    }
  }
  const { bosId } = tokenizer;
  const eos = tokenizer.eosIds[0];
  // The tokenizer "adds BOS" when its special tokens for an empty text start with BOS.
  const addsBos = bosId !== null && tokenizer.encode("", { addSpecialTokens: true })[0] === bosId;
  const p: Prepared = {
    template,
    bosText: bosId === null ? "" : tokenizer.decode([bosId]),
    eosText: tokenizer.decode([eos]),
    bos: addsBos ? bosId : null,
    eos,
  };
  prepared.set(tokenizer, p);
  return p;
}

function checkOptions({ maxLength, maxPromptLength }: TokenizePairsOptions) {
  for (
    const [name, v] of [["maxLength", maxLength], ["maxPromptLength", maxPromptLength]] as const
  ) {
    if (!Number.isInteger(v) || v <= 0) {
      throw new InvalidRequestError(`${name} must be a positive integer, got ${v}`);
    }
  }
}

/** The pair's prompt and response texts, or why they cannot be made. */
function pairTexts(
  p: Prepared,
  pair: PreferencePair,
): { prompt: string; chosen: string; rejected: string } | string {
  const plain = (messages: ChatMessage[]) => messages.map((m) => m.content).join("");
  if (!pair.isChat) {
    return {
      prompt: plain(pair.prompt),
      chosen: plain(pair.chosen),
      rejected: plain(pair.rejected),
    };
  }
  const template = p.template;
  if (template === null) {
    return "a conversational pair needs a chat template and the tokenizer has none; use a " +
      "plain-text dataset (hh, or ultrafeedback with string fields) or a model with a " +
      "chat_template";
  }
  const render = (messages: ChatMessage[], addGenerationPrompt: boolean) =>
    template.render({
      messages,
      add_generation_prompt: addGenerationPrompt,
      bos_token: p.bosText,
      eos_token: p.eosText,
    });
  try {
    const prompt = render(pair.prompt, true);
    const texts = { prompt, chosen: "", rejected: "" };
    for (const name of ["chosen", "rejected"] as const) {
      const full = render([...pair.prompt, ...pair[name]], false);
      if (!full.startsWith(prompt)) {
        return `the chat template renders prompt + ${name} without the rendered prompt at its ` +
          `start ` +
          "(the template changes earlier turns, or its generation prompt differs from the " +
          "assistant turn), so the response cannot be split off";
      }
      texts[name] = full.slice(prompt.length);
    }
    return texts;
  } catch (e) {
    return `the chat template failed: ${(e as Error).message}`;
  }
}

/**
 * A response's ids as they follow the prompt in the whole text (TRL's legacy
 * build_tokenized_answer): a SentencePiece-style tokenizer (Llama's "▁" prefix) would give a
 * response tokenized alone a word-start space it never has after the prompt. Only when tokens
 * merge across the boundary (the prompt's ids are not a prefix of the whole text's) is the
 * response tokenized alone, as current TRL always does.
 */
function responseIds(
  tokenizer: Tokenizer,
  promptText: string,
  promptIds: number[],
  responseText: string,
): number[] {
  const full = tokenizer.encode(promptText + responseText, { addSpecialTokens: false });
  if (promptIds.every((id, i) => full[i] === id)) return full.slice(promptIds.length);
  return tokenizer.encode(responseText, { addSpecialTokens: false });
}

/** Tokenizes one pair, or says why it is skipped. */
export function tokenizePair(
  tokenizer: Tokenizer,
  pair: PreferencePair,
  opts: TokenizePairsOptions,
): TokenizedPair | SkippedPair {
  checkOptions(opts);
  const p = prepare(tokenizer);
  const { line } = pair;
  const texts = pairTexts(p, pair);
  if (typeof texts === "string") return { line, reason: texts };

  const promptIds = tokenizer.encode(texts.prompt, { addSpecialTokens: false });
  let prompt = [...promptIds];
  const bos = p.bos === null ? [] : [p.bos];
  // A template that writes bos_token itself already produced the BOS: never add a second.
  if (p.bos !== null && prompt[0] !== p.bos) prompt.unshift(p.bos);
  if (prompt.length > opts.maxPromptLength) {
    // Keep the end of the prompt (the turn being answered), and BOS in front of it.
    prompt = [...bos, ...prompt.slice(prompt.length - (opts.maxPromptLength - bos.length))];
  }
  if (prompt.length === 0) return { line, reason: "the prompt tokenizes to no tokens" };
  const room = opts.maxLength - prompt.length;
  if (room < 1) {
    return {
      line,
      reason: `over-length: prompt has ${prompt.length} tokens, max_length ${opts.maxLength}`,
    };
  }

  const responses = { chosen: [] as number[], rejected: [] as number[] };
  for (const name of ["chosen", "rejected"] as const) {
    const ids = responseIds(tokenizer, texts.prompt, promptIds, texts[name]);
    if (ids.length === 0) return { line, reason: `the ${name} response tokenizes to no tokens` };
    if (!tokenizer.eosIds.includes(ids[ids.length - 1])) ids.push(p.eos);
    responses[name] = ids.slice(0, room);
  }
  return { line, prompt, ...responses };
}

/** Tokenizes pairs; the ones that cannot be tokenized come back as skipped, with reasons. */
export function tokenizePairs(
  tokenizer: Tokenizer,
  pairs: PreferencePair[],
  opts: TokenizePairsOptions,
): { pairs: TokenizedPair[]; skipped: SkippedPair[] } {
  const out: TokenizedPair[] = [];
  const skipped: SkippedPair[] = [];
  for (const pair of pairs) {
    const r = tokenizePair(tokenizer, pair, opts);
    if ("reason" in r) skipped.push(r);
    else out.push(r);
  }
  return { pairs: out, skipped };
}
