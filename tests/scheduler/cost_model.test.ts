/**
 * The cost model without a GPU:
 *  - fitCoefficients recovers known coefficients from exact linear data over every feature (odd
 *    sizes), keeps coefficients >= 0, leaves features no sample exercises at 0, and minimizes
 *    relative (not absolute) error;
 *  - CostModel online follows a device that got slower to within a few percent, while the offline
 *    model keeps its profile's error; its error bookkeeping adds up;
 *  - a long stretch without fine-tuning leaves the fine-tuning coefficients exactly at the
 *    profile's while the serving ones follow the device;
 *  - validateProfile rejects each bad field with ProfileFormatError naming it;
 *  - shapeOfPlan counts prefill tokens, decodes and query-key pairs exactly for a hand-built plan
 *    (pruned slots included); finetuneShape for every slice kind.
 */
import assert from "node:assert/strict";
import {
  CostModel,
  type CostProfile,
  type CostSample,
  type Feature,
  FEATURES,
  features,
  finetuneShape,
  fitCoefficients,
  shapeOfPlan,
  type StepShape,
  validateProfile,
} from "../../src/scheduler/cost_model.ts";
import { ProfileFormatError } from "../../src/engine/errors.ts";
import { GREEDY, type StepPlan } from "../../src/engine/step.ts";
import { planDpoSlices } from "../../src/engine/training/slice_plan.ts";
import { rng } from "../../src/engine/training/seeded_random.ts";
import { assertClose } from "../helpers/tolerance.ts";

/** Coefficients of a plausible small device, none round, every one different. */
const TRUTH: Record<Feature, number> = {
  iteration: 13.7,
  prefillTokens: 0.913,
  decodeSeqs: 2.31,
  attentionKPairs: 0.177,
  ftSlice: 21.9,
  ftReferenceTokens: 1.07,
  ftForwardTokens: 1.43,
  ftBackwardTokens: 2.71,
  ftHeadTokens: 0.29,
  ftOptimizer: 3.3,
};

const KINDS = ["reference", "forward", "backward", "optimizer"] as const;

/** Random shapes: serving alone, each slice kind alone, and both together; odd sizes throughout. */
function randomShapes(count: number, seed: number, finetune = true): StepShape[] {
  const r = rng(seed);
  const int = (n: number) => Math.floor(r() * n);
  return Array.from({ length: count }, (_, i) => {
    const serving = !finetune || i % 3 !== 1;
    const shape: StepShape = serving
      ? { prefillTokens: 2 * int(150) + 1, decodeSeqs: int(17), attentionPairs: 1 + int(40_000) }
      : { prefillTokens: 0, decodeSeqs: 0, attentionPairs: 0 };
    if (finetune && i % 3 !== 0) {
      const kind = KINDS[int(4)];
      const layers = 1 + int(5);
      shape.finetune = kind === "optimizer" ? { kind, tokens: 0, depthShare: 0, head: false } : {
        kind,
        tokens: 2 * (3 + int(125)) + 1,
        depthShare: kind === "backward" ? layers / 5 : 1,
        head: kind === "backward" && r() < 0.5,
      };
    }
    return shape;
  });
}

function dot(shape: StepShape, c: Record<Feature, number>): number {
  const x = features(shape);
  return FEATURES.reduce((s, f, i) => s + x[i] * c[f], 0);
}

/**
 * Each coefficient within `rtol` of its own value. fitCoefficients' default ridge (1e-6 of each
 * feature's scale) leaks up to ~1e-4 into indicator coefficients correlated with large features.
 */
function assertEachClose(
  actual: Record<Feature, number>,
  expected: Record<Feature, number>,
  names: readonly Feature[],
  rtol: number,
) {
  for (const f of names) assertClose([actual[f]], [expected[f]], { rtol }, f);
}

