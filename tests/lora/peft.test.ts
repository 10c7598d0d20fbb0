/** PEFT adapter folders: round trip, a folder written the way PEFT writes it, and refusals. */
import assert from "node:assert/strict";
import { AdapterFormatError } from "../../src/engine/errors.ts";
import type { ModelConfig } from "../../src/engine/model/config.ts";
import { f16ToF32, f32ToF16Bits, type WeightDtype } from "../../src/engine/model/dtype.ts";
import { fileByteSource } from "../../src/engine/model/byte_source.ts";
import {
  readSafetensorsHeader,
  type TensorToWrite,
  writeSafetensors,
} from "../../src/engine/model/safetensors.ts";
import {
  type LoraConfig,
  type LoraTarget,
  type LoraWeights,
  targetModule,
  targetShape,
} from "../../src/engine/lora/lora.ts";
import { readPeftAdapter, writePeftAdapter } from "../../src/engine/lora/peft.ts";
import { randn } from "../helpers/random.ts";

/** A small Llama with odd sizes: D 12, I 20, 3 layers, 3 query heads, 1 kv head, head dim 4. */
const MODEL: ModelConfig = {
  architecture: "llama",
  hiddenSize: 12,
  intermediateSize: 20,
  numLayers: 3,
  numHeads: 3,
  numKvHeads: 1,
  headDim: 4,
  vocabSize: 32,
  maxPositionEmbeddings: 64,
  rmsNormEps: 1e-5,
  ropeTheta: 10000,
  ropeScaling: null,
  tieWordEmbeddings: true,
  attentionBias: false,
  bosTokenId: 1,
  eosTokenIds: [2],
};

async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "mace-peft-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Random A [rank, in], B [out, rank] for every (layer, target) that `has` selects. */
function randomAdapter(
  config: LoraConfig,
  has: (layer: number, target: LoraTarget) => boolean = () => true,
): LoraWeights {
  let seed = 1;
  return {
    config,
    layers: Array.from({ length: MODEL.numLayers }, (_, layer) => {
      const pairs: LoraWeights["layers"][number] = {};
      for (const target of config.targets) {
        if (!has(layer, target)) continue;
        const { in: inF, out: outF } = targetShape(MODEL, target);
        pairs[target] = {
          a: randn(config.rank * inF, seed++, 0.5),
          b: randn(outF * config.rank, seed++, 0.5),
        };
      }
      return pairs;
    }),
  };
}

const ALL: LoraConfig = {
  rank: 3,
  alpha: 6,
  targets: ["q", "k", "v", "o", "gate", "up", "down"],
  dropout: 0.05,
};

Deno.test("peft: write then read round-trips; config and tensor names as PEFT's", async () => {
  await withTempDir(async (dir) => {
    const adapter = randomAdapter(ALL);
    await writePeftAdapter(dir, adapter, { baseModel: "HuggingFaceTB/SmolLM2-135M" });
    assert.deepEqual(await readPeftAdapter(dir, MODEL), adapter);

    const config = JSON.parse(await Deno.readTextFile(`${dir}/adapter_config.json`));
    assert.deepEqual(Object.keys(config), Object.keys(config).toSorted(), "keys sorted, as PEFT");
    const expected: Record<string, unknown> = {
      peft_type: "LORA",
      task_type: "CAUSAL_LM",
      r: 3,
      lora_alpha: 6,
      lora_dropout: 0.05,
      target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      bias: "none",
      fan_in_fan_out: false,
      use_rslora: false,
      use_dora: false,
      base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M",
      inference_mode: true,
      modules_to_save: null,
      layers_to_transform: null,
      rank_pattern: {},
      alpha_pattern: {},
    };
    for (const [key, value] of Object.entries(expected)) assert.deepEqual(config[key], value, key);

    const header = await readSafetensorsHeader(
      await fileByteSource(`${dir}/adapter_model.safetensors`),
    );
    assert.deepEqual(header.metadata, { format: "pt" });
    assert.equal(header.tensors.length, 3 * 7 * 2);
    const byName = header.byName;
    const q0a = byName.get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")!;
    assert.deepEqual([q0a.dtype, q0a.shape], ["F32", [3, 12]]);
    const v2b = byName.get("base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight")!;
    assert.deepEqual(v2b.shape, [4, 3]);
    const down1a = byName.get("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")!;
    assert.deepEqual(down1a.shape, [3, 20]);
    const gate1b = byName.get("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight")!;
    assert.deepEqual(gate1b.shape, [20, 3]);
  });
});

