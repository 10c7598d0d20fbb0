import { AttentionMass, packAttentionMassParams } from "../../src/engine/kernels/attention_mass.ts";
import type { AttentionShape } from "../../src/engine/kernels/attention.ts";
import { attentionMassReference, type MassChunk } from "../reference/kv_pruning_kernels.ts";
import { createUniform, readF32, uploadStorage } from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn, rng } from "../helpers/random.ts";
import { ok } from "node:assert";

/** Per chunk: keys cached before this step, and this step's tokens (numKeys0 = cached + 1). */
type ChunkSpec = { cached: number; tokens: number };

/** Shapes reuse few pipelines (Dawn on SwiftShader compiles slowly); threads cover odd WGs. */
const CONFIGS: { shape: AttentionShape; threads?: number; chunks: ChunkSpec[] }[] = [
  {
    // 2 query heads per pass.
    shape: { numHeads: 8, numKvHeads: 4, headDim: 8, blockSize: 16 },
    chunks: [
      { cached: 0, tokens: 37 },
      { cached: 250, tokens: 1 },
      { cached: 120, tokens: 20 },
      { cached: 0, tokens: 1 },
      { cached: 299, tokens: 1 },
      { cached: 5, tokens: 2 },
    ],
  },
  {
    shape: { numHeads: 9, numKvHeads: 3, headDim: 64, blockSize: 5 },
    chunks: [{ cached: 130, tokens: 17 }, { cached: 287, tokens: 1 }, { cached: 3, tokens: 9 }],
  },
  {
    // GQA 7, the hardware default of 32 threads.
    shape: { numHeads: 14, numKvHeads: 2, headDim: 72, blockSize: 16 },
    threads: 32,
    chunks: [{ cached: 200, tokens: 1 }, { cached: 90, tokens: 11 }, { cached: 0, tokens: 5 }],
  },
  {
    // 3 query heads per pass, 13 threads (not a power of two).
    shape: { numHeads: 6, numKvHeads: 2, headDim: 8, blockSize: 5 },
    threads: 13,
    chunks: [
      { cached: 0, tokens: 1 },
      { cached: 300, tokens: 3 },
      { cached: 63, tokens: 1 },
      { cached: 17, tokens: 40 },
    ],
  },
];

/** Layers accumulated into one mass array (one dispatch each). */
const LAYERS = 2;

/**
 * Chunks over shuffled physical blocks: block tables stored with gaps of invalid ids (a wrong
 * table offset reads a bad block), q rows with a spare row between chunks, two spare blocks.
 */
function buildChunks(specs: ChunkSpec[], blockSize: number, seed: number) {
  const next = rng(seed);
  const blocksPerChunk = specs.map((s) => Math.ceil((s.cached + s.tokens) / blockSize));
  const numBlocks = blocksPerChunk.reduce((a, b) => a + b, 0) + 2;
  const physical = Array.from({ length: numBlocks }, (_, i) => i);
  for (let i = numBlocks - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [physical[i], physical[j]] = [physical[j], physical[i]];
  }
  const tables: number[][] = [];
  const flatTables: number[] = [];
  const chunks: MassChunk[] = [];
  let rows = 0;
  specs.forEach((s, c) => {
    flatTables.push(0xffffffff);
    rows += 1; // a q row no chunk reads
    chunks.push({
      firstToken: rows,
      numTokens: s.tokens,
      blockTableOffset: flatTables.length,
      numKeys0: s.cached + 1,
    });
    tables.push(physical.splice(0, blocksPerChunk[c]));
    flatTables.push(...tables[c]);
    rows += s.tokens;
  });
  const words = Uint32Array.from(
    chunks.flatMap((c) => [c.firstToken, c.numTokens, c.blockTableOffset, c.numKeys0]),
  );
  return { numBlocks, tables, chunks, words, rows, blockTables: Uint32Array.from(flatTables) };
}

/** A K pool [numBlocks, Hkv, BS, hd], NaN except the slots the chunks' tables name. */
function keyPool(
  numBlocks: number,
  tables: number[][],
  specs: ChunkSpec[],
  shape: AttentionShape,
  seed: number,
) {
  const { numKvHeads: hkv, headDim: hd, blockSize: bs } = shape;
  const pool = new Float32Array(numBlocks * hkv * bs * hd).fill(NaN);
  specs.forEach((s, c) => {
    const keys = randn((s.cached + s.tokens) * hkv * hd, seed + c);
    for (let j = 0; j < s.cached + s.tokens; j++) {
      for (let g = 0; g < hkv; g++) {
        const dst = ((tables[c][Math.floor(j / bs)] * hkv + g) * bs + (j % bs)) * hd;
        pool.set(keys.subarray((j * hkv + g) * hd, (j * hkv + g + 1) * hd), dst);
      }
    }
  });
  return pool;
}