function profileWith(coefficients: Record<Feature, number>): CostProfile {
  return {
    schema: "mace.profile.v1",
    device: "synthetic",
    model: "synthetic",
    numLayers: 5,
    maxContext: 512,
    coefficients: { ...coefficients },
    memory: {
      kvBytesPerToken: 1280,
      blockSize: 16,
      kvBlocks: 512,
      trainBytesPerToken: 2048,
      trainStateBytes: 40_000,
    },
    fit: { samples: 100, meanAbsErrorMs: 3, meanAbsPercentError: 0.05 },
    measuredAt: "2026-11-23T00:00:00.000Z",
  };
}

Deno.test("fitCoefficients recovers known coefficients from exact data on every feature", () => {
  const samples: CostSample[] = randomShapes(120, 1).map((shape) => ({
    shape,
    ms: dot(shape, TRUTH),
  }));
  // Every feature is exercised, and the head is separable from the backward depth.
  for (const [i, f] of FEATURES.entries()) {
    assert.ok(samples.some((s) => features(s.shape)[i] !== 0), `feature ${f} exercised`);
  }
  assertEachClose(fitCoefficients(samples), TRUTH, FEATURES, 1e-3);
  // Without the ridge the solution is exact up to rounding.
  assertEachClose(fitCoefficients(samples, 1e-14), TRUTH, FEATURES, 1e-8);
});

Deno.test("fitCoefficients keeps coefficients >= 0, unexercised features at 0", () => {
  // A truth no device has (decodes that save time): the best non-negative fit puts 0 there.
  const odd = { ...TRUTH, decodeSeqs: -4 };
  const samples = randomShapes(90, 2).map((shape) => ({ shape, ms: dot(shape, odd) }));
  const fit = fitCoefficients(samples);
  for (const f of FEATURES) assert.ok(fit[f] >= 0, `${f} = ${fit[f]}`);
  assert.equal(fit.decodeSeqs, 0);

  // Serving only: the fine-tuning coefficients have no data and stay 0; the rest are exact.
  const serving = randomShapes(40, 3, false).map((shape) => ({ shape, ms: dot(shape, TRUTH) }));
  const fit2 = fitCoefficients(serving);
  for (const f of FEATURES.filter((f) => f.startsWith("ft"))) assert.equal(fit2[f], 0, f);
  assertEachClose(
    fit2,
    TRUTH,
    ["iteration", "prefillTokens", "decodeSeqs", "attentionKPairs"],
    1e-3,
  );
});

Deno.test("fitCoefficients minimizes relative error: 20 and 30 ms fit at 300/13 ms", () => {
  // Σ ((p − y) / y)² is least at p = Σ(1/y) / Σ(1/y²) = (1/20 + 1/30) / (1/400 + 1/900) = 300/13;
  // absolute least squares would say 25.
  const decode: StepShape = { prefillTokens: 0, decodeSeqs: 1, attentionPairs: 0 };
  const prefill: StepShape = { prefillTokens: 100, decodeSeqs: 0, attentionPairs: 0 };
  const fit = fitCoefficients([
    { shape: decode, ms: 20 },
    { shape: decode, ms: 30 },
    { shape: prefill, ms: 400 },
  ], 0);
  assertClose([fit.iteration + fit.decodeSeqs], [300 / 13], { rtol: 1e-9 }, "decode step");
  assertClose([fit.iteration + 100 * fit.prefillTokens], [400], { rtol: 1e-9 }, "prefill step");
});