Deno.test("peft: layers without some targets round-trip (layers_to_transform)", async () => {
  await withTempDir(async (dir) => {
    const config: LoraConfig = { rank: 2, alpha: 16, targets: ["q", "v"], dropout: 0 };
    // Layer 1 has nothing; layer 2 only v.
    const adapter = randomAdapter(config, (l, t) => l === 0 || (l === 2 && t === "v"));
    await writePeftAdapter(dir, adapter, { baseModel: "base" });
    const written = JSON.parse(await Deno.readTextFile(`${dir}/adapter_config.json`));
    assert.deepEqual(written.layers_to_transform, [0, 2]);
    const back = await readPeftAdapter(dir, MODEL);
    assert.deepEqual(back, adapter);
    assert.deepEqual(Object.keys(back.layers[1]), []);
    assert.deepEqual(Object.keys(back.layers[2]), ["v"]);
  });
});

/** adapter_config.json as PEFT 0.13 writes it (sorted keys, its extra fields). */
function peftConfig(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M",
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: 32,
    lora_dropout: 0.1,
    megatron_config: null,
    megatron_core: "megatron.core",
    modules_to_save: null,
    peft_type: "LORA",
    r: 4,
    rank_pattern: {},
    revision: null,
    target_modules: ["v_proj", "q_proj", "down_proj"],
    task_type: "CAUSAL_LM",
    use_dora: false,
    use_rslora: false,
    ...overrides,
  };
}

interface HandTensor {
  layer: number;
  target: LoraTarget;
  matrix: "A" | "B";
  shape?: number[];
  /** Name infix, e.g. "default" (lora_A.default.weight). */
  adapterName?: string;
  name?: string;
}

/** An adapter folder written by hand: `config` verbatim, tensors with seeded values. */
async function writeHandAdapter(
  dir: string,
  config: Record<string, unknown>,
  tensors: HandTensor[],
  dtype: WeightDtype = "F16",
): Promise<Map<string, Float32Array>> {
  await Deno.writeTextFile(`${dir}/adapter_config.json`, JSON.stringify(config, null, 2));
  const rank = config.r as number;
  const values = new Map<string, Float32Array>();
  const toWrite: TensorToWrite[] = tensors.map((t, i) => {
    const { in: inF, out: outF } = targetShape(MODEL, t.target);
    const shape = t.shape ?? (t.matrix === "A" ? [rank, inF] : [outF, rank]);
    const infix = t.adapterName ? `.${t.adapterName}` : "";
    const name = t.name ??
      `base_model.model.${targetModule(t.layer, t.target)}.lora_${t.matrix}${infix}.weight`;
    const data = randn(shape.reduce((a, b) => a * b, 1), 100 + i, 0.3);
    values.set(`${t.layer}.${t.target}.${t.matrix}`, data);
    return { name, shape, dtype, data };
  });
  await writeSafetensors(`${dir}/adapter_model.safetensors`, toWrite);
  return values;
}

const both = (layer: number, target: LoraTarget, extra: Partial<HandTensor> = {}): HandTensor[] => [
  { layer, target, matrix: "A", ...extra },
  { layer, target, matrix: "B", ...extra },
];

