/**
 * LoRA adapters in Hugging Face PEFT's folder layout, so they move to and from Python:
 *
 *   adapter_config.json        LoraConfig (peft_type "LORA", r, lora_alpha, target_modules, …)
 *   adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
 *                              [r, in], ….lora_B.weight [out, r]; mlp targets under mlp.*_proj
 *
 * PEFT's saved names drop the adapter name ("default"); names that keep it
 * (lora_A.default.weight) are read too. Variants mace's kernels do not compute (DoRA, rsLoRA
 * scaling, fan_in_fan_out, LoRA biases, per-module ranks, modules_to_save) are refused.
 */
import { AdapterFormatError, ModelFormatError } from "../errors.ts";
import {
  dirModelFiles,
  joinPath,
  makeDir,
  type ModelFiles,
  writeTextFile,
} from "../model/byte_source.ts";
import type { ModelConfig } from "../model/config.ts";
import {
  readSafetensorsHeader,
  readTensor,
  type TensorToWrite,
  writeSafetensors,
} from "../model/safetensors.ts";
import {
  LORA_TARGETS,
  type LoraConfig,
  type LoraPair,
  type LoraTarget,
  type LoraWeights,
  targetModule,
  targetShape,
} from "./lora.ts";

export const ADAPTER_CONFIG = "adapter_config.json";
export const ADAPTER_WEIGHTS = "adapter_model.safetensors";

const moduleName = (target: LoraTarget) => `${target}_proj`;

/** PEFT's state-dict name of one LoRA matrix. */
function tensorName(layer: number, target: LoraTarget, matrix: "A" | "B"): string {
  return `base_model.model.${targetModule(layer, target)}.lora_${matrix}.weight`;
}

/**
 * The adapter_config.json PEFT 0.13 writes for a LoraConfig: the same fields (newer PEFT
 * reads them; older versions reject unknown fields), keys sorted as its json.dumps does.
 */
function peftConfigJson(config: LoraConfig, layers: number[] | null, baseModel: string): string {
  const fields: Record<string, unknown> = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: baseModel,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: layers,
    loftq_config: {},
    lora_alpha: config.alpha,
    lora_dropout: config.dropout,
    megatron_config: null,
    megatron_core: "megatron.core",
    modules_to_save: null,
    peft_type: "LORA",
    r: config.rank,
    rank_pattern: {},
    revision: null,
    target_modules: config.targets.map(moduleName),
    task_type: "CAUSAL_LM",
    use_dora: false,
    use_rslora: false,
  };
  return JSON.stringify(fields, null, 2);
}

/**
 * Writes `adapter` as a PEFT adapter folder (created if needed); tensors are F32.
 * `baseModel` is the base checkpoint's name or path (base_model_name_or_path).
 */
export async function writePeftAdapter(
  dir: string,
  adapter: LoraWeights,
  opts: { baseModel: string },
): Promise<void> {
  const { config } = adapter;
  const file = joinPath(dir, ADAPTER_WEIGHTS);
  if (!Number.isInteger(config.rank) || config.rank <= 0) {
    throw new AdapterFormatError(file, `rank must be a positive integer, got ${config.rank}`);
  }
  const tensors: TensorToWrite[] = [];
  const adapted: number[] = [];
  adapter.layers.forEach((pairs, layer) => {
    let any = false;
    for (const target of LORA_TARGETS) {
      const pair = pairs[target];
      if (pair === undefined) continue;
      if (!config.targets.includes(target)) {
        throw new AdapterFormatError(
          file,
          `layer ${layer} has a ${
            moduleName(target)
          } pair but config.targets is [${config.targets}]`,
        );
      }
      for (const [matrix, data] of [["A", pair.a], ["B", pair.b]] as const) {
        const name = tensorName(layer, target, matrix);
        if (data.length === 0 || data.length % config.rank !== 0) {
          throw new AdapterFormatError(
            file,
            `${data.length} values is not a multiple of rank ${config.rank}`,
            name,
          );
        }
        const other = data.length / config.rank;
        const shape = matrix === "A" ? [config.rank, other] : [other, config.rank];
        tensors.push({ name, shape, dtype: "F32", data });
      }
      any = true;
    }
    if (any) adapted.push(layer);
  });
  const complete = adapted.length === adapter.layers.length &&
    adapter.layers.every((pairs) => config.targets.every((t) => pairs[t] !== undefined));
  await makeDir(dir);
  await writeSafetensors(file, tensors);
  await writeTextFile(
    joinPath(dir, ADAPTER_CONFIG),
    peftConfigJson(config, complete ? null : adapted, opts.baseModel),
  );
}