Deno.test("CostModel online follows a slower device; offline keeps the profile's error", () => {
  // The device is now 40% slower per token and has 6 ms more fixed cost per iteration.
  const slower: Record<Feature, number> = Object.fromEntries(
    FEATURES.map((f) => [f, f === "iteration" ? TRUTH[f] + 6 : TRUTH[f] * 1.4]),
  ) as Record<Feature, number>;
  const online = new CostModel(profileWith(TRUTH));
  const offline = new CostModel(profileWith(TRUTH), { online: false });
  const steps = randomShapes(400, 4);
  for (const shape of steps) {
    online.observe(shape, dot(shape, slower));
    offline.observe(shape, dot(shape, slower));
  }
  const relError = (model: CostModel) => {
    const fresh = randomShapes(200, 5);
    return fresh.reduce(
      (s, shape) => s + Math.abs(model.predictMs(shape) / dot(shape, slower) - 1),
      0,
    ) / fresh.length;
  };
  // The pull toward the profile (20 observations against ~200 remembered ones) leaves a small bias.
  assert.ok(relError(online) < 0.05, `online relative error ${relError(online)}`);
  assert.ok(relError(offline) > 0.25, `offline relative error ${relError(offline)}`);

  const e = offline.error;
  assert.equal(e.steps, 400);
  const measured = steps.reduce((s, x) => s + dot(x, slower), 0);
  const predicted = steps.reduce((s, x) => s + dot(x, TRUTH), 0);
  assertClose([e.totalBias!], [predicted / measured - 1], { rtol: 1e-9 }, "offline bias");
  assertClose(
    [e.meanAbsErrorMs!],
    [steps.reduce((s, x) => s + Math.abs(dot(x, slower) - dot(x, TRUTH)), 0) / 400],
    { rtol: 1e-9 },
    "offline mean abs error",
  );
  assert.ok(
    online.error.meanAbsErrorMs! < e.meanAbsErrorMs! / 3,
    "online learns, so it errs less over the run",
  );
  for (const v of Object.values(online.coefficients)) assert.ok(v >= 0);
});

Deno.test("CostModel: long without fine-tuning, its coefficients stay the profile's", () => {
  // Serving steps measured 10% slower than the profile: the serving coefficients move, the
  // fine-tuning ones (no data) must not drift, however long fine-tuning stays away.
  const model = new CostModel(profileWith(TRUTH));
  for (const shape of randomShapes(1000, 6, false)) model.observe(shape, dot(shape, TRUTH) * 1.1);
  for (const f of FEATURES.filter((f) => f.startsWith("ft"))) {
    assert.equal(model.coefficients[f], TRUTH[f], f);
  }
  const serving = randomShapes(50, 7, false);
  const rel =
    serving.reduce((s, x) => s + Math.abs(model.predictMs(x) / (1.1 * dot(x, TRUTH)) - 1), 0) / 50;
  assert.ok(
    rel < 0.02,
    `serving predictions within ${(100 * rel).toFixed(2)}% of the slower device`,
  );
});

