/**
 * Hugging Face model folders: config.json, generation_config.json, and
 * model.safetensors or sharded model-0000N-of-0000M.safetensors with
 * model.safetensors.index.json. Everything is validated against the config
 * before the first weight is read; weights then stream one tensor at a time.
 */
import { ModelFormatError } from "../errors.ts";
import type { ModelFiles } from "./byte_source.ts";
import { expectedTensors, type ModelConfig, parseEosIds, parseHfConfig } from "./config.ts";
import {
  readSafetensorsHeader,
  readTensor,
  type SafetensorsHeader,
  type TensorInfo,
} from "./safetensors.ts";
import type { GenerationDefaults, ModelSource, WeightTensor } from "./source.ts";

export type { GenerationDefaults, ModelSource, WeightTensor } from "./source.ts";

export const INDEX_FILE = "model.safetensors.index.json";
export const SINGLE_FILE = "model.safetensors";

async function readJson(files: ModelFiles, name: string): Promise<unknown | null> {
  const text = await files.readText(name);
  if (text === null) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ModelFormatError(files.path(name), `not valid JSON (${(e as Error).message})`);
  }
}

/** Reads config.json of a model folder. */
export async function readHfConfig(files: ModelFiles): Promise<ModelConfig> {
  const json = await readJson(files, "config.json");
  if (json === null) {
    throw new ModelFormatError(
      files.path("config.json"),
      "missing config.json: a Hugging Face model folder needs config.json next to its " +
        "*.safetensors weights (or pass a llama2.c .bin checkpoint instead of a folder)",
    );
  }
  return parseHfConfig(json, files.path("config.json"));
}

/** generation_config.json, if present. */
export async function readGenerationConfig(files: ModelFiles): Promise<GenerationDefaults | null> {
  const name = "generation_config.json";
  const json = await readJson(files, name);
  if (json === null) return null;
  if (typeof json !== "object" || Array.isArray(json)) {
    throw new ModelFormatError(files.path(name), "must be a JSON object");
  }
  const g = json as Record<string, unknown>;
  const out: GenerationDefaults = {};
  if (g.eos_token_id !== undefined && g.eos_token_id !== null) {
    out.eosTokenIds = parseEosIds(g.eos_token_id, files.path(name));
  }
  const num = (key: string): number | undefined => {
    const v = g[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
      throw new ModelFormatError(
        files.path(name),
        `${key} must be a non-negative number, got ${JSON.stringify(v)}`,
      );
    }
    return v;
  };
  // do_sample=false means greedy in HF; keep the sampling knobs only when sampling.
  const sampling = g.do_sample !== false;
  if (sampling) {
    out.temperature = num("temperature");
    out.topK = num("top_k");
    out.topP = num("top_p");
  } else if (g.do_sample === false) {
    out.temperature = 0;
  }
  for (const k of Object.keys(out) as (keyof GenerationDefaults)[]) {
    if (out[k] === undefined) delete out[k];
  }
  return out;
}

/** Where each needed tensor lives, after validation. */
interface ResolvedWeights {
  headers: SafetensorsHeader[];
  /** Needed tensors in read order (file by file, ascending offset). */
  plan: TensorInfo[];
}

async function openShard(
  files: ModelFiles,
  name: string,
  referencedBy?: string,
): Promise<SafetensorsHeader> {
  const source = await files.open(name);
  if (!source) {
    if (referencedBy) {
      throw new ModelFormatError(
        files.path(referencedBy),
        `lists shard ${name}, which is missing from ${files.root}; download every shard named in ` +
          `the index`,
      );
    }
    throw new ModelFormatError(files.path(name), "file not found");
  }
  return await readSafetensorsHeader(source);
}