type Json = Record<string, unknown>;

/** The checked LoRA settings of an adapter_config.json. */
interface ParsedConfig {
  rank: number;
  alpha: number;
  dropout: number;
  /**
   * Targets listed by target_modules, or null when it is a regex (targets come from the tensors).
   */
  targets: Set<LoraTarget> | null;
  /** layers_to_transform, or null for all layers. */
  layers: Set<number> | null;
}

/** target_modules entry ("q_proj" or a module path ending in it) -> target. */
function targetOfModule(entry: string): LoraTarget | undefined {
  const last = entry.slice(entry.lastIndexOf(".") + 1);
  return LORA_TARGETS.find((t) => moduleName(t) === last);
}

function parseConfig(json: unknown, file: string, model: ModelConfig): ParsedConfig {
  const fail: (detail: string) => never = (detail) => {
    throw new AdapterFormatError(file, detail);
  };
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    fail("must be a JSON object");
  }
  const c = json as Json;
  const given = (key: string) => c[key] !== undefined && c[key] !== null;

  if (c.peft_type !== "LORA") {
    fail(`peft_type is ${JSON.stringify(c.peft_type)}; mace reads LoRA adapters only ("LORA")`);
  }
  if (given("task_type") && c.task_type !== "CAUSAL_LM") {
    fail(
      `task_type ${JSON.stringify(c.task_type)} is not supported; mace serves CAUSAL_LM adapters`,
    );
  }
  const unsupported: [boolean, string][] = [
    [
      c.use_dora === true,
      "use_dora is true: DoRA adapters are not supported; train a plain LoRA adapter",
    ],
    [
      c.use_rslora === true,
      "use_rslora is true: rsLoRA (scale alpha/sqrt(r)) is unsupported; re-save with use_rslora " +
      "false and lora_alpha multiplied by sqrt(r) for the same scale",
    ],
    [
      c.fan_in_fan_out === true,
      "fan_in_fan_out is true: the transposed (GPT-2 Conv1D) layout is not supported; Llama " +
      "projections are nn.Linear",
    ],
    [
      given("bias") && c.bias !== "none",
      `bias ${JSON.stringify(c.bias)} is not supported; use "none"`,
    ],
    [c.lora_bias === true, "lora_bias is true: LoRA B biases are not supported"],
    [
      Array.isArray(c.modules_to_save) && c.modules_to_save.length > 0,
      `modules_to_save ${
        JSON.stringify(c.modules_to_save)
      } (full trained copies of modules) is not supported`,
    ],
    [given("layer_replication"), "layer_replication is not supported"],
    [
      typeof c.rank_pattern === "object" && c.rank_pattern !== null &&
      Object.keys(c.rank_pattern).length > 0,
      "per-module ranks (rank_pattern) are not supported; mace uses one rank r",
    ],
    [
      typeof c.alpha_pattern === "object" && c.alpha_pattern !== null &&
      Object.keys(c.alpha_pattern).length > 0,
      "per-module alphas (alpha_pattern) are not supported; mace uses one lora_alpha",
    ],
  ];
  for (const [bad, message] of unsupported) if (bad) fail(message);

  const rank = c.r;
  if (typeof rank !== "number" || !Number.isInteger(rank) || rank <= 0) {
    fail(`r must be a positive integer, got ${JSON.stringify(rank)}`);
  }
  const alpha = given("lora_alpha") ? c.lora_alpha : 8; // PEFT's default
  if (typeof alpha !== "number" || !Number.isFinite(alpha) || alpha <= 0) {
    fail(`lora_alpha must be a positive number, got ${JSON.stringify(alpha)}`);
  }
  const dropout = given("lora_dropout") ? c.lora_dropout : 0;
  if (typeof dropout !== "number" || !(dropout >= 0 && dropout < 1)) {
    fail(`lora_dropout must be a number in [0, 1), got ${JSON.stringify(dropout)}`);
  }

  let targets: Set<LoraTarget> | null = null;
  const modules = c.target_modules;
  if (Array.isArray(modules)) {
    targets = new Set();
    for (const entry of modules) {
      const target = typeof entry === "string" ? targetOfModule(entry) : undefined;
      if (target === undefined) {
        fail(
          `target_modules lists ${JSON.stringify(entry)}, which mace cannot adapt; supported: ${
            LORA_TARGETS.map(moduleName).join(", ")
          }`,
        );
      }
      targets.add(target);
    }
  } else if (typeof modules !== "string") {
    // A string is a regex (or "all-linear"): the tensors present say what it matched.
    fail(
      `target_modules must be a list of module names or a regex string, got ${
        JSON.stringify(modules)
      }`,
    );
  }

  let layers: Set<number> | null = null;
  if (given("layers_to_transform")) {
    const v = c.layers_to_transform;
    const list = Array.isArray(v) ? v : [v];
    for (const l of list) {
      if (typeof l !== "number" || !Number.isInteger(l) || l < 0 || l >= model.numLayers) {
        fail(
          `layers_to_transform has ${JSON.stringify(l)}, not a layer index of this model ` +
            `(0..${model.numLayers - 1}); is the adapter for another base model?`,
        );
      }
    }
    layers = new Set(list as number[]);
  }
  return {
    rank: rank as number,
    alpha: alpha as number,
    dropout: dropout as number,
    targets,
    layers,
  };
}

