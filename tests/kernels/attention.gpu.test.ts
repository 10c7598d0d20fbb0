import {
  AttentionDecode,
  AttentionPrefill,
  type AttentionShape,
  planAttention,
  PREFILL_TILE_Q,
} from "../../src/engine/kernels/attention.ts";
import { createInvFreqUniform, RopeKvWrite } from "../../src/engine/kernels/rope_kv_write.ts";
import { attention, ropeQkv } from "../reference/attention.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import type { GpuContext } from "../../src/engine/gpu/context.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn, rng } from "../helpers/random.ts";
import { deepStrictEqual } from "node:assert";

/** Per sequence: positions already in the cache before this step, and this step's tokens. */
type SeqSpec = { cached: number; tokens: number };

const CONFIGS: { shape: AttentionShape; seqs: SeqSpec[] }[] = [
  {
    shape: { numHeads: 8, numKvHeads: 4, headDim: 8, blockSize: 16 },
    seqs: [
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
    seqs: [{ cached: 130, tokens: 17 }, { cached: 287, tokens: 1 }, { cached: 0, tokens: 33 }, {
      cached: 64,
      tokens: 1,
    }],
  },
  {
    shape: { numHeads: 14, numKvHeads: 2, headDim: 72, blockSize: 16 },
    seqs: [{ cached: 200, tokens: 1 }, { cached: 90, tokens: 16 }, { cached: 0, tokens: 5 }],
  },
  {
    shape: { numHeads: 4, numKvHeads: 4, headDim: 8, blockSize: 5 },
    seqs: [{ cached: 0, tokens: 1 }, { cached: 300, tokens: 3 }, { cached: 63, tokens: 1 }, {
      cached: 17,
      tokens: 40,
    }],
  },
  // 2 queries per prefill thread; 2 of the 4 query heads of a kv head per decode workgroup.
  {
    shape: { numHeads: 8, numKvHeads: 2, headDim: 16, blockSize: 5 },
    seqs: [{ cached: 41, tokens: 1 }, { cached: 0, tokens: 50 }, { cached: 70, tokens: 1 }],
  },
];

/**
 * A token batch over `seqs`: positions, tokenSeq, SeqInfo [S, 4], and block tables of shuffled
 * physical blocks, stored with gaps of invalid ids so a wrong table offset reads a bad block.
 */
function buildBatch(seqs: SeqSpec[], blockSize: number, seed: number) {
  const next = rng(seed);
  const blocksPerSeq = seqs.map((s) => Math.ceil((s.cached + s.tokens) / blockSize));
  const numBlocks = blocksPerSeq.reduce((a, b) => a + b, 0) + 2;
  const physical = Array.from({ length: numBlocks }, (_, i) => i);
  for (let i = numBlocks - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [physical[i], physical[j]] = [physical[j], physical[i]];
  }
  const tables: number[][] = [];
  const flatTables: number[] = [];
  const positions: number[] = [];
  const tokenSeq: number[] = [];
  const seqInfo: { firstToken: number; numTokens: number }[] = [];
  const seqWords: number[] = [];
  seqs.forEach((s, seq) => {
    flatTables.push(0xffffffff);
    seqWords.push(flatTables.length, s.cached + s.tokens, positions.length, s.tokens);
    seqInfo.push({ firstToken: positions.length, numTokens: s.tokens });
    tables.push(physical.splice(0, blocksPerSeq[seq]));
    flatTables.push(...tables[seq]);
    for (let i = 0; i < s.tokens; i++) {
      positions.push(s.cached + i);
      tokenSeq.push(seq);
    }
  });
  return {
    numBlocks,
    tables,
    seqInfo,
    positions: Uint32Array.from(positions),
    tokenSeq: Uint32Array.from(tokenSeq),
    seqWords: Uint32Array.from(seqWords),
    blockTables: Uint32Array.from(flatTables),
  };
}

/** Writes a sequence's logical cache [positions, Hkv, hd] into a pool [numBlocks, Hkv, BS, hd]. */
function pageIn(
  pool: Float32Array,
  logical: ArrayLike<number>,
  table: number[],
  shape: AttentionShape,
) {
  const { numKvHeads: hkv, headDim: hd, blockSize: bs } = shape;
  const length = logical.length / (hkv * hd);
  for (let p = 0; p < length; p++) {
    for (let g = 0; g < hkv; g++) {
      const dst = ((table[Math.floor(p / bs)] * hkv + g) * bs + (p % bs)) * hd;
      for (let d = 0; d < hd; d++) pool[dst + d] = logical[(p * hkv + g) * hd + d];
    }
  }
}

/** Tiles of every sequence, single-token ones included (planAttention sends those to decode). */
function tilesForAll(seqs: SeqSpec[], firstTokens: number[]): Uint32Array {
  const tiles: number[] = [];
  seqs.forEach((s, seq) => {
    for (let start = 0; start < s.tokens; start += PREFILL_TILE_Q) {
      tiles.push(seq, firstTokens[seq] + start, Math.min(PREFILL_TILE_Q, s.tokens - start), 0);
    }
  });
  return Uint32Array.from(tiles);
}

/** Every token as a decode entry (token, seq). */
function decodeAll(tokenSeq: Uint32Array): Uint32Array {
  return Uint32Array.from(Array.from(tokenSeq, (seq, t) => [t, seq]).flat());
}

/** NaN-filled f32 buffer: rows a kernel fails to write, or NaN it reads, fail assertClose. */
function nanStorage(ctx: GpuContext, floats: number, label: string) {
  return uploadStorage(ctx, new Float32Array(floats).fill(NaN), label);
}

/** An index buffer for `list`; an empty list still needs a (non-empty) buffer to bind. */
function uploadList(ctx: GpuContext, list: Uint32Array, label: string) {
  return uploadStorage(ctx, list.length > 0 ? list : new Uint32Array(4), label);
}

interface AttentionInputs {
  q: GPUBuffer;
  positions: GPUBuffer;
  seqs: GPUBuffer;
  blockTables: GPUBuffer;
  k: GPUBuffer;
  v: GPUBuffer;
}

/**
 * Random q and per-sequence caches for a config, paged into NaN-filled pools (a kernel that
 * reads a slot it should not turns the output NaN), and the reference output.
 */
function setUp(ctx: GpuContext, shape: AttentionShape, seqs: SeqSpec[]) {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd, blockSize: bs } = shape;
  const batch = buildBatch(seqs, bs, H * 31 + hd);
  const tokens = batch.positions.length;
  const keys = seqs.map((s, i) => randn((s.cached + s.tokens) * Hkv * hd, 100 + i));
  const values = seqs.map((s, i) => randn((s.cached + s.tokens) * Hkv * hd, 200 + i));
  const poolFloats = batch.numBlocks * Hkv * bs * hd;
  const kPool = new Float32Array(poolFloats).fill(NaN);
  const vPool = new Float32Array(poolFloats).fill(NaN);
  seqs.forEach((_, i) => {
    pageIn(kPool, keys[i], batch.tables[i], shape);
    pageIn(vPool, values[i], batch.tables[i], shape);
  });
  const q = randn(tokens * H * hd, hd + H);
  const inputs: AttentionInputs = {
    q: uploadStorage(ctx, q, "q"),
    positions: uploadStorage(ctx, batch.positions, "positions"),
    seqs: uploadStorage(ctx, batch.seqWords, "seqs"),
    blockTables: uploadStorage(ctx, batch.blockTables, "block_tables"),
    k: uploadStorage(ctx, kPool, "k_cache"),
    v: uploadStorage(ctx, vPool, "v_cache"),
  };
  const expected = attention(q, batch.positions, batch.tokenSeq, keys, values, shape);
  return { batch, tokens, inputs, expected };
}