Deno.test("validateProfile accepts a valid profile; each bad field is a ProfileFormatError", () => {
  const good = profileWith(TRUTH);
  assert.equal(validateProfile(structuredClone(good), "good.json").model, "synthetic");
  const cases: [string, (p: Record<string, unknown>) => void, RegExp][] = [
    ["schema", (p) => (p.schema = "mace.profile.v0"), /schema/],
    ["device", (p) => delete p.device, /"device"/],
    ["model", (p) => (p.model = 7), /"model"/],
    ["measuredAt", (p) => (p.measuredAt = null), /"measuredAt"/],
    ["numLayers", (p) => (p.numLayers = 0), /"numLayers"/],
    ["numLayers", (p) => (p.numLayers = 2.5), /"numLayers"/],
    ["maxContext", (p) => delete p.maxContext, /"maxContext"/],
    ["coefficients", (p) => delete p.coefficients, /"coefficients"/],
    ["memory", (p) => (p.memory = "lots"), /"memory"/],
    ["fit", (p) => delete p.fit, /"fit"/],
    ["fit.samples", (p) => ((p.fit as Record<string, unknown>).samples = -1), /fit\.samples/],
    [
      "fit.meanAbsErrorMs",
      (p) => ((p.fit as Record<string, unknown>).meanAbsErrorMs = "3"),
      /fit\.meanAbsErrorMs/,
    ],
    [
      "fit.meanAbsPercentError",
      (p) => ((p.fit as Record<string, unknown>).meanAbsPercentError = NaN),
      /fit\.meanAbsPercentError/,
    ],
    ...FEATURES.flatMap((f): [string, (p: Record<string, unknown>) => void, RegExp][] => [
      [
        `coefficient ${f} missing`,
        (p) => delete (p.coefficients as Record<string, unknown>)[f],
        new RegExp(`"${f}"`),
      ],
      [
        `coefficient ${f} infinite`,
        (p) => ((p.coefficients as Record<string, unknown>)[f] = Infinity),
        new RegExp(`"${f}"`),
      ],
      [
        `coefficient ${f} negative`,
        (p) => ((p.coefficients as Record<string, unknown>)[f] = -0.5),
        new RegExp(`"${f}"`),
      ],
    ]),
    ...["kvBytesPerToken", "blockSize", "kvBlocks", "trainBytesPerToken", "trainStateBytes"].map(
      (key): [string, (p: Record<string, unknown>) => void, RegExp] => [
        `memory.${key}`,
        (p) => ((p.memory as Record<string, unknown>)[key] = -1),
        new RegExp(`memory\\.${key}`),
      ],
    ),
  ];
  for (const [name, spoil, names] of cases) {
    const p = structuredClone(good) as unknown as Record<string, unknown>;
    spoil(p);
    assert.throws(() => validateProfile(p, "bad.json"), (e: unknown) => {
      assert.ok(e instanceof ProfileFormatError, `${name}: ${e}`);
      assert.match(e.message, names, name);
      assert.match(e.message, /^bad\.json: .*mace profile/, name);
      return true;
    }, name);
  }
  for (const value of [null, 42, "profile", []]) {
    assert.throws(() => validateProfile(value), ProfileFormatError, JSON.stringify(value));
  }
});

Deno.test("shapeOfPlan counts prefill tokens, decodes and query-key pairs exactly", () => {
  const seq = (tokens: number, startPosition: number, sample: boolean, startSlot?: number) => ({
    seqId: startPosition,
    tokens: Array.from({ length: tokens }, (_, i) => i + 3),
    startPosition,
    startSlot,
    blockTable: [0, 1, 2, 3],
    sample,
    sampling: GREEDY,
  });
  const plan: StepPlan = {
    sequences: [
      seq(5, 0, false), // a prompt's first chunk: keys 1..5 -> 15 pairs
      seq(1, 9, true), // a decode at position 9: 10 keys
      seq(3, 20, true, 12), // a chunk after pruning (slots 12..14): 13 + 14 + 15 = 42
      seq(1, 4, false), // a one-token chunk that does not sample is prefill: 5 keys
      seq(1, 0, true), // a one-token prompt that samples is a decode: 1 key
    ],
  };
  const ft = { kind: "forward" as const, tokens: 40, depthShare: 1, head: false };
  assert.deepEqual(shapeOfPlan(plan, ft), {
    prefillTokens: 9,
    decodeSeqs: 2,
    attentionPairs: 73,
    finetune: ft,
  });
  assert.deepEqual(shapeOfPlan(null), {
    prefillTokens: 0,
    decodeSeqs: 0,
    attentionPairs: 0,
    finetune: undefined,
  });
  // Features: one iteration, the attention in thousands, the slice's tokens on its own kind only.
  assert.deepEqual(features(shapeOfPlan(plan, ft)), [1, 9, 2, 0.073, 1, 0, 40, 0, 0, 0]);
  assert.deepEqual(features(shapeOfPlan(null, ft)), [0, 0, 0, 0, 1, 0, 40, 0, 0, 0]);
});