/** base_model.model.model.layers.{i}.{self_attn|mlp}.{t}_proj.lora_{A|B}[.{adapter}].weight */
const LORA_NAME = new RegExp(
  String.raw`^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.` +
    String.raw`(q|k|v|o|gate|up|down)_proj\.lora_(A|B)(?:\.([^.]+))?\.weight$`,
);

async function readConfigFile(files: ModelFiles, model: ModelConfig): Promise<ParsedConfig> {
  const file = files.path(ADAPTER_CONFIG);
  const text = await files.readText(ADAPTER_CONFIG);
  if (text === null) {
    throw new AdapterFormatError(
      file,
      "file not found; a PEFT adapter folder holds adapter_config.json and " +
        "adapter_model.safetensors (as PeftModel.save_pretrained writes them)",
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new AdapterFormatError(file, `not valid JSON: ${(e as Error).message}`);
  }
  return parseConfig(json, file, model);
}

/**
 * Reads a PEFT LoRA adapter folder for `model`: F32, F16 or BF16 tensors become float32.
 * A layer without a target's tensors (layers_to_transform) has no pair for it.
 */
export function readPeftAdapter(dir: string, model: ModelConfig): Promise<LoraWeights> {
  return readPeftAdapterFiles(dirModelFiles(dir), model);
}

/** readPeftAdapter over any ModelFiles (a browser can back it with fetch or a FileList). */
export async function readPeftAdapterFiles(
  files: ModelFiles,
  model: ModelConfig,
): Promise<LoraWeights> {
  const parsed = await readConfigFile(files, model);
  const file = files.path(ADAPTER_WEIGHTS);
  const source = await files.open(ADAPTER_WEIGHTS);
  if (source === null) {
    throw new AdapterFormatError(
      file,
      (await files.exists("adapter_model.bin"))
        ? "file not found; the folder has adapter_model.bin (a PyTorch pickle), which mace does " +
          "not read: re-save with save_pretrained(dir, safe_serialization=True)"
        : "file not found; a PEFT adapter folder holds adapter_config.json and " +
          "adapter_model.safetensors",
    );
  }
  const fail: (detail: string, tensor?: string) => never = (detail, tensor) => {
    throw new AdapterFormatError(file, detail, tensor);
  };
  let header;
  try {
    header = await readSafetensorsHeader(source);
  } catch (e) {
    if (e instanceof ModelFormatError) throw new AdapterFormatError(e.file, e.detail, e.tensor);
    throw e;
  }

  const { rank } = parsed;
  const layers: Partial<Record<LoraTarget, Partial<LoraPair>>>[] = Array.from(
    { length: model.numLayers },
    () => ({}),
  );
  const found = new Set<LoraTarget>();
  const adapterNames = new Set<string>();
  for (const info of header.tensors) {
    const m = LORA_NAME.exec(info.name);
    if (m === null) {
      fail(
        /\.lora_(A|B)\b/.test(info.name)
          ? "LoRA on this module is not supported; mace adapts q/k/v/o/gate/up/down_proj of the " +
            "decoder layers"
          : "unexpected tensor; mace reads only LoRA lora_A/lora_B weights (no DoRA magnitudes, " +
            "biases or modules_to_save)",
        info.name,
      );
    }
    const [, layerText, , targetText, matrix, adapterName] = m;
    const layer = Number(layerText);
    const target = targetText as LoraTarget;
    if (!info.name.startsWith(`base_model.model.${targetModule(layer, target)}.`)) {
      fail(`${moduleName(target)} belongs under ${targetModule(layer, target)}`, info.name);
    }
    adapterNames.add(adapterName ?? "");
    if (adapterNames.size > 1) {
      fail("the file holds tensors of several adapters; save one adapter per folder", info.name);
    }
    if (layer >= model.numLayers) {
      fail(
        `layer index ${layer} is out of range: the model has ${model.numLayers} layers`,
        info.name,
      );
    }
    if (parsed.targets !== null && !parsed.targets.has(target)) {
      fail(`target_modules in ${ADAPTER_CONFIG} does not list ${moduleName(target)}`, info.name);
    }
    if (parsed.layers !== null && !parsed.layers.has(layer)) {
      fail(`layer ${layer} is not in layers_to_transform of ${ADAPTER_CONFIG}`, info.name);
    }
    const { in: inF, out: outF } = targetShape(model, target);
    const expected = matrix === "A" ? [rank, inF] : [outF, rank];
    if (info.shape.length !== 2 || info.shape[0] !== expected[0] || info.shape[1] !== expected[1]) {
      fail(
        `shape [${info.shape}] does not match the model: expected [${expected}] ` +
          `(${
            matrix === "A" ? "[r, in]" : "[out, r]"
          } with r = ${rank}); is the adapter for another base model?`,
        info.name,
      );
    }
    const data = await readTensor(info);
    const pair = (layers[layer][target] ??= {});
    if (matrix === "A") pair.a = data;
    else pair.b = data;
    found.add(target);
  }

  layers.forEach((pairs, layer) => {
    for (const [target, pair] of Object.entries(pairs) as [LoraTarget, Partial<LoraPair>][]) {
      if (pair.a === undefined) {
        fail(
          "lora_B has no matching lora_A; the file is incomplete",
          tensorName(layer, target, "B"),
        );
      }
      if (pair.b === undefined) {
        fail(
          "lora_A has no matching lora_B; the file is incomplete",
          tensorName(layer, target, "A"),
        );
      }
    }
  });
  if (found.size === 0) fail("holds no LoRA tensors");

  const targets = LORA_TARGETS.filter((t) => (parsed.targets ?? found).has(t));
  return {
    config: { rank, alpha: parsed.alpha, targets, dropout: parsed.dropout },
    layers: layers as Partial<Record<LoraTarget, LoraPair>>[],
  };
}
