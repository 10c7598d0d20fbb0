/**
 * Converts llama2.c's tokenizer file (tokenizer.bin / tok512.bin) into a
 * Hugging Face tokenizer.json object: a Llama-style sentencepiece BPE with
 * byte fallback, built the way transformers' sentencepiece converter builds
 * one (vocab from the pieces, merges derived from the piece scores).
 *
 * File layout (little-endian), as llama2.c's tokenizer.py exports it:
 *   int32 max_token_length
 *   per token id 0..V-1:  f32 score, int32 length, `length` UTF-8 bytes
 * The token count is not stored: records run to the end of the file.
 * The exporter writes spaces for sentencepiece's "▁" and the control pieces
 * as "<unk>", "\n<s>\n", "\n</s>\n" (ids 0, 1, 2).
 */
import { ModelFormatError } from "../errors.ts";

/** tokenizer_config.json for a converted llama2.c tokenizer (Llama 2's settings). */
export const LLAMA2C_TOKENIZER_CONFIG = {
  tokenizer_class: "LlamaTokenizerFast",
  bos_token: "<s>",
  eos_token: "</s>",
  unk_token: "<unk>",
  add_bos_token: true,
  add_eos_token: false,
  legacy: true,
  clean_up_tokenization_spaces: false,
} as const;

/** sentencepiece's word-boundary marker (U+2581). */
const SPACE_MARK = "\u2581";

/** The control pieces llama2.c writes at ids 0..2, and their sentencepiece names. */
const CONTROL_PIECES = [
  { written: "<unk>", piece: "<unk>" },
  { written: "\n<s>\n", piece: "<s>" },
  { written: "\n</s>\n", piece: "</s>" },
];

const BYTE_PIECE = /^<0x[0-9A-F]{2}>$/;

interface Piece {
  piece: string;
  score: number;
}

/** Reads the raw records; `file` names the source in errors. */
function readPieces(bytes: Uint8Array, file: string): Piece[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const utf8 = new TextDecoder("utf-8", { fatal: true });
  if (bytes.byteLength < 4) {
    throw new ModelFormatError(file, "file is shorter than its 4-byte header");
  }
  const maxTokenLength = view.getInt32(0, true);
  if (maxTokenLength <= 0) {
    throw new ModelFormatError(file, `max_token_length must be positive, got ${maxTokenLength}`);
  }
  const pieces: Piece[] = [];
  let offset = 4;
  while (offset < bytes.byteLength) {
    const id = pieces.length;
    if (offset + 8 > bytes.byteLength) {
      throw new ModelFormatError(file, `token ${id}: record header truncated at byte ${offset}`);
    }
    const score = view.getFloat32(offset, true);
    const length = view.getInt32(offset + 4, true);
    offset += 8;
    if (length < 0 || length > maxTokenLength) {
      throw new ModelFormatError(
        file,
        `token ${id}: length ${length} outside [0, ${maxTokenLength}]`,
      );
    }
    if (offset + length > bytes.byteLength) {
      throw new ModelFormatError(file, `token ${id}: ${length} bytes run past the end of the file`);
    }
    if (!Number.isFinite(score)) throw new ModelFormatError(file, `token ${id}: score is ${score}`);
    let text: string;
    try {
      text = utf8.decode(bytes.subarray(offset, offset + length));
    } catch {
      throw new ModelFormatError(file, `token ${id}: bytes are not valid UTF-8`);
    }
    offset += length;
    pieces.push({ piece: text, score });
  }
  return pieces;
}

/** Written text -> sentencepiece piece: control pieces renamed, spaces back to "▁". */
function toSentencepiece(raw: Piece[], file: string): Piece[] {
  if (raw.length < CONTROL_PIECES.length) {
    throw new ModelFormatError(
      file,
      `only ${raw.length} tokens; expected <unk>, <s>, </s> at ids 0..2`,
    );
  }
  return raw.map(({ piece, score }, id) => {
    if (id < CONTROL_PIECES.length) {
      const expected = CONTROL_PIECES[id];
      if (piece !== expected.written) {
        throw new ModelFormatError(
          file,
          `token ${id} is ${JSON.stringify(piece)}; llama2.c tokenizers have ${
            JSON.stringify(expected.written)
          } there`,
        );
      }
      return { piece: expected.piece, score };
    }
    return { piece: piece.replaceAll(" ", SPACE_MARK), score };
  });
}

/**
 * BPE merges from sentencepiece scores, as transformers' SentencePieceExtractor
 * derives them: every split of a piece into two pieces is a merge; merges are
 * ranked by the merged piece's score (descending), ties keep piece order, and
 * the splits of one piece are ordered by (left id, right id).
 */
function mergesFromScores(pieces: Piece[], vocab: Map<string, number>): [string, string][] {
  const ranked: { left: string; right: string; score: number }[] = [];
  for (const { piece, score } of pieces) {
    // Split on code points, not UTF-16 units, as Python's string slicing does.
    const chars = Array.from(piece);
    const splits: { left: string; right: string; score: number }[] = [];
    for (let i = 1; i < chars.length; i++) {
      const left = chars.slice(0, i).join("");
      const right = chars.slice(i).join("");
      if (vocab.has(left) && vocab.has(right)) splits.push({ left, right, score });
    }
    splits.sort((a, b) =>
      vocab.get(a.left)! - vocab.get(b.left)! || vocab.get(a.right)! - vocab.get(b.right)!
    );
    ranked.push(...splits);
  }
  // Array.prototype.sort is stable, so equal scores keep their order.
  ranked.sort((a, b) => b.score - a.score);
  return ranked.map(({ left, right }) => [left, right]);
}

/** The tokenizer.json object for llama2.c tokenizer bytes; `file` names the source in errors. */
export function llama2cTokenizerJson(
  tokBin: Uint8Array,
  file = "tokenizer.bin",
): Record<string, unknown> {
  const pieces = toSentencepiece(readPieces(tokBin, file), file);

  const vocab = new Map<string, number>();
  pieces.forEach(({ piece }, id) => {
    if (vocab.has(piece)) {
      throw new ModelFormatError(
        file,
        `token ${id} repeats piece ${JSON.stringify(piece)} (first at id ${vocab.get(piece)})`,
      );
    }
    vocab.set(piece, id);
  });
  const byteTokens = pieces.filter(({ piece }) => BYTE_PIECE.test(piece)).length;

  // A null-prototype object, so a piece named "__proto__" stays an ordinary key.
  const vocabObject: Record<string, number> = Object.create(null);
  for (const [piece, id] of vocab) vocabObject[piece] = id;

  const addedTokens = CONTROL_PIECES.map(({ piece }, id) => ({
    id,
    content: piece,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));

  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    // Legacy Llama normalization: "▁" in front of the text, every space -> "▁".
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: SPACE_MARK },
        { type: "Replace", pattern: { String: " " }, content: SPACE_MARK },
      ],
    },
    pre_tokenizer: null,
    // BOS before each sequence (add_bos_token true, add_eos_token false).
    post_processor: {
      type: "TemplateProcessing",
      single: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
      ],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [vocab.get("<s>")], tokens: ["<s>"] } },
    },
    // "▁" -> " ", <0xNN> runs -> UTF-8 text, join, drop the one space the normalizer prepended.
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: SPACE_MARK }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      // Unknown characters become <0xNN> tokens only when all 256 exist.
      byte_fallback: byteTokens === 256,
      ignore_merges: false,
      vocab: vocabObject,
      merges: mergesFromScores(pieces, vocab),
    },
  };
}