Deno.test("finetuneShape: each kind's slices cover the depth once, one with the head", () => {
  // Whole-depth slices as the planner makes them (one slice per kind).
  const [reference, forward, backward, optimizer] = planDpoSlices([false], 5, 5);
  assert.deepEqual(finetuneShape(reference, 90, 5), {
    kind: "reference",
    tokens: 90,
    depthShare: 1,
    head: true,
  });
  assert.deepEqual(finetuneShape(forward, 90, 5), {
    kind: "forward",
    tokens: 90,
    depthShare: 1,
    head: true,
  });
  assert.deepEqual(finetuneShape(backward, 90, 5), {
    kind: "backward",
    tokens: 90,
    depthShare: 1,
    head: true,
  });
  assert.deepEqual(finetuneShape(optimizer, 90, 5), {
    kind: "optimizer",
    tokens: 0,
    depthShare: 0,
    head: false,
  });
  assert.deepEqual(
    finetuneShape({ kind: "forward", pair: 0, fromLayer: 0, toLayer: 2 }, 90, 5),
    { kind: "forward", tokens: 90, depthShare: 0.4, head: false },
  );
  assert.deepEqual(
    finetuneShape({ kind: "reference", pair: 0, fromLayer: 4, toLayer: 5 }, 90, 5),
    { kind: "reference", tokens: 90, depthShare: 0.2, head: true },
  );
  assert.deepEqual(
    finetuneShape({ kind: "backward", pair: 0, fromLayer: 5, toLayer: 3 }, 90, 5),
    { kind: "backward", tokens: 90, depthShare: 0.4, head: true },
  );
  assert.deepEqual(
    finetuneShape({ kind: "backward", pair: 0, fromLayer: 3, toLayer: 0 }, 90, 5),
    { kind: "backward", tokens: 90, depthShare: 0.6, head: false },
  );
  // Features: a slice's tokens times its depth on its own kind, its tokens again on the head.
  const x = features({
    prefillTokens: 0,
    decodeSeqs: 0,
    attentionPairs: 0,
    finetune: finetuneShape(backward, 90, 5),
  });
  assert.deepEqual(x, [0, 0, 0, 0, 1, 0, 0, 90, 90, 0]);
  for (const layersPerSlice of [1, 2, 3, 5]) {
    const slices = planDpoSlices([false], 5, layersPerSlice);
    for (const kind of ["reference", "forward", "backward"] as const) {
      const shapes = slices.filter((s) => s.kind === kind).map((s) => finetuneShape(s, 90, 5));
      assertClose(
        [shapes.reduce((s, b) => s + b.depthShare, 0)],
        [1],
        { rtol: 1e-12 },
        `${kind} depth, ${layersPerSlice} per slice`,
      );
      assert.equal(shapes.filter((b) => b.head).length, 1, `${kind}: one slice runs the head`);
      // The head runs after the layers going up (reference, forward), before them going down.
      assert.ok((kind === "backward" ? shapes[0] : shapes.at(-1)!).head, `${kind}: head slice`);
    }
  }
});

Deno.test("CostModel: after long without fine-tuning, an outlier slice moves it little", () => {
  // Fine-tuning seen regularly, then 1000 serving-only steps, then one forward slice measured at
  // twice its prediction: the profile keeps the weight of `priorWeight` typical slices, so the
  // slice's prediction moves a small share of the way, not (as with plain forgetting) most of it.
  const model = new CostModel(profileWith(TRUTH));
  for (const shape of randomShapes(300, 8)) model.observe(shape, dot(shape, TRUTH));
  for (const shape of randomShapes(1000, 9, false)) model.observe(shape, dot(shape, TRUTH));
  const slice: StepShape = {
    prefillTokens: 0,
    decodeSeqs: 0,
    attentionPairs: 0,
    finetune: { kind: "forward", tokens: 201, depthShare: 1, head: true },
  };
  const before = model.predictMs(slice);
  model.observe(slice, 2 * before);
  const moved = (model.predictMs(slice) - before) / before;
  assert.ok(moved < 0.15, `moved ${(100 * moved).toFixed(1)}% of the way to the outlier`);
});
