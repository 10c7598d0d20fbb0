/**
 * Random-weight models of real shapes, for speed and memory work (speed does
 * not depend on weight values) and for loader tests. Weights are seeded and
 * reproducible per tensor name: the streamed source and the files written by
 * writeRandomHfModel hold the same values (up to F16/BF16 rounding).
 */
import { baseName, joinPath, makeDir, writeTextFile } from "./byte_source.ts";
import {
  expectedTensors,
  hfConfigJson,
  type Llama3RopeScaling,
  type ModelConfig,
} from "./config.ts";
import { DTYPE_BYTES, type WeightDtype } from "./dtype.ts";
import { INDEX_FILE, SINGLE_FILE } from "./hf_loader.ts";
import { type TensorToWrite, writeSafetensors } from "./safetensors.ts";
import type { ModelSource, WeightTensor } from "./source.ts";

export interface RandomModelSpec {
  architecture: "llama" | "qwen2";
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  vocabSize: number;
  /** Default hiddenSize / numHeads. */
  headDim?: number;
  tieWordEmbeddings: boolean;
  /** q/k/v biases; default true for qwen2 (which always has them), false for llama. */
  attentionBias?: boolean;
  /** Default 10000. */
  ropeTheta?: number;
  ropeScaling?: Llama3RopeScaling | null;
  /** Default 2048. */
  maxPositionEmbeddings?: number;
  /** Default 1e-5. */
  rmsNormEps?: number;
  /** Default 1 for llama, null for qwen2. */
  bosTokenId?: number | null;
  /** Default [2] for llama, [] for qwen2. */
  eosTokenIds?: number[];
  seed: number;
}

/** SmolLM2-135M's published config.json shapes. */
export const SMOLLM2_135M: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 576,
  intermediateSize: 1536,
  numLayers: 30,
  numHeads: 9,
  numKvHeads: 3,
  vocabSize: 49152,
  tieWordEmbeddings: true,
  ropeTheta: 100000,
  maxPositionEmbeddings: 8192,
  rmsNormEps: 1e-5,
  bosTokenId: 1,
  eosTokenIds: [2],
  seed: 0,
};

/** Qwen2.5-0.5B's published config.json shapes. */
export const QWEN25_05B: RandomModelSpec = {
  architecture: "qwen2",
  hiddenSize: 896,
  intermediateSize: 4864,
  numLayers: 24,
  numHeads: 14,
  numKvHeads: 2,
  vocabSize: 151936,
  tieWordEmbeddings: true,
  attentionBias: true,
  ropeTheta: 1000000,
  maxPositionEmbeddings: 32768,
  rmsNormEps: 1e-6,
  bosTokenId: 151643,
  eosTokenIds: [151645],
  seed: 0,
};

/** Llama-3.2-1B's published config.json shapes (llama3 rope scaling). */
export const LLAMA32_1B: RandomModelSpec = {
  architecture: "llama",
  hiddenSize: 2048,
  intermediateSize: 8192,
  numLayers: 16,
  numHeads: 32,
  numKvHeads: 8,
  headDim: 64,
  vocabSize: 128256,
  tieWordEmbeddings: true,
  ropeTheta: 500000,
  ropeScaling: {
    type: "llama3",
    factor: 32,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  },
  maxPositionEmbeddings: 131072,
  rmsNormEps: 1e-5,
  bosTokenId: 128000,
  eosTokenIds: [128001],
  seed: 0,
};

export function randomModelConfig(spec: RandomModelSpec): ModelConfig {
  const qwen = spec.architecture === "qwen2";
  if (qwen && spec.attentionBias === false) {
    throw new Error("qwen2 always has q/k/v biases (attentionBias must be true)");
  }
  return {
    architecture: spec.architecture,
    hiddenSize: spec.hiddenSize,
    intermediateSize: spec.intermediateSize,
    numLayers: spec.numLayers,
    numHeads: spec.numHeads,
    numKvHeads: spec.numKvHeads,
    headDim: spec.headDim ?? spec.hiddenSize / spec.numHeads,
    vocabSize: spec.vocabSize,
    maxPositionEmbeddings: spec.maxPositionEmbeddings ?? 2048,
    rmsNormEps: spec.rmsNormEps ?? 1e-5,
    ropeTheta: spec.ropeTheta ?? 10000,
    ropeScaling: spec.ropeScaling ?? null,
    tieWordEmbeddings: spec.tieWordEmbeddings,
    attentionBias: spec.attentionBias ?? qwen,
    bosTokenId: spec.bosTokenId !== undefined ? spec.bosTokenId : qwen ? null : 1,
    eosTokenIds: spec.eosTokenIds ?? (qwen ? [] : [2]),
  };
}

/**
 * 32-bit FNV-1a of the name mixed with the seed, then splitmix32 steps: a well-spread per-tensor
 * seed.
 */
