import { TokenFeedback } from "../../src/engine/kernels/token_feedback.ts";
import { tokenFeedback } from "../reference/elementwise.ts";
import {
  createUniform,
  packUniform,
  readU32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { rng } from "../helpers/random.ts";
import { deepStrictEqual } from "node:assert";

Deno.test(
  {
    name: "token_feedback copies sampled ids into token slots, counts 0, 1, 63, 64, 130",
    ...gpuTest,
  },
  async () => {
    const ctx = await testContext();
    const kernel = new TokenFeedback(ctx);
    const random = rng(7);
    for (const count of [0, 1, 63, 64, 130]) {
      const tokens = 2 * count + 5;
      const tokenIds = Uint32Array.from({ length: tokens }, () => Math.floor(random() * 50000));
      const sampled = Uint32Array.from({ length: count + 3 }, () => Math.floor(random() * 50000));
      // Distinct destinations (each fed-back token is one decode token), shuffled sources.
      const dsts = Array.from({ length: tokens }, (_, i) => i).sort(() => random() - 0.5).slice(
        0,
        count,
      );
      const pairs = dsts.map((dst, i) => [(i * 7) % sampled.length, dst] as const);
      const ids = uploadStorage(ctx, tokenIds, "tokenIds");
      const group = kernel.bind(
        createUniform(ctx, packUniform([["u32", count]]), "params"),
        uploadStorage(ctx, Uint32Array.from(count ? pairs.flat() : [0, 0]), "pairs"),
        uploadStorage(ctx, sampled, "sampled"),
        ids,
      );
      runPass(ctx, (pass) => kernel.encode(pass, group, count));
      deepStrictEqual(await readU32(ctx, ids, tokens), tokenFeedback(tokenIds, sampled, pairs));
    }
  },
);
