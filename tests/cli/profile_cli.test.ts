/**
 * `mace profile` run as a user runs it (a subprocess on wgpu), on the bundled model with a small
 * engine so it takes seconds:
 *  - the profile it writes (and prints with --json) validates, names the model and the device,
 *    has finite non-negative coefficients and the exact KV and training memory of this engine;
 *  - every iteration it measured is in --samples, covering each slice kind alone and next to
 *    serving, and serving steps alone; the cost model's error on those samples is exactly the
 *    reported fit error, and it beats predicting every iteration at the samples' median;
 *  - bad flags are named errors before any GPU work.
 * And the profile files without a GPU: naming (device slug, model name), the shipped default
 * profile validates, a missing or malformed file is a named error that says what to do.
 */
import assert from "node:assert/strict";
import {
  CostModel,
  type CostProfile,
  FEATURES,
  type StepShape,
} from "../../src/scheduler/cost_model.ts";
import {
  DEFAULT_PROFILE,
  deviceSlug,
  loadProfile,
  modelName,
  ProfileNotFoundError,
  profilePath,
  PROFILES_DIR,
} from "../../src/scheduler/profiles.ts";
import { ProfileFormatError } from "../../src/engine/errors.ts";
import { openModel } from "../../src/engine/model/open_model.ts";
import { targetShape } from "../../src/engine/lora/lora.ts";
import { assertClose } from "../helpers/tolerance.ts";
import { mace, ROOT } from "../helpers/cli.ts";

interface Sample {
  label: string;
  shape: StepShape;
  ms: number;
}