Deno.test("peft: reads PEFT's layout: extra fields, F16 tensors, adapter-name infix", async () => {
  await withTempDir(async (dir) => {
    const tensors = [0, 1, 2].flatMap((l) => [
      ...both(l, "q", { adapterName: "default" }),
      ...both(l, "v", { adapterName: "default" }),
      ...both(l, "down", { adapterName: "default" }),
    ]);
    const values = await writeHandAdapter(dir, peftConfig(), tensors);
    const adapter = await readPeftAdapter(dir, MODEL);
    assert.deepEqual(adapter.config, {
      rank: 4,
      alpha: 32,
      targets: ["q", "v", "down"],
      dropout: 0.1,
    });
    const f16 = (x: Float32Array) => x.map((v) => f16ToF32(f32ToF16Bits(v)));
    for (const l of [0, 1, 2]) {
      assert.deepEqual(Object.keys(adapter.layers[l]).toSorted(), ["down", "q", "v"]);
      for (const t of ["q", "v", "down"] as const) {
        assert.deepEqual(adapter.layers[l][t]!.a, f16(values.get(`${l}.${t}.A`)!));
        assert.deepEqual(adapter.layers[l][t]!.b, f16(values.get(`${l}.${t}.B`)!));
      }
    }
  });
});

Deno.test("peft: target_modules as paths or a regex; BF16 with layers_to_transform", async () => {
  await withTempDir(async (dir) => {
    await writeHandAdapter(
      dir,
      peftConfig({ target_modules: ["model.layers.0.self_attn.k_proj", "mlp.up_proj"] }),
      [...both(0, "k"), ...both(2, "up")],
    );
    const a = await readPeftAdapter(dir, MODEL);
    assert.deepEqual(a.config.targets, ["k", "up"]);
    assert.deepEqual(a.layers.map((l) => Object.keys(l)), [["k"], [], ["up"]]);
  });
  await withTempDir(async (dir) => {
    await writeHandAdapter(
      dir,
      peftConfig({ target_modules: ".*\\.(o_proj|gate_proj)", layers_to_transform: [1, 2] }),
      [...both(1, "o"), ...both(1, "gate"), ...both(2, "gate")],
      "BF16",
    );
    const a = await readPeftAdapter(dir, MODEL);
    assert.deepEqual(
      a.config.targets,
      ["o", "gate"],
      "targets from the tensors, in LORA_TARGETS order",
    );
    assert.deepEqual(a.layers.map((l) => Object.keys(l)), [[], ["o", "gate"], ["gate"]]);
  });
});

async function assertAdapterError(
  promise: Promise<unknown>,
  expected: { file: RegExp; tensor?: string; pattern: RegExp },
) {
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof AdapterFormatError, `expected AdapterFormatError, got ${e}`);
    assert.match(e.file, expected.file, e.message);
    assert.equal(e.tensor, expected.tensor, e.message);
    assert.match(e.message, expected.pattern);
    return true;
  });
}

const CONFIG_FILE = /adapter_config\.json$/;
const WEIGHTS_FILE = /adapter_model\.safetensors$/;
const NAME = (layer: number, module: string, matrix: "A" | "B") =>
  `base_model.model.model.layers.${layer}.${module}.lora_${matrix}.weight`;

Deno.test("peft: missing files are refused with what a folder needs", async () => {
  await withTempDir(async (dir) => {
    await assertAdapterError(readPeftAdapter(dir, MODEL), {
      file: CONFIG_FILE,
      pattern: /file not found; a PEFT adapter folder holds adapter_config\.json and adapter_model/,
    });
    await Deno.writeTextFile(`${dir}/adapter_config.json`, JSON.stringify(peftConfig()));
    await assertAdapterError(readPeftAdapter(dir, MODEL), {
      file: WEIGHTS_FILE,
      pattern: /file not found/,
    });
    await Deno.writeFile(`${dir}/adapter_model.bin`, new Uint8Array(4));
    await assertAdapterError(readPeftAdapter(dir, MODEL), {
      file: WEIGHTS_FILE,
      pattern: /adapter_model\.bin \(a PyTorch pickle\).*safe_serialization=True/,
    });
  });
});

