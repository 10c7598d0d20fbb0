import { KvCompact, type KvCompactShape } from "../../src/engine/kernels/kv_compact.ts";
import { kvCompactReference } from "../reference/kv_pruning_kernels.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { randn, rng } from "../helpers/random.ts";
import { AssertionError, ok, throws } from "node:assert";

/** Odd sizes: block sizes 5 and 7, head dims 8, 64 and 72, 1-3 kv heads. */
const CONFIGS: { shape: KvCompactShape; numBlocks: number }[] = [
  { shape: { numKvHeads: 3, headDim: 8, blockSize: 5 }, numBlocks: 41 },
  { shape: { numKvHeads: 2, headDim: 72, blockSize: 16 }, numBlocks: 13 },
  { shape: { numKvHeads: 1, headDim: 64, blockSize: 7 }, numBlocks: 23 },
];

/** Layers compacted in one pass (sharing the scratch), then the mass once. */
const LAYERS = 2;

function shuffled<T>(values: T[], next: () => number): T[] {
  const out = values.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/**
 * A pruning-like move set over numBlocks * BS physical slots: a sequence on shuffled blocks keeps
 * 3 sinks, random heavy hitters and a recent window, compacted to its first slots (identity moves
 * included); on other blocks, a chain a -> b -> c -> d, a swap, one source copied to two slots,
 * and a random cycle-rich permutation of a subset. Destinations are distinct.
 */
function moveSet(numBlocks: number, bs: number, seed: number): number[][] {
  const next = rng(seed);
  const blocks = shuffled(Array.from({ length: numBlocks }, (_, i) => i), next);
  const seqBlocks = blocks.splice(0, Math.ceil(numBlocks / 2));
  const physical = (j: number) => seqBlocks[Math.floor(j / bs)] * bs + (j % bs);
  const length = seqBlocks.length * bs - Math.floor(bs / 2);
  const kept: number[] = [];
  for (let j = 0; j < length; j++) {
    if (j < 3 || j >= length - 2 * bs || next() < 0.3) kept.push(j);
  }
  const moves = kept.map((j, i) => [physical(j), physical(i)]);

  // The remaining blocks' slots, in random order, for the overlapping patterns.
  const free = shuffled(
    blocks.flatMap((b) => Array.from({ length: bs }, (_, o) => b * bs + o)),
    next,
  );
  const [a, b, c, d, x, y, z, w1, w2] = free.splice(0, 9);
  moves.push([c, d], [a, b], [b, c]); // chain, listed out of order
  moves.push([x, y], [y, x]); // swap
  moves.push([z, w1], [z, w2]); // one source, two destinations
  const subset = free.splice(0, Math.min(free.length, 3 * bs + 4));
  const permuted = shuffled(subset, next);
  subset.forEach((s, i) => moves.push([s, permuted[i]]));
  return shuffled(moves, next);
}

function assertExact(actual: Float32Array, expected: Float64Array, label: string) {
  ok(actual.length === expected.length, `${label}: length`);
  for (let i = 0; i < expected.length; i++) {
    if (!Object.is(actual[i], expected[i])) {
      throw new AssertionError({
        message: `${label}: element ${i} is ${actual[i]}, expected ${expected[i]}`,
      });
    }
  }
}

for (const { shape, numBlocks } of CONFIGS) {
  const { numKvHeads: Hkv, headDim: hd, blockSize: bs } = shape;
  Deno.test({ name: `kv_compact Hkv=${Hkv} hd=${hd} BS=${bs}`, ...gpuTest }, async () => {
    const ctx = await testContext();
    const slots = numBlocks * bs;
    const poolFloats = slots * Hkv * hd;
    const moves = moveSet(numBlocks, bs, Hkv * 100 + hd);
    const count = moves.length;
    const flatMoves = Uint32Array.from(moves.flat());
    const ks = Array.from({ length: LAYERS }, (_, l) => randn(poolFloats, 10 + l));
    const vs = Array.from({ length: LAYERS }, (_, l) => randn(poolFloats, 20 + l));
    const mass = randn(slots, 30);

    // Scratch for more moves than used: the tail must not matter.
    const kernel = new KvCompact(ctx, shape, { maxMoves: count + 9 });
    const params = createUniform(ctx, packUniform([["u32", count]]), "params");
    const movesBuf = uploadStorage(ctx, flatMoves, "moves");
    const kBufs = ks.map((k, l) => uploadStorage(ctx, k, `k_${l}`));
    const vBufs = vs.map((v, l) => uploadStorage(ctx, v, `v_${l}`));
    const massBuf = uploadStorage(ctx, mass, "mass");
    const layerGroups = kBufs.map((k, l) => kernel.bind(params, movesBuf, k, vBufs[l]));
    const massGroups = kernel.bindMass(params, movesBuf, massBuf);
    runPass(ctx, (pass) => {
      for (const groups of layerGroups) kernel.encode(pass, groups, count);
      kernel.encode(pass, massGroups, count);
    });

    const dsts = new Set(moves.map(([, dst]) => dst));
    for (let l = 0; l < LAYERS; l++) {
      const expected = kvCompactReference(ks[l], vs[l], l === 0 ? mass : null, flatMoves, shape);
      const k = await readF32(ctx, kBufs[l], poolFloats);
      const v = await readF32(ctx, vBufs[l], poolFloats);
      assertExact(k, expected.k, `layer ${l} k_cache`);
      assertExact(v, expected.v, `layer ${l} v_cache`);
      if (expected.mass) assertExact(await readF32(ctx, massBuf, slots), expected.mass, "mass");
      // Independently of the reference: slots no move names as destination are untouched.
      for (let s = 0; s < slots; s++) {
        if (dsts.has(s)) continue;
        const block = Math.floor(s / bs);
        for (let g = 0; g < Hkv; g++) {
          const base = ((block * Hkv + g) * bs + (s % bs)) * hd;
          for (let d = 0; d < hd; d++) {
            ok(k[base + d] === ks[l][base + d], `layer ${l} k slot ${s} changed`);
            ok(v[base + d] === vs[l][base + d], `layer ${l} v slot ${s} changed`);
          }
        }
      }
    }
    kernel.destroy();
  });
}

Deno.test({ name: "kv_compact: move counts outside 0..maxMoves", ...gpuTest }, async () => {
  const ctx = await testContext();
  const shape = CONFIGS[0].shape;
  const kernel = new KvCompact(ctx, shape, { maxMoves: 4 });
  const slots = CONFIGS[0].numBlocks * shape.blockSize;
  const massInit = randn(slots, 5);
  const mass = uploadStorage(ctx, massInit, "mass");
  const params = createUniform(ctx, packUniform([["u32", 0]]), "params");
  const groups = kernel.bindMass(
    params,
    uploadStorage(ctx, new Uint32Array([1, 0]), "moves"),
    mass,
  );
  runPass(ctx, (pass) => {
    kernel.encode(pass, groups, 0);
    throws(() => kernel.encode(pass, groups, 5), /at most 4/);
  });
  assertExact(await readF32(ctx, mass, slots), Float64Array.from(massInit), "mass");
  kernel.destroy();
});
