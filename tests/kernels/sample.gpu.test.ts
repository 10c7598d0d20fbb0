import assert from "node:assert/strict";
import { packSamplingParams, Sampler, type SamplingRow } from "../../src/engine/kernels/sample.ts";
import {
  greedyToken,
  keepSet,
  sampleToken,
  sampleTokens,
  samplingUniform,
} from "../reference/sampling.ts";
import { InvalidRequestError } from "../../src/engine/errors.ts";
import {
  createStorage,
  createUniform,
  packUniform,
  readU32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import type { GpuContext } from "../../src/engine/gpu/context.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { randn, rng } from "../helpers/random.ts";

/**
 * A float32 kernel and the float64 reference may disagree only when a draw or a
 * top-p target lies within rounding of a cumulative-mass boundary: a few 1e-6 of
 * the total here (f32 sums of at most 5000 / 8 weights, exp within a few ulp).
 * Test rows are moved (counter, then topP) until they are this far from one.
 */
const BOUNDARY_MARGIN = 1e-5;

async function sample(
  ctx: GpuContext,
  logits: Float32Array,
  rows: readonly SamplingRow[],
  threads?: number,
): Promise<Uint32Array> {
  const vocab = logits.length / rows.length;
  const sampler = new Sampler(ctx, vocab, { threads });
  const tokens = createStorage(ctx, rows.length * 4, "tokens");
  const group = sampler.bind(
    createUniform(ctx, packUniform([["u32", rows.length]]), "params"),
    uploadStorage(ctx, logits, "logits"),
    uploadStorage(ctx, packSamplingParams(rows), "sampling"),
    tokens,
  );
  runPass(ctx, (pass) => sampler.encode(pass, group, rows.length));
  return await readU32(ctx, tokens, rows.length);
}

const GREEDY: SamplingRow = { temperature: 0, topK: 0, topP: 1, seed: 0, counter: 0 };

/** Logits rounded to multiples of `step`: many exact ties, also at top-k/top-p cuts. */
function quantised(n: number, seed: number, std: number, step: number): Float32Array {
  return randn(n, seed, std).map((x) => Math.round(x / step) * step);
}

for (const vocab of [1, 7, 512, 4099, 49152]) {
  Deno.test({
    name: `sample: greedy is the argmax, ties to the lowest index, V=${vocab}`,
    ...gpuTest,
  }, async () => {
    const ctx = await testContext();
    const rows = 4;
    const logits = randn(rows * vocab, vocab, 2);
    const expected: number[] = [];
    // Row 0: the maximum planted twice. Row 1: all equal. Row 2: -0 then +0 above
    // negative logits (equal values, so the first wins). Row 3: plain random.
    const [a, b] = [Math.floor(vocab / 3), Math.floor((2 * vocab) / 3)];
    logits[a] = logits[b] = 100;
    expected.push(a);
    logits.fill(-1.5, vocab, 2 * vocab);
    expected.push(0);
    logits.fill(-3, 2 * vocab, 3 * vocab);
    logits[2 * vocab + b] = -0;
    logits[2 * vocab + vocab - 1] = 0;
    expected.push(b);
    expected.push(greedyToken(logits.subarray(3 * vocab)));
    const options = [GREEDY, { ...GREEDY, temperature: -1 }, GREEDY, GREEDY];
    assert.deepEqual(Array.from(await sample(ctx, logits, options)), expected);
  });
}

Deno.test({ name: "sample: topK=1 equals greedy at any temperature", ...gpuTest }, async () => {
  const ctx = await testContext();
  const vocab = 513;
  const settings = [[0.05, 1], [1, 1], [10, 0.5], [1000, 0.1]];
  const logits = quantised(settings.length * vocab, 11, 1, 0.25); // tied maxima are likely
  const rows = settings.map(([temperature, topP], s) => ({
    temperature,
    topK: 1,
    topP,
    seed: 5,
    counter: s,
  }));
  const expected = rows.map((_, s) => greedyToken(logits.subarray(s * vocab, (s + 1) * vocab)));
  assert.deepEqual(Array.from(await sample(ctx, logits, rows)), expected);
});

/** The nearest options (lower topP, then next counters) whose draw is away from boundaries. */
function awayFromBoundaries(logits: Float32Array, options: SamplingRow): SamplingRow {
  let moved = { ...options };
  while (moved.temperature > 0 && keepSet(logits, moved).margin < BOUNDARY_MARGIN) {
    moved = { ...moved, topP: moved.topP - 0.001 };
  }
  while (sampleToken(logits, moved).margin < BOUNDARY_MARGIN) {
    moved = { ...moved, counter: moved.counter + 1 };
  }
  return moved;
}

/**
 * Rows covering temperature x topK x topP, with seeds and counters from a seeded
 * stream, each moved away from float32-vs-float64 boundaries.
 */
function referenceRows(logits: Float32Array, vocab: number, seed: number): SamplingRow[] {
  const next = rng(seed);
  const temperatures = [0.3, 0.7, 1, 1.8];
  const topKs = [0, 2, 5, 40, vocab - 1, vocab];
  const topPs = [1, 0.95, 0.8, 0.5, 0.1];
  return Array.from(
    { length: logits.length / vocab },
    (_, s) =>
      awayFromBoundaries(logits.subarray(s * vocab, (s + 1) * vocab), {
        temperature: temperatures[s % temperatures.length],
        topK: topKs[Math.floor(s / 4) % topKs.length],
        topP: topPs[Math.floor(s / 24) % topPs.length],
        seed: Math.floor(next() * 2 ** 32),
        counter: Math.floor(next() * 1000),
      }),
  );
}

// Thread counts: the adapter's default (8 on CPU-emulated GPUs), an odd count
// (uneven slices and fold groups) and the real-GPU default, 128 (several fold steps).
const referenceCases: [number, number, (number | undefined)[]][] = [
  [10, 240, [undefined]],
  [513, 240, [undefined, 13, 128]],
  [5000, 72, [undefined]],
];
for (const [vocab, count, threadOptions] of referenceCases) {
  Deno.test({ name: `sample: matches the CPU reference, V=${vocab}`, ...gpuTest }, async () => {
    const ctx = await testContext();
    // Even rows: continuous logits of growing spread; odd rows: quantised ones (ties).
    const logits = new Float32Array(count * vocab);
    for (let s = 0; s < count; s++) {
      const row = s % 2 === 0
        ? randn(vocab, 1000 + s, 1 + (s % 5))
        : quantised(vocab, 1000 + s, 2, 0.5);
      logits.set(row, s * vocab);
    }
    const rows = referenceRows(logits, vocab, vocab);
    const expected = sampleTokens(logits, rows).map((sampled) => sampled.token);
    for (const threads of threadOptions) {
      const tokens = Array.from(await sample(ctx, logits, rows, threads));
      for (let s = 0; s < count; s++) {
        assert.equal(
          tokens[s],
          expected[s],
          `threads ${threads} row ${s} ${JSON.stringify(rows[s])}`,
        );
      }
    }
  });
}

/**
 * Draws `draws` tokens from one row (same logits and seed, counters 0..draws-1) and
 * checks the counts against the expected probabilities with a chi-square test at
 * significance 0.001 (deterministic: the draws are seeded).
 */
async function checkFrequencies(
  logits: number[],
  options: Omit<SamplingRow, "counter">,
  degreesOfFreedom: number,
  critical: number,
) {
  const ctx = await testContext();
  const vocab = logits.length;
  const draws = 2000;
  const row = Float32Array.from(logits);
  const all = new Float32Array(draws * vocab);
  for (let s = 0; s < draws; s++) all.set(row, s * vocab);
  const rows = Array.from({ length: draws }, (_, counter) => ({ ...options, counter }));
  const tokens = await sample(ctx, all, rows);
  const keep = keepSet(row, { ...options, counter: 0 });
  assert.equal(keep.tokens.length - 1, degreesOfFreedom, "test setting: kept tokens");
  const mass = keep.tokens.reduce((sum, i) => sum + keep.weights[i], 0);
  const counts = new Array(vocab).fill(0);
  for (const t of tokens) counts[t]++;
  let chiSquare = 0;
  for (let i = 0; i < vocab; i++) {
    if (!keep.tokens.includes(i)) {
      assert.equal(counts[i], 0, `token ${i} is outside the keep set`);
      continue;
    }
    const expected = (draws * keep.weights[i]) / mass;
    chiSquare += (counts[i] - expected) ** 2 / expected;
  }
  assert.ok(
    chiSquare < critical,
    `chi-square ${chiSquare.toFixed(2)} >= ${critical} (counts ${counts})`,
  );
}

Deno.test({
  name: "sample: 2000 draws follow softmax(logits / T) (chi-square, df 6, p 0.001)",
  ...gpuTest,
}, async () => {
  // 22.458: chi-square critical value, 6 degrees of freedom, significance 0.001.
  const options = { temperature: 1.3, topK: 0, topP: 1, seed: 2024 };
  await checkFrequencies([1.2, 0.3, -0.4, 0.3, 2.0, -1.0, 0.8], options, 6, 22.458);
});

Deno.test({
  name:
    "sample: 2000 draws follow the top-k/top-p renormalised distribution (chi-square, df 3, p " +
    "0.001)",
  ...gpuTest,
}, async () => {
  // topK 6 drops token 5; at T 0.9 the first four of the rest (indices 4, 0, 6, 1)
  // hold 0.896 of their mass, so topP 0.85 keeps those four: the cut falls between
  // the tied 0.3s at indices 1 and 3. 16.266: chi-square critical value, 3 degrees
  // of freedom, significance 0.001.
  const options = { temperature: 0.9, topK: 6, topP: 0.85, seed: 99 };
  await checkFrequencies([1.2, 0.3, -0.4, 0.3, 2.0, -1.0, 0.8], options, 3, 16.266);
});

Deno.test(
  { name: "sample: top-p draws stay inside the reference keep set", ...gpuTest },
  async () => {
    const ctx = await testContext();
    const vocab = 513;
    const draws = 300;
    for (const [temperature, topP, std] of [[0.7, 0.3, 2], [1.5, 0.8, 1], [1, 0.95, 3]]) {
      const row = randn(vocab, Math.round(topP * 100), std);
      const logits = new Float32Array(draws * vocab);
      for (let s = 0; s < draws; s++) logits.set(row, s * vocab);
      const options = { temperature, topK: 0, topP, seed: 3 };
      const keep = keepSet(row, { ...options, counter: 0 });
      assert.ok(keep.margin >= BOUNDARY_MARGIN, "test setting: top-p target away from a boundary");
      const allowed = new Set(keep.tokens);
      const tokens = await sample(
        ctx,
        logits,
        Array.from({ length: draws }, (_, counter) => ({ ...options, counter })),
      );
      for (const t of tokens) {
        assert.ok(
          allowed.has(t),
          `token ${t} outside the top-p=${topP} keep set`,
        );
      }
      const distinct = new Set(tokens).size;
      assert.ok(
        distinct > Math.min(keep.tokens.length, 20) / 2,
        `only ${distinct} distinct tokens of ${keep.tokens.length}`,
      );
    }
  },
);

Deno.test({
  name: "sample: deterministic, and a row's token does not depend on its batch",
  ...gpuTest,
}, async () => {
  const ctx = await testContext();
  const vocab = 513;
  const batch = 5;
  const logits = new Float32Array(batch * vocab);
  for (let s = 0; s < batch; s++) {
    logits.set(s % 2 ? quantised(vocab, 70 + s, 2, 0.5) : randn(vocab, 70 + s, 2), s * vocab);
  }
  const rows: SamplingRow[] = [
    { temperature: 1, topK: 0, topP: 1, seed: 1, counter: 0 },
    { temperature: 0.8, topK: 50, topP: 1, seed: 2, counter: 17 },
    { temperature: 1.2, topK: 0, topP: 0.9, seed: 3, counter: 4 },
    { temperature: 0.6, topK: 40, topP: 0.95, seed: 4, counter: 99 },
    { temperature: 0, topK: 0, topP: 1, seed: 5, counter: 1 },
  ];
  const first = await sample(ctx, logits, rows);
  assert.deepEqual(await sample(ctx, logits, rows), first, "same inputs, same tokens");
  for (let s = 0; s < batch; s++) {
    const alone = await sample(ctx, logits.slice(s * vocab, (s + 1) * vocab), [rows[s]]);
    assert.equal(alone[0], first[s], `row ${s} alone vs in a batch of ${batch}`);
  }
});

Deno.test("sample: the draw's uniform number lies in [0, 1) and spreads over counters", () => {
  const values = Array.from({ length: 1000 }, (_, i) => samplingUniform(12345, i));
  assert.ok(values.every((u) => u >= 0 && u < 1));
  assert.equal(new Set(values).size, 1000);
  assert.notEqual(samplingUniform(1, 2), samplingUniform(2, 1));
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  assert.ok(Math.abs(mean - 0.5) < 0.03, `mean ${mean}`);
});

Deno.test("packSamplingParams: 32-byte rows in WGSL field order, bad values rejected", () => {
  const bytes = packSamplingParams([
    { temperature: 0.5, topK: 40, topP: 0.9, seed: 0xdeadbeef, counter: 7 },
    { temperature: 0, topK: 0, topP: 2, seed: 0, counter: 0 },
  ]);
  assert.equal(bytes.byteLength, 64);
  const view = new DataView(bytes.buffer);
  assert.equal(view.getFloat32(0, true), 0.5);
  assert.equal(view.getUint32(4, true), 40);
  assert.equal(view.getFloat32(8, true), Math.fround(0.9));
  assert.equal(view.getUint32(12, true), 0xdeadbeef);
  assert.equal(view.getUint32(16, true), 7);
  assert.equal(view.getFloat32(32 + 8, true), 1, "topP above 1 means no limit");
  const ok = { temperature: 1, topK: 0, topP: 1, seed: 0, counter: 0 };
  const bads: Partial<SamplingRow>[] = [
    { temperature: NaN },
    { topK: -1 },
    { topK: 1.5 },
    { topP: 0 },
    { topP: NaN },
    { seed: 2 ** 32 },
    { counter: -1 },
  ];
  for (const bad of bads) {
    assert.throws(
      () => packSamplingParams([{ ...ok, ...bad }]),
      InvalidRequestError,
      JSON.stringify(bad),
    );
  }
});