/**
 * Runs decode over `decodeList` and prefill over `tiles` (either may be empty) in one pass into
 * one NaN-filled out, and reads it back.
 */
async function runAttention(
  ctx: GpuContext,
  shape: AttentionShape,
  inputs: AttentionInputs,
  tokens: number,
  work: { decodeTokens: Uint32Array; tiles: Uint32Array; decodeThreads?: number },
) {
  const out = nanStorage(ctx, tokens * shape.numHeads * shape.headDim, "out");
  const { q, positions, seqs, blockTables, k, v } = inputs;
  const decode = new AttentionDecode(ctx, shape, { threads: work.decodeThreads });
  const prefill = new AttentionPrefill(ctx, shape);
  const numListed = work.decodeTokens.length / 2;
  const numTiles = work.tiles.length / 4;
  const decodeGroup = decode.bind(
    createUniform(ctx, packUniform([["u32", numListed]]), "decode_params"),
    q,
    positions,
    seqs,
    blockTables,
    k,
    v,
    uploadList(ctx, work.decodeTokens, "decode_tokens"),
    out,
  );
  const prefillGroup = prefill.bind(
    createUniform(ctx, packUniform([["u32", numTiles]]), "prefill_params"),
    q,
    positions,
    seqs,
    blockTables,
    k,
    v,
    uploadList(ctx, work.tiles, "tiles"),
    out,
  );
  runPass(ctx, (pass) => {
    decode.encode(pass, decodeGroup, numListed);
    prefill.encode(pass, prefillGroup, numTiles);
  });
  return await readF32(ctx, out, tokens * shape.numHeads * shape.headDim);
}

