import { TokenLogprobs } from "../../src/engine/kernels/token_logprobs.ts";
import { tokenLogprobs, tokenLogprobsBackward } from "../reference/training_ops.ts";
import {
  createUniform,
  packUniform,
  readF32,
  uploadStorage,
} from "../../src/engine/gpu/buffers.ts";
import { runPass } from "../../src/engine/gpu/kernel.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";
import { FINITE_DIFFERENCE, numericGradient } from "../helpers/finite_difference.ts";
import { assertClose, F32 } from "../helpers/tolerance.ts";
import { randInts, randn } from "../helpers/random.ts";

Deno.test("tokenLogprobsBackward reference matches finite differences of g * sum(logp)", () => {
  const [rows, vocab, rowOffset, g] = [3, 7, 2, -1.7];
  const logits = randn(rows * vocab, 1, 3);
  const targets = randInts(rowOffset + rows, vocab, 2);
  const loss = (l: Float64Array) =>
    g * tokenLogprobs(l, targets, rows, vocab, rowOffset).logp.reduce((s, v) => s + v, 0);
  assertClose(
    tokenLogprobsBackward(logits, targets, rows, vocab, rowOffset, g),
    numericGradient(loss, logits),
    FINITE_DIFFERENCE,
    "tokenLogprobsBackward vs finite differences",
  );
});

// V below the workgroup size (threads without logits), odd, and SmolLM2's vocabulary.
for (const [vocab, rows, rowOffset] of [[37, 5, 0], [517, 13, 5], [49152, 3, 2]]) {
  Deno.test(
    { name: `token_logprobs V=${vocab} rows=${rows} rowOffset=${rowOffset}`, ...gpuTest },
    async () => {
      const ctx = await testContext();
      const total = rowOffset + rows + 2;
      const logits = randn(rows * vocab, vocab + rows, 3);
      const targets = randInts(total, vocab, vocab);
      // Targets at both ends of the vocabulary and at a row's max.
      targets[rowOffset] = 0;
      targets[rowOffset + 1] = vocab - 1;
      const last = logits.subarray((rows - 1) * vocab, rows * vocab);
      targets[rowOffset + rows - 1] = last.indexOf(Math.max(...last));
      // Entries outside [rowOffset, rowOffset + rows) must stay untouched.
      const lse0 = randn(total, 3);
      const logp0 = randn(total, 4);
      const grad0 = randn(4, 5);
      const gIndex = 2;

      const kernel = new TokenLogprobs(ctx, { vocabSize: vocab });
      const params = createUniform(
        ctx,
        packUniform([["u32", rows], ["u32", rowOffset], ["u32", gIndex]]),
        "params",
      );
      const logitsBuffer = uploadStorage(ctx, logits, "logits");
      const targetsBuffer = uploadStorage(ctx, targets, "targets");
      const lse = uploadStorage(ctx, lse0, "lse");
      const logp = uploadStorage(ctx, logp0, "logp");
      const forward = kernel.bindForward(params, logitsBuffer, targetsBuffer, lse, logp);
      runPass(ctx, (pass) => kernel.encodeForward(pass, forward, rows));

      const expected = tokenLogprobs(logits, targets, rows, vocab, rowOffset);
      const lseExpected = Float64Array.from(lse0);
      lseExpected.set(expected.lse, rowOffset);
      const logpExpected = Float64Array.from(logp0);
      logpExpected.set(expected.logp, rowOffset);
      assertClose(await readF32(ctx, lse, total), lseExpected, F32, "lse");
      assertClose(await readF32(ctx, logp, total), logpExpected, F32, "logp");

      // The backward reads the forward's lse, as in training.
      const backward = kernel.bindBackward(
        params,
        logitsBuffer,
        targetsBuffer,
        lse,
        uploadStorage(ctx, grad0, "grad"),
      );
      runPass(ctx, (pass) => kernel.encodeBackward(pass, backward, rows));
      assertClose(
        await readF32(ctx, logitsBuffer, rows * vocab),
        tokenLogprobsBackward(logits, targets, rows, vocab, rowOffset, grad0[gIndex]),
        F32,
        "d logits",
      );
    },
  );
}