Deno.test("peft: unsupported configurations are refused", async () => {
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ peft_type: "IA3" }, /peft_type is "IA3"; mace reads LoRA adapters only/],
    [{ use_dora: true }, /use_dora is true: DoRA adapters are not supported/],
    [{ use_rslora: true }, /use_rslora is true: rsLoRA .* is unsupported/],
    [{ fan_in_fan_out: true }, /fan_in_fan_out is true/],
    [{ bias: "lora_only" }, /bias "lora_only" is not supported; use "none"/],
    [{ modules_to_save: ["lm_head"] }, /modules_to_save \["lm_head"\]/],
    [{ rank_pattern: { q_proj: 8 } }, /rank_pattern/],
    [{ task_type: "SEQ_CLS" }, /task_type "SEQ_CLS" is not supported/],
    [
      { target_modules: ["q_proj", "c_attn"] },
      /target_modules lists "c_attn", which mace cannot adapt; supported: q_proj, k_proj/,
    ],
    [{ r: 0 }, /r must be a positive integer, got 0/],
    [
      { layers_to_transform: [0, 3] },
      /layers_to_transform has 3, not a layer index of this model \(0\.\.2\)/,
    ],
  ];
  for (const [overrides, pattern] of cases) {
    await withTempDir(async (dir) => {
      await writeHandAdapter(dir, peftConfig(overrides), both(0, "q"));
      await assertAdapterError(readPeftAdapter(dir, MODEL), { file: CONFIG_FILE, pattern });
    });
  }
});

Deno.test("peft: tensors that fit neither model nor config are refused by name", async () => {
  const cases: [HandTensor[], string, RegExp][] = [
    [
      [{ layer: 0, target: "q", matrix: "A", shape: [4, 16] }, {
        layer: 0,
        target: "q",
        matrix: "B",
      }],
      NAME(0, "self_attn.q_proj", "A"),
      /shape \[4,16\] does not match the model: expected \[4,12\] \(\[r, in\] with r = 4\)/,
    ],
    [
      [{ layer: 1, target: "v", matrix: "A" }, {
        layer: 1,
        target: "v",
        matrix: "B",
        shape: [12, 4],
      }],
      NAME(1, "self_attn.v_proj", "B"),
      /shape \[12,4\] does not match the model: expected \[4,4\] \(\[out, r\]/,
    ],
    [
      both(3, "q"),
      NAME(3, "self_attn.q_proj", "A"),
      /layer index 3 is out of range: the model has 3 layers/,
    ],
    [
      [{ layer: 2, target: "down", matrix: "A" }],
      NAME(2, "mlp.down_proj", "A"),
      /lora_A has no matching lora_B/,
    ],
    [
      [{ layer: 2, target: "q", matrix: "B" }],
      NAME(2, "self_attn.q_proj", "B"),
      /lora_B has no matching lora_A/,
    ],
    [
      both(0, "k"),
      NAME(0, "self_attn.k_proj", "A"),
      /target_modules in adapter_config\.json does not list k_proj/,
    ],
    [
      [{ layer: 0, target: "q", matrix: "A", name: "base_model.model.lm_head.lora_A.weight" }],
      "base_model.model.lm_head.lora_A.weight",
      /LoRA on this module is not supported/,
    ],
    [
      [{
        layer: 0,
        target: "q",
        matrix: "A",
        name: NAME(0, "self_attn.q_proj", "A").replace("lora_A", "lora_magnitude_vector"),
      }],
      NAME(0, "self_attn.q_proj", "A").replace("lora_A", "lora_magnitude_vector"),
      /unexpected tensor/,
    ],
  ];
  for (const [tensors, tensor, pattern] of cases) {
    await withTempDir(async (dir) => {
      await writeHandAdapter(dir, peftConfig(), tensors);
      await assertAdapterError(readPeftAdapter(dir, MODEL), {
        file: WEIGHTS_FILE,
        tensor,
        pattern,
      });
    });
  }
});