Deno.test("cli: profile writes a valid fitted profile with the error it reports", async () => {
  const dir = await Deno.makeTempDir({ prefix: "mace-profile-cli-" });
  // A small engine (32 tokens and 4 sequences per step, context 64, pairs of up to 32 tokens).
  const engine = "--max-tokens 32 --max-seqs 4 --max-context 64 --max-length 32 --repeats 2";
  const out = ["--out", `${dir}/out/p.json`, "--samples", `${dir}/samples.jsonl`];
  const { code, stdout, stderr } = await mace(
    "profile",
    "--backend",
    "wgpu",
    ...engine.split(" "),
    ...out,
    "--json",
  );
  assert.equal(code, 0, stderr);
  const profile = await loadProfile(`${dir}/out/p.json`);
  assert.deepEqual(JSON.parse(stdout), profile, "--json prints the profile it wrote");

  const config = (await openModel(ROOT + "models/stories260K")).config;
  assert.equal(profile.model, "stories260K");
  assert.match(profile.device, / via wgpu$/);
  assert.equal(profile.numLayers, config.numLayers);
  assert.equal(profile.maxContext, 64);
  for (const f of FEATURES) {
    const c = profile.coefficients[f];
    assert.ok(Number.isFinite(c) && c >= 0, `${f} = ${c}`);
  }
  // Serving steps and slices cost time: the fit must have found a per-iteration or per-token cost.
  assert.ok(profile.coefficients.iteration + profile.coefficients.decodeSeqs > 0);
  assert.ok(profile.coefficients.ftSlice + profile.coefficients.ftForwardTokens > 0);

  // Memory of this engine: K and V of every layer in f32; 4 sequences of 64 tokens in 16-token
  // blocks; LoRA rank 8 on q and v with gradient and two AdamW moments.
  const m = profile.memory;
  assert.equal(m.kvBytesPerToken, 2 * config.numLayers * config.numKvHeads * config.headDim * 4);
  assert.equal(m.blockSize, 16);
  assert.equal(m.kvBlocks, 4 * (64 / 16));
  const loraFloats = (["q", "v"] as const)
    .reduce((n, t) => n + 8 * (targetShape(config, t).in + targetShape(config, t).out), 0) *
    config.numLayers;
  assert.equal(m.trainStateBytes, 4 * 4 * loraFloats);
  assert.ok(m.trainBytesPerToken > 0);

  const samples: Sample[] = (await Deno.readTextFile(`${dir}/samples.jsonl`)).trim().split("\n")
    .map((l) => JSON.parse(l));
  assert.equal(profile.fit.samples, samples.length);
  const alone = (kind: string) =>
    samples.filter((s) =>
      s.shape.finetune?.kind === kind && s.shape.prefillTokens + s.shape.decodeSeqs === 0
    );
  const withServing = (kind: string) =>
    samples.filter((s) =>
      s.shape.finetune?.kind === kind && s.shape.prefillTokens + s.shape.decodeSeqs > 0
    );
  for (const kind of ["reference", "forward", "backward", "optimizer"]) {
    assert.ok(alone(kind).length >= 2, `${kind} slices alone`);
    assert.ok(withServing(kind).length >= 2, `${kind} slices next to serving`);
  }
  assert.ok(
    alone("backward").some((s) => s.shape.finetune!.head) &&
      alone("backward").some((s) => !s.shape.finetune!.head),
  );
  const serving = samples.filter((s) => !s.shape.finetune);
  assert.ok(
    serving.some((s) => s.shape.decodeSeqs > 1) && serving.some((s) => s.shape.prefillTokens >= 32),
  );
  for (const s of samples) assert.ok(s.ms > 0 && Number.isFinite(s.ms), s.label);

  // The reported fit error is the error of the scheduler's own cost model on these samples.
  const model = new CostModel(profile, { online: false });
  let abs = 0, rel = 0;
  for (const s of samples) {
    const err = Math.abs(model.predictMs(s.shape) - s.ms);
    abs += err;
    rel += err / s.ms;
  }
  assertClose(
    [profile.fit.meanAbsErrorMs, profile.fit.meanAbsPercentError],
    [abs / samples.length, rel / samples.length],
    { rtol: 1e-9 },
    "fit error",
  );
  // And the fit explains the samples: it errs less than one constant for every iteration.
  const sorted = samples.map((s) => s.ms).sort((a, b) => a - b);
  const median = sorted[sorted.length >> 1];
  const constantError = samples.reduce((e, s) => e + Math.abs(s.ms - median), 0) / samples.length;
  assert.ok(
    profile.fit.meanAbsErrorMs < 0.7 * constantError,
    `fit error ${profile.fit.meanAbsErrorMs.toFixed(2)} ms vs ${
      constantError.toFixed(2)
    } ms for a constant`,
  );

  // The table goes to stderr with --json: every coefficient and the fit error.
  for (const f of FEATURES) assert.match(stderr, new RegExp(`^${f} `, "m"));
  assert.match(
    stderr,
    new RegExp(`^all +${samples.length} +${profile.fit.meanAbsErrorMs.toFixed(2)} `, "m"),
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("cli: profile rejects bad flags with a named error before touching the GPU", async () => {
  for (
    const [flags, message] of [
      [["--repeats", "0"], /InvalidRequestError: --repeats 0 is not a valid value/],
      [["--backend", "cuda"], /InvalidRequestError: --backend cuda: expected auto, wgpu or dawn/],
      [
        ["--targets", "q,x"],
        /InvalidRequestError: unknown LoRA target "x"; valid targets: q, k, v, o, gate, up, down/,
      ],
      [["--frobnicate"], /InvalidRequestError: profile: .*frobnicate/],
    ] as const
  ) {
    const { code, stderr } = await mace("profile", ...flags);
    assert.equal(code, 1, stderr);
    assert.match(stderr, message);
  }
});

Deno.test("profiles: names, the shipped default, named errors for bad files", async () => {
  assert.equal(deviceSlug("llvmpipe (LLVM 15.0.6, 256 bits) / 65541 / 0"), "lavapipe");
  assert.equal(
    deviceSlug("SwiftShader driver 5.0.0 / google / swiftshader / swiftshader-device-subzero"),
    "swiftshader",
  );
  assert.equal(
    deviceSlug("NVIDIA GeForce RTX 4090 / nvidia / lovelace"),
    "nvidia-geforce-rtx-4090",
  );
  assert.equal(deviceSlug("Apple M2 (Metal)"), "apple-m2");
  assert.equal(modelName("/x/models/stories260K/"), "stories260K");
  assert.equal(modelName("ckpt/stories15M.bin"), "stories15M");
  assert.equal(profilePath("lavapipe", "stories260K"), `${PROFILES_DIR}lavapipe--stories260K.json`);
  assert.equal(DEFAULT_PROFILE, profilePath("lavapipe", modelName(ROOT + "models/stories260K")));
  assert.equal(DEFAULT_PROFILE, ROOT + "profiles/lavapipe--stories260K.json");

  // The shipped profile of the bundled model is a real measurement that validates.
  const shipped: CostProfile = await loadProfile(DEFAULT_PROFILE);
  assert.equal(shipped.model, "stories260K");
  assert.match(shipped.device, /llvmpipe/);
  assert.ok(shipped.fit.samples > 100 && shipped.fit.meanAbsPercentError < 0.5);

  const dir = await Deno.makeTempDir({ prefix: "mace-profiles-" });
  await assert.rejects(loadProfile(`${dir}/none.json`), (e: unknown) => {
    assert.ok(e instanceof ProfileNotFoundError && e instanceof ProfileFormatError);
    assert.match(
      e.message,
      /none\.json: no cost profile here; measure one .*deno task mace profile --out /,
    );
    return true;
  });
  await Deno.writeTextFile(`${dir}/bad.json`, "{ not json");
  await assert.rejects(loadProfile(`${dir}/bad.json`), (e: unknown) => {
    assert.ok(e instanceof ProfileFormatError && !(e instanceof ProfileNotFoundError));
    assert.match(e.message, /bad\.json: not JSON/);
    return true;
  });
  await Deno.writeTextFile(
    `${dir}/old.json`,
    JSON.stringify({ ...shipped, schema: "mace.profile.v0" }),
  );
  await assert.rejects(loadProfile(`${dir}/old.json`), /old\.json: schema is "mace\.profile\.v0"/);
  await Deno.remove(dir, { recursive: true });
});
