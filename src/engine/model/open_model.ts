/**
 * One entry point for every model on disk: a Hugging Face folder
 * (config.json + safetensors, sharded or not) or a llama2.c .bin checkpoint.
 */
import { ModelFormatError } from "../errors.ts";
import {
  baseName,
  dirModelFiles,
  dirName,
  fileByteSource,
  joinPath,
  pathKind,
} from "./byte_source.ts";
import { openHfModel } from "./hf_loader.ts";
import { openLlama2c, parseLlama2cHeader } from "./llama2c.ts";
import type { ModelSource } from "./source.ts";

export type { GenerationDefaults, ModelSource, WeightTensor } from "./source.ts";

export interface OpenModelOptions {
  /**
   * Tokenizer to use instead of the one found next to the model: a folder with
   * tokenizer.json, a tokenizer.json file, or a llama2.c tokenizer .bin.
   */
  tokenizer?: string;
}

const USAGE =
  "pass a Hugging Face model folder (config.json + model.safetensors) or a llama2.c .bin " +
  "checkpoint";

async function resolveTokenizer(
  path: string,
): Promise<{ tokenizerDir: string | null; llama2cTokenizerPath: string | null }> {
  const kind = await pathKind(path);
  if (kind === null) {
    throw new ModelFormatError(
      path,
      "tokenizer not found; pass a folder with tokenizer.json, a tokenizer.json file, or a " +
        "llama2.c tokenizer .bin",
    );
  }
  if (kind === "dir") {
    if ((await pathKind(joinPath(path, "tokenizer.json"))) !== "file") {
      throw new ModelFormatError(
        joinPath(path, "tokenizer.json"),
        "tokenizer folder has no tokenizer.json",
      );
    }
    return { tokenizerDir: path, llama2cTokenizerPath: null };
  }
  if (path.endsWith(".json")) return { tokenizerDir: dirName(path), llama2cTokenizerPath: null };
  return { tokenizerDir: null, llama2cTokenizerPath: path };
}

/** Opens and validates a model; weights are read later, by `tensors()`. */
export async function openModel(
  path: string,
  options: OpenModelOptions = {},
): Promise<ModelSource> {
  const kind = await pathKind(path);
  if (kind === null) throw new ModelFormatError(path, `no such file or folder; ${USAGE}`);
  const tok = options.tokenizer !== undefined ? await resolveTokenizer(options.tokenizer) : null;

  const base = baseName(path);
  let hfDir: string | null = null;
  if (kind === "dir") hfDir = path;
  else if (
    base === "config.json" || base.endsWith(".safetensors") ||
    base === "model.safetensors.index.json"
  ) {
    hfDir = dirName(path);
  } else if (base === "pytorch_model.bin" || /^pytorch_model-\d+-of-\d+\.bin$/.test(base)) {
    throw new ModelFormatError(
      path,
      "PyTorch pickle weights are not supported; save the model as safetensors",
    );
  } else if (base.endsWith(".gguf")) {
    throw new ModelFormatError(path, `GGUF files are not supported; ${USAGE}`);
  }

  if (hfDir !== null) {
    const source = await openHfModel(
      dirModelFiles(hfDir),
      tok ? { tokenizerDir: tok.tokenizerDir } : {},
    );
    if (tok) source.llama2cTokenizerPath = tok.llama2cTokenizerPath;
    return source;
  }

  const file = await fileByteSource(path);
  let tokenizerPath: string | null = tok ? tok.llama2cTokenizerPath : null;
  if (!tok) {
    const header = parseLlama2cHeader(await file.read(0, Math.min(28, file.size)), path);
    for (const name of [`tok${header.vocabSize}.bin`, "tokenizer.bin"]) {
      const candidate = joinPath(dirName(path), name);
      if ((await pathKind(candidate)) === "file") {
        tokenizerPath = candidate;
        break;
      }
    }
  }
  const source = await openLlama2c(file, { tokenizerPath });
  if (tok) source.tokenizerDir = tok.tokenizerDir;
  return source;
}
