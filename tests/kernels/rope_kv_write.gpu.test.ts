import { createInvFreqUniform, RopeKvWrite } from "../../src/engine/kernels/rope_kv_write.ts";
import { ropeQkv } from "../reference/attention.ts";
import {
  createStorage,
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randn, rng } from "../helpers/random.ts";

interface Config {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  blockSize: number;
  /** Per sequence: positions already cached, and this step's token count. */
  seqs: { cached: number; tokens: number }[];
}

const CONFIGS: Config[] = [
  {
    numHeads: 8,
    numKvHeads: 4,
    headDim: 8,
    blockSize: 16,
    // Position 20000 exercises the high half of the split position in the angle computation.
    seqs: [
      { cached: 0, tokens: 19 },
      { cached: 2001, tokens: 1 },
      { cached: 40, tokens: 3 },
      { cached: 20000, tokens: 2 },
    ],
  },
  {
    numHeads: 9,
    numKvHeads: 3,
    headDim: 64,
    blockSize: 5,
    seqs: [{ cached: 1987, tokens: 12 }, { cached: 0, tokens: 1 }, { cached: 7, tokens: 6 }],
  },
  {
    numHeads: 14,
    numKvHeads: 2,
    headDim: 72,
    blockSize: 16,
    seqs: [{ cached: 3, tokens: 1 }, { cached: 1500, tokens: 9 }, { cached: 0, tokens: 23 }],
  },
  {
    numHeads: 4,
    numKvHeads: 4,
    headDim: 8,
    blockSize: 5,
    seqs: [{ cached: 33, tokens: 17 }, { cached: 1999, tokens: 2 }],
  },
];

/** Llama-style inverse frequencies 1 / base^(2i/hd), as the f32 values the GPU sees. */
function inverseFrequencies(headDim: number, base = 500000): Float32Array {
  return Float32Array.from({ length: headDim / 2 }, (_, i) => 1 / base ** ((2 * i) / headDim));
}

/** A token batch over the given sequences with shuffled physical blocks and spaced-out tables. */
function buildBatch(config: Config, seed: number) {
  const next = rng(seed);
  const bs = config.blockSize;
  const blocksPerSeq = config.seqs.map((s) => Math.ceil((s.cached + s.tokens) / bs));
  // Two spare blocks that no table names: the kernel must leave them alone.
  const numBlocks = blocksPerSeq.reduce((a, b) => a + b, 0) + 2;
  const physical = Array.from({ length: numBlocks }, (_, i) => i);
  for (let i = numBlocks - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [physical[i], physical[j]] = [physical[j], physical[i]];
  }
  const tables: number[][] = [];
  const tableOffsets: number[] = [];
  const flatTables: number[] = [];
  const positions: number[] = [];
  const tokenSeq: number[] = [];
  const seqInfo: number[] = [];
  config.seqs.forEach((s, seq) => {
    flatTables.push(0xffffffff); // a gap, so a wrong offset reads a bad block id
    tableOffsets.push(flatTables.length);
    tables.push(physical.splice(0, blocksPerSeq[seq]));
    flatTables.push(...tables[seq]);
    seqInfo.push(tableOffsets[seq], s.cached + s.tokens, positions.length, s.tokens);
    for (let i = 0; i < s.tokens; i++) {
      positions.push(s.cached + i);
      tokenSeq.push(seq);
    }
  });
  return {
    numBlocks,
    tables,
    positions: Uint32Array.from(positions),
    tokenSeq: Uint32Array.from(tokenSeq),
    seqInfo: Uint32Array.from(seqInfo),
    blockTables: Uint32Array.from(flatTables),
  };
}

for (const config of CONFIGS) {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd, blockSize: bs } = config;
  Deno.test({ name: `rope_kv_write H=${H}/${Hkv} hd=${hd} BS=${bs}`, ...gpuTest }, async () => {
    const ctx = await testContext();
    const batch = buildBatch(config, H * 100 + hd);
    const tokens = batch.positions.length;
    const qkv = randn(tokens * (H + 2 * Hkv) * hd, hd * 7 + H);
    const invFreq = inverseFrequencies(hd);
    const poolSize = batch.numBlocks * Hkv * bs * hd;
    const kInit = randn(poolSize, 11);
    const vInit = randn(poolSize, 12);

    const kernel = new RopeKvWrite(ctx, {
      numHeads: H,
      numKvHeads: Hkv,
      headDim: hd,
      blockSize: bs,
    });
    const qOut = createStorage(ctx, tokens * H * hd * 4, "q_out");
    const kCache = uploadStorage(ctx, kInit, "k_cache");
    const vCache = uploadStorage(ctx, vInit, "v_cache");
    const group = kernel.bind(
      createUniform(ctx, packUniform([["u32", tokens]]), "params"),
      uploadStorage(ctx, qkv, "qkv"),
      uploadStorage(ctx, batch.positions, "positions"),
      uploadStorage(ctx, batch.tokenSeq, "token_seq"),
      uploadStorage(ctx, batch.seqInfo, "seqs"),
      uploadStorage(ctx, batch.blockTables, "block_tables"),
      createInvFreqUniform(ctx, invFreq),
      qOut,
      kCache,
      vCache,
    );
    runPass(ctx, (pass) => kernel.encode(pass, group, tokens));

    const expected = ropeQkv(qkv, batch.positions, invFreq, {
      numHeads: H,
      numKvHeads: Hkv,
      headDim: hd,
    });
    const kExpected = Float64Array.from(kInit);
    const vExpected = Float64Array.from(vInit);
    for (let t = 0; t < tokens; t++) {
      const p = batch.positions[t];
      const block = batch.tables[batch.tokenSeq[t]][Math.floor(p / bs)];
      for (let g = 0; g < Hkv; g++) {
        const dst = ((block * Hkv + g) * bs + (p % bs)) * hd;
        const src = (t * Hkv + g) * hd;
        kExpected.set(expected.k.subarray(src, src + hd), dst);
        vExpected.set(expected.v.subarray(src, src + hd), dst);
      }
    }
    assertClose(await readF32(ctx, qOut, tokens * H * hd), expected.q, F32, "q_out");
    assertClose(await readF32(ctx, kCache, poolSize), kExpected, F32, "k_cache");
    assertClose(await readF32(ctx, vCache, poolSize), vExpected, F32, "v_cache");
  });
}
