import { Embedding } from "../../src/engine/kernels/embedding.ts";
import { packF16Rows, unpackF16Rows } from "../../src/engine/kernels/f16_pack.ts";
import { embeddingGather } from "../reference/elementwise.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randInts, randn } from "../helpers/random.ts";

const VOCAB = 37;
const SPLIT = 20; // chunk 0: rows [0, 20), chunk 1: rows [20, 37)

for (const weight of ["f32", "f16"] as const) {
  for (const dim of [1, 7, 64]) {
    Deno.test(
      { name: `embedding ${weight} dim=${dim}: two chunks, out-of-range ids`, ...gpuTest },
      async () => {
        const ctx = await testContext();
        const kernel = new Embedding(ctx, { dim, weight });
        const raw = randn(VOCAB * dim, dim);
        // f16 tables are compared with the rounded values, which the gather copies exactly.
        const table = weight === "f16"
          ? unpackF16Rows(packF16Rows(raw, VOCAB, dim), VOCAB, dim)
          : raw;
        const chunkBuffer = (start: number, rows: number) => {
          const part = raw.subarray(start * dim, (start + rows) * dim);
          return uploadStorage(
            ctx,
            weight === "f16" ? packF16Rows(part, rows, dim) : part,
            "table",
          );
        };
        const chunks = [[0, SPLIT], [SPLIT, VOCAB - SPLIT]].map(([start, rows]) => ({
          start,
          rows,
          buffer: chunkBuffer(start, rows),
        }));
        for (const tokens of [1, 13, 300]) {
          // Chunk edges, the vocabulary's end, ids past it, then random ids.
          const edges = [0, SPLIT - 1, SPLIT, VOCAB - 1, VOCAB, 1000, 0xffffffff];
          const ids = randInts(tokens, VOCAB + 3, tokens);
          ids.set(edges.slice(0, tokens));
          const out0 = randn(tokens * dim, 99);
          const out = uploadStorage(ctx, out0, "out");
          const idsBuffer = uploadStorage(ctx, ids, "ids");
          const groups = chunks.map(({ start, rows, buffer }) =>
            kernel.bind(
              createUniform(
                ctx,
                packUniform([["u32", tokens], ["u32", start], ["u32", rows]]),
                "params",
              ),
              idsBuffer,
              buffer,
              out,
            )
          );
          runPass(ctx, (pass) => groups.forEach((group) => kernel.encode(pass, group, tokens)));
          assertClose(
            await readF32(ctx, out, tokens * dim),
            embeddingGather(ids, table, dim, out0),
            F32,
            `embedding tokens=${tokens}`,
          );
        }
      },
    );
  }
}