async function resolveWeights(files: ModelFiles, config: ModelConfig): Promise<ResolvedWeights> {
  const headers: SafetensorsHeader[] = [];
  let indexMap: Map<string, string> | null = null;
  const index = await readJson(files, INDEX_FILE);
  if (index !== null) {
    const map = (index as Record<string, unknown> | null)?.weight_map;
    if (typeof map !== "object" || map === null || Array.isArray(map)) {
      throw new ModelFormatError(files.path(INDEX_FILE), 'missing "weight_map" object');
    }
    indexMap = new Map();
    for (const [tensor, shard] of Object.entries(map)) {
      if (typeof shard !== "string" || shard === "") {
        throw new ModelFormatError(
          files.path(INDEX_FILE),
          "weight_map value must be a file name",
          tensor,
        );
      }
      indexMap.set(tensor, shard);
    }
    const shards = [...new Set(indexMap.values())].sort();
    for (const shard of shards) headers.push(await openShard(files, shard, INDEX_FILE));
  } else if (await files.exists(SINGLE_FILE)) {
    headers.push(await openShard(files, SINGLE_FILE));
  } else {
    const hint = (await files.exists("pytorch_model.bin"))
      ? " (found pytorch_model.bin: convert it to safetensors, e.g. save_pretrained(..., " +
        "safe_serialization=True))"
      : "";
    throw new ModelFormatError(
      files.path(SINGLE_FILE),
      `missing weights: expected ${SINGLE_FILE}, or ${INDEX_FILE} with its shards, in ` +
        `${files.root}${hint}`,
    );
  }

  // Every tensor of every shard, by name; a name in two files is ambiguous.
  const where = new Map<string, TensorInfo>();
  for (const h of headers) {
    for (const t of h.tensors) {
      const other = where.get(t.name);
      if (other) {
        throw new ModelFormatError(
          t.source.name,
          `tensor also present in ${other.source.name}`,
          t.name,
        );
      }
      where.set(t.name, t);
    }
  }
  if (indexMap) {
    for (const [tensor, shard] of indexMap) {
      const found = where.get(tensor);
      if (!found) {
        throw new ModelFormatError(
          files.path(shard),
          `tensor listed in ${INDEX_FILE} is not in this shard`,
          tensor,
        );
      }
      if (found.source.name !== files.path(shard)) {
        throw new ModelFormatError(
          files.path(INDEX_FILE),
          `places this tensor in ${shard}, but it is in ${found.source.name}; the index does not ` +
            `match the shards`,
          tensor,
        );
      }
    }
  }

  const plan: TensorInfo[] = [];
  const describe = `config.json: hidden_size=${config.hiddenSize}, ` +
    `intermediate_size=${config.intermediateSize}, heads=${config.numHeads}, ` +
    `kv_heads=${config.numKvHeads}, head_dim=${config.headDim}, vocab_size=${config.vocabSize}`;
  for (const spec of expectedTensors(config)) {
    const t = where.get(spec.name);
    if (!t) {
      const file = indexMap ? files.path(INDEX_FILE) : headers[0].source.name;
      let why = `missing tensor (expected shape [${spec.shape}] from ${describe})`;
      if (spec.name === "lm_head.weight") why += "; config.json says tie_word_embeddings=false";
      if (spec.name.endsWith(".bias")) why += "; the architecture has q/k/v biases";
      throw new ModelFormatError(file, why, spec.name);
    }
    if (t.shape.length !== spec.shape.length || t.shape.some((s, i) => s !== spec.shape[i])) {
      throw new ModelFormatError(
        t.source.name,
        `shape [${t.shape}] does not match the expected [${spec.shape}] (${describe})`,
        spec.name,
      );
    }
    plan.push(t);
  }
  for (const name of where.keys()) {
    if (/\.self_attn\.o_proj\.bias$/.test(name) || /\.mlp\.\w+_proj\.bias$/.test(name)) {
      throw new ModelFormatError(
        where.get(name)!.source.name,
        "o_proj/MLP biases are not supported",
        name,
      );
    }
  }
  const order = new Map(headers.map((h, i) => [h.source.name, i]));
  plan.sort((a, b) => order.get(a.source.name)! - order.get(b.source.name)! || a.offset - b.offset);
  return { headers, plan };
}

/** Opens and fully validates an HF model folder. */
export async function openHfModel(
  files: ModelFiles,
  options: { tokenizerDir?: string | null } = {},
): Promise<
  ModelSource
> {
  const config = await readHfConfig(files);
  const { plan } = await resolveWeights(files, config);
  const generationConfig = await readGenerationConfig(files);
  const tokenizerDir = options.tokenizerDir !== undefined
    ? options.tokenizerDir
    : (await files.exists("tokenizer.json"))
    ? files.root
    : null;
  return {
    config,
    description: files.root,
    tokenizerDir,
    llama2cTokenizerPath: null,
    generationConfig,
    async *tensors(): AsyncIterable<WeightTensor> {
      for (const info of plan) {
        yield { name: info.name, shape: info.shape.slice(), data: await readTensor(info) };
      }
    },
  };
}