for (const { shape, threads, chunks: specs } of CONFIGS) {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd, blockSize: bs } = shape;
  const name = `attention_mass H=${H}/${Hkv} hd=${hd} BS=${bs} threads=${threads ?? "default"}`;
  Deno.test({ name, ...gpuTest }, async () => {
    const ctx = await testContext();
    const batch = buildChunks(specs, bs, H * 17 + hd);
    const slots = batch.numBlocks * bs;
    const q = randn(batch.rows * H * hd, hd * 3 + H);
    const pools = Array.from(
      { length: LAYERS },
      (_, l) => keyPool(batch.numBlocks, batch.tables, specs, shape, 1000 * (l + 1)),
    );
    // Nonzero starting mass checks accumulation; a zero-started copy checks the totals.
    const next = rng(hd + 5);
    const massInit = Float32Array.from({ length: slots }, () => 2 * next());
    const weight = Math.fround(1 / (H * LAYERS));

    const kernel = new AttentionMass(ctx, shape, { threads });
    const params = createUniform(ctx, packAttentionMassParams(specs.length, weight), "params");
    const qBuf = uploadStorage(ctx, q, "q");
    const tables = uploadStorage(ctx, batch.blockTables, "block_tables");
    const chunks = uploadStorage(ctx, batch.words, "chunks");
    const mass = uploadStorage(ctx, massInit, "mass");
    const massFromZero = uploadStorage(ctx, new Float32Array(slots), "mass_from_zero");
    const kBufs = pools.map((pool, l) => uploadStorage(ctx, pool, `k_cache_${l}`));
    runPass(ctx, (pass) => {
      for (const k of kBufs) {
        kernel.encode(pass, kernel.bind(params, qBuf, tables, k, chunks, mass), specs.length);
        kernel.encode(
          pass,
          kernel.bind(params, qBuf, tables, k, chunks, massFromZero),
          specs.length,
        );
      }
    });

    let expected: Float64Array = Float64Array.from(massInit);
    for (const pool of pools) {
      expected = attentionMassReference(
        q,
        batch.blockTables,
        pool,
        batch.chunks,
        expected,
        weight,
        { ...shape },
      );
    }
    ok(expected.every(Number.isFinite), "reference read a slot outside the block tables");
    // Spare blocks and slots past each chunk's last key keep their starting mass.
    assertClose(await readF32(ctx, mass, slots), expected, F32, "mass");

    // Probabilities sum to 1: each chunk's slots gain weight * numTokens * H per layer.
    const fromZero = await readF32(ctx, massFromZero, slots);
    const sums = batch.chunks.map((c, i) => {
      let sum = 0;
      for (let j = 0; j < c.numKeys0 + c.numTokens - 1; j++) {
        sum += fromZero[batch.tables[i][Math.floor(j / bs)] * bs + (j % bs)];
      }
      return sum;
    });
    const totals = batch.chunks.map((c) => LAYERS * weight * c.numTokens * H);
    assertClose(sums, totals, F32, "mass totals per chunk");
    const total = fromZero.reduce((a, b) => a + b, 0);
    assertClose([total], [totals.reduce((a, b) => a + b, 0)], F32, "mass total");
  });
}

Deno.test({ name: "attention_mass: zero chunks dispatches nothing", ...gpuTest }, async () => {
  const ctx = await testContext();
  const shape = CONFIGS[0].shape;
  const kernel = new AttentionMass(ctx, shape);
  const mass = uploadStorage(ctx, Float32Array.from([1, 2, 3, 4]), "mass");
  const group = kernel.bind(
    createUniform(ctx, packAttentionMassParams(0, 1), "params"),
    uploadStorage(ctx, new Float32Array(shape.numHeads * shape.headDim), "q"),
    uploadStorage(ctx, new Uint32Array(4), "block_tables"),
    uploadStorage(ctx, new Float32Array(shape.numKvHeads * shape.blockSize * shape.headDim), "k"),
    uploadStorage(ctx, new Uint32Array(4), "chunks"),
    mass,
  );
  // A capacity dispatch (more workgroups than params.count) must not touch mass either.
  runPass(ctx, (pass) => {
    kernel.encode(pass, group, 0);
    kernel.encode(pass, group, 3);
  });
  assertClose(await readF32(ctx, mass, 4), [1, 2, 3, 4], { rtol: 0 }, "mass");
});
