/**
 * Incremental detokenization for streaming: push ids one at a time and get the
 * text each one completes, such that the concatenation of every push() and the
 * final flush() equals tokenizer.decode(allIds, options).
 *
 * Decoding one token alone is wrong in general: a character may be split over
 * several byte-fallback tokens (<0xE6><0x97><0xA5> is "日"), decoders strip the
 * leading space of the first token only, and clean-up rules (" ." -> ".") act
 * across token boundaries. So each step decodes a short window of ids — the
 * last completed token run as context, then the pending ones — and emits what
 * the window's text gained over what was already emitted from it (the approach
 * of text-generation-inference's offsets).
 */
import type { Tokenizer } from "./tokenizer.ts";

/** U+FFFD: what a UTF-8 decoder yields for a byte sequence that is not finished yet. */
const REPLACEMENT = "\uFFFD";

/**
 * transformers' clean_up_tokenization rewrites these; each starts with a space,
 * so a text tail that begins at its last space and could still grow into one of
 * them may yet change, and is held back.
 */
const CLEANUP_PATTERNS = [" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"];

/** How many trailing characters of `text` a later token could still rewrite. */
function unstableTailLength(text: string): number {
  const lastSpace = text.lastIndexOf(" ");
  if (lastSpace < 0) return 0;
  const tail = text.slice(lastSpace);
  return CLEANUP_PATTERNS.some((p) => p.length > tail.length && p.startsWith(tail))
    ? tail.length
    : 0;
}

export class StreamDecoder {
  /** Ids decoded together each step: [context..., pending...]. */
  #window: number[] = [];
  /** How many leading ids of the window are context (already fully emitted). */
  #contextLength = 0;
  /** The prefix of decode(window) already emitted. */
  #emitted = "";

  constructor(
    private readonly tokenizer: Pick<Tokenizer, "decode">,
    private readonly options: { skipSpecialTokens?: boolean } = {},
  ) {}

  /**
   * Adds one id; returns the text it completes ("" while a character or clean-up rule is
   * unfinished).
   */
  push(id: number): string {
    this.#window.push(id);
    let text: string;
    try {
      text = this.tokenizer.decode(this.#window, this.options);
    } catch (e) {
      this.#window.pop(); // a rejected id (out of vocabulary) leaves the stream as it was
      throw e;
    }
    if (text.endsWith(REPLACEMENT)) return "";
    const stableEnd = text.length - unstableTailLength(text);
    const out = this.#take(text, stableEnd);
    if (stableEnd === text.length) this.#advanceContext();
    return out;
  }

  /** Returns whatever is still held back and starts a new stream. */
  flush(): string {
    const text = this.#window.length === 0 ? "" : this.tokenizer.decode(this.#window, this.options);
    const out = this.#take(text, text.length);
    this.#window = [];
    this.#contextLength = 0;
    this.#emitted = "";
    return out;
  }

  /**
   * Emits text[emitted.length, end) after checking the window's text still extends what was
   * emitted.
   */
  #take(text: string, end: number): string {
    if (!text.startsWith(this.#emitted)) {
      throw new Error(
        `StreamDecoder: the tokenizer's decode is not prefix-stable: ` +
          `${JSON.stringify(this.#emitted)} was emitted but the text is now ${
            JSON.stringify(text)
          }`,
      );
    }
    if (end <= this.#emitted.length) return "";
    const out = text.slice(this.#emitted.length, end);
    this.#emitted = text.slice(0, end);
    return out;
  }

  /**
   * Everything in the window is emitted: the ids after the old context become
   * the new context, so the window stays a few tokens long. Only when that run
   * decodes to some text: an empty context (a skipped special token) would make
   * the next token "first" and lose the leading space decoders strip there.
   */
  #advanceContext(): void {
    const run = this.#window.slice(this.#contextLength);
    const runText = this.tokenizer.decode(run, this.options);
    if (runText.length === 0) return;
    this.#window = run;
    this.#contextLength = run.length;
    this.#emitted = runText;
  }
}
