/**
 * The engine's tokenizer: Hugging Face tokenizer.json + tokenizer_config.json
 * run by @huggingface/tokenizers, behind a small interface that speaks token
 * ids. llama2.c tokenizer files are converted to the same form first.
 */
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { InvalidRequestError, ModelFormatError } from "../errors.ts";
import { dirModelFiles, type ModelFiles, readFileBytes } from "../model/byte_source.ts";
import { LLAMA2C_TOKENIZER_CONFIG, llama2cTokenizerJson } from "./llama2c_tokenizer.ts";

export interface Tokenizer {
  /** One past the largest token id the tokenizer knows (model vocab + added tokens). */
  readonly vocabSize: number;
  /** The BOS token's id, or null when the tokenizer has none (Qwen2). */
  readonly bosId: number | null;
  /** Ids that end generation: tokenizer_config's eos_token. */
  readonly eosIds: number[];
  /**
   * addSpecialTokens (default true) adds BOS/EOS as tokenizer_config says (add_bos_token,
   * add_eos_token).
   */
  encode(text: string, options?: { addSpecialTokens?: boolean }): number[];
  /** skipSpecialTokens (default false) drops special tokens such as BOS/EOS from the text. */
  decode(ids: number[], options?: { skipSpecialTokens?: boolean }): string;
  /** The Jinja chat template (tokenizer_config.json or chat_template.jinja), or null. */
  readonly chatTemplate: string | null;
}

/** File names used in error messages. */
export interface TokenizerFileNames {
  tokenizer: string;
  config: string;
}

const DEFAULT_NAMES: TokenizerFileNames = {
  tokenizer: "tokenizer.json",
  config: "tokenizer_config.json",
};

type Json = Record<string, unknown>;

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** A special-token entry of tokenizer_config: a string, an AddedToken object {content}, or null. */
function tokenContent(v: unknown, key: string, file: string): string | null {
  if (v === null || v === undefined) return null;
  if (typeof v === "string") return v;
  if (isObject(v) && typeof v.content === "string") return v.content;
  throw new ModelFormatError(
    file,
    `${key} must be a string, an object with "content", or null; got ${JSON.stringify(v)}`,
  );
}

/** An optional boolean flag of tokenizer_config. */
function flag(config: Json, key: string, file: string): boolean | undefined {
  const v = config[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "boolean") {
    throw new ModelFormatError(file, `${key} must be true or false, got ${JSON.stringify(v)}`);
  }
  return v;
}

/**
 * chat_template as tokenizer_config writes it: a string, or a list of
 * {name, template} of which transformers uses the one named "default".
 */
function chatTemplateOf(v: unknown, file: string): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v === "string") return v;
  if (Array.isArray(v)) {
    const named = v.find((t) => isObject(t) && t.name === "default");
    if (named === undefined) return null;
    if (typeof named.template !== "string") {
      throw new ModelFormatError(file, 'chat_template "default" has no template string');
    }
    return named.template;
  }
  throw new ModelFormatError(file, `chat_template must be a string or a list of {name, template}`);
}

class HfBackedTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosIds: number[];
  readonly chatTemplate: string | null;
  /**
   * BOS/EOS to add ourselves when tokenizer_config sets add_bos_token /
   * add_eos_token (they override tokenizer.json's post-processor, as in
   * transformers); null: let tokenizer.json's post-processor decide.
   */
  readonly #added: { bos: number | null; eos: number | null } | null;

  constructor(
    private readonly hf: HfTokenizer,
    config: Json,
    names: TokenizerFileNames,
    chatTemplate: string | null,
  ) {
    let maxId = -1;
    for (const id of hf.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;

    const idOf = (key: string): number | null => {
      const content = tokenContent(config[key], key, names.config);
      if (content === null) return null;
      const id = hf.token_to_id(content);
      if (id === undefined) {
        throw new ModelFormatError(
          names.config,
          `${key} ${JSON.stringify(content)} is not in ${names.tokenizer}`,
        );
      }
      return id;
    };
    this.bosId = idOf("bos_token");
    const eos = idOf("eos_token");
    this.eosIds = eos === null ? [] : [eos];
    this.chatTemplate = chatTemplate ?? chatTemplateOf(config.chat_template, names.config);

    const addBos = flag(config, "add_bos_token", names.config);
    const addEos = flag(config, "add_eos_token", names.config);
    if (addBos === undefined && addEos === undefined) {
      this.#added = null;
    } else {
      if (addBos && this.bosId === null) {
        throw new ModelFormatError(names.config, "add_bos_token is true but bos_token is not set");
      }
      if (addEos && eos === null) {
        throw new ModelFormatError(names.config, "add_eos_token is true but eos_token is not set");
      }
      this.#added = { bos: addBos ? this.bosId : null, eos: addEos ? eos : null };
    }
  }

  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    const addSpecial = options.addSpecialTokens ?? true;
    if (this.#added === null) return this.hf.encode(text, { add_special_tokens: addSpecial }).ids;
    const ids = this.hf.encode(text, { add_special_tokens: false }).ids;
    if (!addSpecial) return ids;
    const { bos, eos } = this.#added;
    return [...(bos === null ? [] : [bos]), ...ids, ...(eos === null ? [] : [eos])];
  }

  decode(ids: number[], options: { skipSpecialTokens?: boolean } = {}): string {
    for (const id of ids) {
      if (
        !Number.isInteger(id) || id < 0 || id >= this.vocabSize ||
        this.hf.id_to_token(id) === undefined
      ) {
        throw new InvalidRequestError(
          `token id ${id} is not in the tokenizer's vocabulary (size ${this.vocabSize})`,
        );
      }
    }
    // The library refuses an empty list; its text is "".
    if (ids.length === 0) return "";
    return this.hf.decode(ids, { skip_special_tokens: options.skipSpecialTokens ?? false });
  }
}