const NONE = new Uint32Array(0);

for (const { shape, seqs } of CONFIGS) {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd, blockSize: bs } = shape;
  Deno.test(
    { name: `attention decode + prefill H=${H}/${Hkv} hd=${hd} BS=${bs}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const { batch, tokens, inputs, expected } = setUp(ctx, shape, seqs);
      const everyToken = { decodeTokens: decodeAll(batch.tokenSeq), tiles: NONE };
      const decoded = await runAttention(ctx, shape, inputs, tokens, everyToken);
      assertClose(decoded, expected, F32, "decode, every token");
      const firstTokens = batch.seqInfo.map((s) => s.firstToken);
      const everySeq = { decodeTokens: NONE, tiles: tilesForAll(seqs, firstTokens) };
      const tiled = await runAttention(ctx, shape, inputs, tokens, everySeq);
      assertClose(tiled, expected, F32, "prefill, every sequence");
      assertClose(tiled, decoded, F32, "prefill vs decode");
      const planned = await runAttention(ctx, shape, inputs, tokens, planAttention(batch.seqInfo));
      assertClose(planned, expected, F32, "planned step");
    },
  );
}

// The default is 8 threads on the software adapters the tests run on; hardware gets 32.
for (const [config, threads] of [[0, 32], [2, 3]]) {
  const { shape, seqs } = CONFIGS[config];
  const { numHeads: H, numKvHeads: Hkv, headDim: hd } = shape;
  Deno.test(
    { name: `attention decode with ${threads} threads H=${H}/${Hkv} hd=${hd}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const { batch, tokens, inputs, expected } = setUp(ctx, shape, seqs);
      const work = { decodeTokens: decodeAll(batch.tokenSeq), tiles: NONE, decodeThreads: threads };
      assertClose(await runAttention(ctx, shape, inputs, tokens, work), expected, F32, "decode");
    },
  );
}