function tensorSeed(seed: number, name: string): number {
  let h = 0x811c9dc5 ^ (seed >>> 0);
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

function splitmix32(state: number): [number, number] {
  const s = (state + 0x9e3779b9) >>> 0;
  let z = s;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return [s, (z ^ (z >>> 16)) >>> 0];
}

/** std of the sum of four uniform 16-bit integers: sqrt(4 * (65536^2 - 1) / 12). */
const IRWIN_HALL_4_STD = 37837.227;

/**
 * Fills `out` with mean + std * z, z approximately N(0, 1) (Irwin–Hall sum of
 * four 16-bit uniforms from xorshift128): about 1 ns per value.
 */
export function fillRandomNormal(out: Float32Array, seed: number, mean: number, std: number): void {
  let s = seed >>> 0;
  let x: number, y: number, z: number, w: number;
  [s, x] = splitmix32(s);
  [s, y] = splitmix32(s);
  [s, z] = splitmix32(s);
  [s, w] = splitmix32(s);
  if ((x | y | z | w) === 0) x = 1;
  const scale = std / IRWIN_HALL_4_STD;
  for (let i = 0; i < out.length; i++) {
    let t = x ^ (x << 11);
    x = y;
    y = z;
    z = w;
    w = w ^ (w >>> 19) ^ (t ^ (t >>> 8));
    const a = w;
    t = x ^ (x << 11);
    x = y;
    y = z;
    z = w;
    w = w ^ (w >>> 19) ^ (t ^ (t >>> 8));
    const b = w;
    out[i] = mean +
      ((a & 0xffff) + ((a >>> 16) & 0xffff) + (b & 0xffff) + ((b >>> 16) & 0xffff) - 131070) *
        scale;
  }
}

/**
 * The values of one tensor of a random model: norms ~ 1 + N(0, 0.02), everything else ~ N(0, 0.02).
 */
export function randomTensorData(
  spec: RandomModelSpec,
  name: string,
  shape: number[],
): Float32Array {
  const out = new Float32Array(shape.reduce((a, b) => a * b, 1));
  const isNorm = name.endsWith("layernorm.weight") || name === "model.norm.weight";
  fillRandomNormal(out, tensorSeed(spec.seed, name), isNorm ? 1 : 0, 0.02);
  return out;
}

/** A model source whose tensors are generated on the fly (no files). */
export function randomModelSource(spec: RandomModelSpec): ModelSource {
  const config = randomModelConfig(spec);
  return {
    config,
    description:
      `random ${spec.architecture} model (hidden ${spec.hiddenSize}, ${spec.numLayers} layers, ` +
      `seed ${spec.seed})`,
    tokenizerDir: null,
    llama2cTokenizerPath: null,
    generationConfig: config.eosTokenIds.length ? { eosTokenIds: config.eosTokenIds } : null,
    async *tensors(): AsyncIterable<WeightTensor> {
      for (const t of expectedTensors(config)) {
        yield {
          name: t.name,
          shape: t.shape.slice(),
          data: randomTensorData(spec, t.name, t.shape),
        };
      }
    },
  };
}

const TORCH_DTYPE: Record<WeightDtype, string> = {
  F32: "float32",
  F16: "float16",
  BF16: "bfloat16",
};

function shardName(i: number, n: number): string {
  const pad = (k: number) => String(k).padStart(5, "0");
  return `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
}

/**
 * Writes config.json, generation_config.json and the weights of a random
 * model to `dir` (created if needed): model.safetensors, or `shards` files
 * model-0000N-of-0000M.safetensors with model.safetensors.index.json.
 * Tensors are generated and written one at a time. Returns the written paths.
 */
export async function writeRandomHfModel(
  dir: string,
  spec: RandomModelSpec,
  dtype: WeightDtype,
  options: { shards?: number } = {},
): Promise<string[]> {
  const config = randomModelConfig(spec);
  const shards = options.shards ?? 1;
  const specs = expectedTensors(config);
  if (!Number.isInteger(shards) || shards < 1 || shards > specs.length) {
    throw new RangeError(`shards must be an integer in 1..${specs.length}, got ${shards}`);
  }
  await makeDir(dir);
  const written: string[] = [];
  const configPath = joinPath(dir, "config.json");
  await writeTextFile(
    configPath,
    JSON.stringify(hfConfigJson(config, TORCH_DTYPE[dtype]), null, 2) + "\n",
  );
  written.push(configPath);
  const gen: Record<string, unknown> = {};
  if (config.bosTokenId !== null) gen.bos_token_id = config.bosTokenId;
  if (config.eosTokenIds.length) {
    gen.eos_token_id = config.eosTokenIds.length === 1 ? config.eosTokenIds[0] : config.eosTokenIds;
  }
  const genPath = joinPath(dir, "generation_config.json");
  await writeTextFile(genPath, JSON.stringify(gen, null, 2) + "\n");
  written.push(genPath);

  const toWrite: TensorToWrite[] = specs.map((t) => ({
    name: t.name,
    shape: t.shape,
    dtype,
    data: () => randomTensorData(spec, t.name, t.shape),
  }));
  const bytesOf = (t: TensorToWrite) => t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype];
  if (shards === 1) {
    const path = joinPath(dir, SINGLE_FILE);
    await writeSafetensors(path, toWrite);
    written.push(path);
    return written;
  }

  // Contiguous groups of about total/shards bytes each, every group non-empty.
  const total = toWrite.reduce((n, t) => n + bytesOf(t), 0);
  const groups: TensorToWrite[][] = [];
  let current: TensorToWrite[] = [];
  let acc = 0;
  toWrite.forEach((t, i) => {
    current.push(t);
    acc += bytesOf(t);
    const remainingTensors = toWrite.length - i - 1;
    const remainingGroups = shards - groups.length - 1;
    if (
      remainingGroups > 0 &&
      (acc >= (total * (groups.length + 1)) / shards || remainingTensors === remainingGroups)
    ) {
      groups.push(current);
      current = [];
    }
  });
  groups.push(current);
  const weightMap: Record<string, string> = {};
  for (let i = 0; i < groups.length; i++) {
    const path = joinPath(dir, shardName(i, groups.length));
    await writeSafetensors(path, groups[i]);
    for (const t of groups[i]) weightMap[t.name] = baseName(path);
    written.push(path);
  }
  const indexPath = joinPath(dir, INDEX_FILE);
  await writeTextFile(
    indexPath,
    JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2) + "\n",
  );
  written.push(indexPath);
  return written;
}
