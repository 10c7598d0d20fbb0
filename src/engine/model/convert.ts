/**
 * llama2.c checkpoint + tokenizer -> Hugging Face folder (config.json,
 * generation_config.json, model.safetensors in F32 with HF's rotary layout,
 * tokenizer.json, tokenizer_config.json), loadable by transformers and by mace.
 */
import { ModelFormatError } from "../errors.ts";
import { LLAMA2C_TOKENIZER_CONFIG, llama2cTokenizerJson } from "../tokenizer/llama2c_tokenizer.ts";
import { fileByteSource, joinPath, makeDir, readFileBytes, writeTextFile } from "./byte_source.ts";
import { expectedTensors, hfConfigJson } from "./config.ts";
import type { WeightDtype } from "./dtype.ts";
import { SINGLE_FILE } from "./hf_loader.ts";
import { openLlama2c } from "./llama2c.ts";
import { writeSafetensors } from "./safetensors.ts";
import type { ModelSource } from "./source.ts";

const json = (v: unknown) => JSON.stringify(v, null, 2) + "\n";

/** Writes config.json, generation_config.json and model.safetensors for any model source. */
export async function writeHfWeights(
  source: ModelSource,
  outDir: string,
  dtype: WeightDtype = "F32",
): Promise<void> {
  const config = source.config;
  await makeDir(outDir);
  const torchDtype = { F32: "float32", F16: "float16", BF16: "bfloat16" }[dtype];
  await writeTextFile(joinPath(outDir, "config.json"), json(hfConfigJson(config, torchDtype)));
  const gen: Record<string, unknown> = {};
  if (config.bosTokenId !== null) gen.bos_token_id = config.bosTokenId;
  const eos = source.generationConfig?.eosTokenIds ?? config.eosTokenIds;
  if (eos.length) gen.eos_token_id = eos.length === 1 ? eos[0] : eos;
  await writeTextFile(joinPath(outDir, "generation_config.json"), json(gen));

  // Sources stream in their own order; the file is written in HF's usual order.
  const byName = new Map<string, Float32Array>();
  for await (const t of source.tensors()) byName.set(t.name, t.data);
  const specs = expectedTensors(config);
  for (const s of specs) {
    if (!byName.has(s.name)) {
      throw new ModelFormatError(source.description, "source did not produce this tensor", s.name);
    }
  }
  await writeSafetensors(
    joinPath(outDir, SINGLE_FILE),
    specs.map((s) => ({ name: s.name, shape: s.shape, dtype, data: byName.get(s.name)! })),
  );
}

/** Converts a llama2.c checkpoint and its tokenizer into a Hugging Face model folder. */
export async function convertLlama2cToHf(
  binPath: string,
  tokenizerPath: string,
  outDir: string,
): Promise<void> {
  // Open the checkpoint, then parse the tokenizer: either fails before anything is written, and a
  // missing checkpoint is named before the tokenizer path derived from it.
  const source = await openLlama2c(await fileByteSource(binPath));
  const tokenizerJson = llama2cTokenizerJson(await readFileBytes(tokenizerPath), tokenizerPath);
  await writeHfWeights(source, outDir, "F32");
  await writeTextFile(joinPath(outDir, "tokenizer.json"), JSON.stringify(tokenizerJson));
  await writeTextFile(
    joinPath(outDir, "tokenizer_config.json"),
    json({ ...LLAMA2C_TOKENIZER_CONFIG, model_max_length: source.config.maxPositionEmbeddings }),
  );
}