Deno.test(
  { name: "rope_kv_write then planned attention, chunks after cached context", ...gpuTest },
  async () => {
    const ctx = await testContext();
    // A shape of CONFIGS, so its pipelines are compiled already (SwiftShader compiles slowly).
    const shape = { numHeads: 9, numKvHeads: 3, headDim: 64, blockSize: 5 };
    const { numHeads: H, numKvHeads: Hkv, headDim: hd, blockSize: bs } = shape;
    const seqs = [
      { cached: 70, tokens: 21 },
      { cached: 0, tokens: 18 },
      { cached: 140, tokens: 1 },
    ];
    const batch = buildBatch(seqs, bs, 5);
    const tokens = batch.positions.length;
    const invFreq = Float32Array.from({ length: hd / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / hd));
    const qkv = randn(tokens * (H + 2 * Hkv) * hd, 77);
    const step = ropeQkv(qkv, batch.positions, invFreq, shape);
    // Logical caches: earlier positions (random, as if rotated by earlier steps), then this step's.
    const keys: Float64Array[] = [];
    const values: Float64Array[] = [];
    const poolFloats = batch.numBlocks * Hkv * bs * hd;
    const kPool = new Float32Array(poolFloats).fill(NaN);
    const vPool = new Float32Array(poolFloats).fill(NaN);
    seqs.forEach((s, i) => {
      const rowFloats = Hkv * hd;
      const first = batch.seqInfo[i].firstToken * rowFloats;
      const earlierK = randn(s.cached * rowFloats, 300 + i);
      const earlierV = randn(s.cached * rowFloats, 400 + i);
      pageIn(kPool, earlierK, batch.tables[i], shape);
      pageIn(vPool, earlierV, batch.tables[i], shape);
      const k = new Float64Array((s.cached + s.tokens) * rowFloats);
      const v = new Float64Array(k.length);
      k.set(earlierK);
      k.set(step.k.subarray(first, first + s.tokens * rowFloats), earlierK.length);
      v.set(earlierV);
      v.set(step.v.subarray(first, first + s.tokens * rowFloats), earlierV.length);
      keys.push(k);
      values.push(v);
    });

    const positions = uploadStorage(ctx, batch.positions, "positions");
    const seqBuffer = uploadStorage(ctx, batch.seqWords, "seqs");
    const blockTables = uploadStorage(ctx, batch.blockTables, "block_tables");
    const kCache = uploadStorage(ctx, kPool, "k_cache");
    const vCache = uploadStorage(ctx, vPool, "v_cache");
    const qRotated = nanStorage(ctx, tokens * H * hd, "q");
    const out = nanStorage(ctx, tokens * H * hd, "out");
    const plan = planAttention(batch.seqInfo);
    const numListed = plan.decodeTokens.length / 2;
    const numTiles = plan.tiles.length / 4;

    const rope = new RopeKvWrite(ctx, shape);
    const decode = new AttentionDecode(ctx, shape);
    const prefill = new AttentionPrefill(ctx, shape);
    const ropeGroup = rope.bind(
      createUniform(ctx, packUniform([["u32", tokens]]), "rope_params"),
      uploadStorage(ctx, qkv, "qkv"),
      positions,
      uploadStorage(ctx, batch.tokenSeq, "token_seq"),
      seqBuffer,
      blockTables,
      createInvFreqUniform(ctx, invFreq),
      qRotated,
      kCache,
      vCache,
    );
    const decodeGroup = decode.bind(
      createUniform(ctx, packUniform([["u32", numListed]]), "decode_params"),
      qRotated,
      positions,
      seqBuffer,
      blockTables,
      kCache,
      vCache,
      uploadList(ctx, plan.decodeTokens, "decode_tokens"),
      out,
    );
    const prefillGroup = prefill.bind(
      createUniform(ctx, packUniform([["u32", numTiles]]), "prefill_params"),
      qRotated,
      positions,
      seqBuffer,
      blockTables,
      kCache,
      vCache,
      uploadList(ctx, plan.tiles, "tiles"),
      out,
    );
    runPass(ctx, (pass) => {
      rope.encode(pass, ropeGroup, tokens);
      decode.encode(pass, decodeGroup, numListed);
      prefill.encode(pass, prefillGroup, numTiles);
    });
    const expected = attention(step.q, batch.positions, batch.tokenSeq, keys, values, shape);
    assertClose(
      await readF32(ctx, out, tokens * H * hd),
      expected,
      F32,
      "attention after rope_kv_write",
    );
  },
);

Deno.test("planAttention splits sequences into prefill tiles and decode tokens", () => {
  const plan = planAttention([
    { firstToken: 0, numTokens: 1 },
    { firstToken: 1, numTokens: 2 * PREFILL_TILE_Q + 3 },
    { firstToken: 2 * PREFILL_TILE_Q + 4, numTokens: 0 },
    { firstToken: 2 * PREFILL_TILE_Q + 4, numTokens: 1 },
  ]);
  deepStrictEqual(Array.from(plan.decodeTokens), [0, 0, 2 * PREFILL_TILE_Q + 4, 3]);
  deepStrictEqual(Array.from(plan.tiles), [
    1,
    1,
    PREFILL_TILE_Q,
    0,
    1,
    1 + PREFILL_TILE_Q,
    PREFILL_TILE_Q,
    0,
    1,
    1 + 2 * PREFILL_TILE_Q,
    3,
    0,
  ]);
});