/**
 * A tokenizer from parsed tokenizer.json and tokenizer_config.json objects.
 * `chatTemplate` (from a separate chat_template.jinja) overrides the config's.
 */
export function tokenizerFromJson(
  tokenizerJson: object,
  tokenizerConfig: object,
  names: TokenizerFileNames = DEFAULT_NAMES,
  chatTemplate: string | null = null,
): Tokenizer {
  if (!isObject(tokenizerJson)) {
    throw new ModelFormatError(names.tokenizer, "must be a JSON object");
  }
  if (!isObject(tokenizerConfig)) throw new ModelFormatError(names.config, "must be a JSON object");
  if (!isObject(tokenizerJson.model)) {
    throw new ModelFormatError(names.tokenizer, 'has no "model" object');
  }
  let hf: HfTokenizer;
  try {
    // The library wants every top-level component key present (null when unused).
    const complete = {
      normalizer: null,
      pre_tokenizer: null,
      post_processor: null,
      decoder: null,
      added_tokens: [],
      ...tokenizerJson,
    };
    hf = new HfTokenizer(complete, tokenizerConfig);
  } catch (e) {
    throw new ModelFormatError(
      names.tokenizer,
      `cannot build the tokenizer: ${(e as Error).message}`,
    );
  }
  return new HfBackedTokenizer(hf, tokenizerConfig, names, chatTemplate);
}

function parseJson(text: string, file: string): object {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ModelFormatError(file, `not valid JSON: ${(e as Error).message}`);
  }
}

/**
 * A tokenizer from a model folder's files: tokenizer.json (required),
 * tokenizer_config.json (optional, as in transformers) and chat_template.jinja
 * (optional; newer checkpoints keep the template there).
 */
export async function loadTokenizerFiles(files: ModelFiles): Promise<Tokenizer> {
  const names = {
    tokenizer: files.path("tokenizer.json"),
    config: files.path("tokenizer_config.json"),
  };
  const tokenizerText = await files.readText("tokenizer.json");
  if (tokenizerText === null) {
    throw new ModelFormatError(
      names.tokenizer,
      "file not found; a model folder needs tokenizer.json (convert llama2.c tokenizers first)",
    );
  }
  const configText = await files.readText("tokenizer_config.json");
  const chatTemplate = await files.readText("chat_template.jinja");
  return tokenizerFromJson(
    parseJson(tokenizerText, names.tokenizer),
    configText === null ? {} : parseJson(configText, names.config),
    names,
    chatTemplate,
  );
}

/** A tokenizer from a local Hugging Face model folder. */
export function loadTokenizerDir(dir: string): Promise<Tokenizer> {
  return loadTokenizerFiles(dirModelFiles(dir));
}

/** A tokenizer from a llama2.c tokenizer file (tokenizer.bin, tok512.bin). */
export async function loadLlama2cTokenizer(path: string): Promise<Tokenizer> {
  const json = llama2cTokenizerJson(await readFileBytes(path), path);
  return tokenizerFromJson(json, LLAMA2C_TOKENIZER_CONFIG, { tokenizer: path, config: path });
}
