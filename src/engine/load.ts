/** Opens a model and its tokenizer from a path (HF folder or llama2.c checkpoint). */
import { openModel } from "./model/open_model.ts";
import type { ModelSource } from "./model/source.ts";
import { loadLlama2cTokenizer, loadTokenizerDir, type Tokenizer } from "./tokenizer/tokenizer.ts";
import { ModelFormatError } from "./errors.ts";

export interface LoadedModel {
  source: ModelSource;
  tokenizer: Tokenizer;
}

/**
 * `tokenizerPath`: a tokenizer.json folder or a llama2.c tokenizer .bin, overriding the model's
 * own.
 */
export async function openModelWithTokenizer(
  path: string,
  tokenizerPath?: string,
): Promise<LoadedModel> {
  const source = await openModel(path, tokenizerPath ? { tokenizer: tokenizerPath } : undefined);
  let tokenizer: Tokenizer;
  if (source.llama2cTokenizerPath) {
    tokenizer = await loadLlama2cTokenizer(source.llama2cTokenizerPath);
  } else if (source.tokenizerDir) tokenizer = await loadTokenizerDir(source.tokenizerDir);
  else {
    throw new ModelFormatError(
      path,
      "no tokenizer found (expected tokenizer.json next to config.json, or tok512.bin / " +
        "tokenizer.bin next to a llama2.c checkpoint); pass --tokenizer FILE",
    );
  }
  if (tokenizer.vocabSize > source.config.vocabSize) {
    throw new ModelFormatError(
      path,
      `tokenizer has ${tokenizer.vocabSize} tokens but the model only ${source.config.vocabSize}`,
    );
  }
  return { source, tokenizer };
}
