/**
 * Prefix sharing per LoRA adapter: K/V computed on an adapter differ from the base model's for
 * the same tokens, so the block manager shares blocks only within one adapter (its own trie
 * root), and drops an unloaded adapter's cached blocks.
 */
import assert from "node:assert/strict";
import { BlockManager } from "../../src/scheduler/block_manager.ts";
import { BlockManagerUsageError } from "../../src/scheduler/errors.ts";

const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

function manager(): BlockManager {
  return new BlockManager({ numBlocks: 12, blockSize: 4, enablePrefixCaching: true });
}

/** Allocates, commits the whole prompt and frees: its full blocks stay cached under `adapter`. */
function cache(bm: BlockManager, seqId: number, prompt: number[], adapter?: string): number {
  const { numCached } = bm.allocate(seqId, prompt, adapter)!;
  bm.commitTokens(seqId, prompt.slice(numCached));
  bm.free(seqId);
  bm.checkIntegrity();
  return numCached;
}

Deno.test("block manager: the same tokens on the base model and adapters share no block", () => {
  const bm = manager();
  const prompt = range(10, 9); // two full blocks of 4
  assert.equal(cache(bm, 1, prompt), 0);
  assert.equal(
    cache(bm, 2, prompt, "a@1"),
    0,
    "adapter a@1 must not reuse the base model's blocks",
  );
  assert.equal(cache(bm, 3, prompt, "b@1"), 0, "adapter b@1 must not reuse a@1's blocks");
  assert.equal(cache(bm, 4, prompt, "a@1"), 8, "a@1 reuses its own blocks");
  assert.equal(cache(bm, 5, prompt), 8, "the base model reuses its own blocks");
  assert.equal(bm.stats().cached, 6);
});

Deno.test("block manager: same blocks committed on different adapters stay separate", () => {
  const bm = manager();
  const prompt = range(10, 9);
  const base = bm.allocate(1, prompt)!.blockTable;
  const adapted = bm.allocate(2, prompt, "a@1")!.blockTable;
  bm.commitTokens(1, prompt);
  bm.commitTokens(2, prompt);
  bm.checkIntegrity();
  // Within one namespace the second copy would be swapped for the first; across, never.
  assert.deepEqual(bm.blockTable(1), base);
  assert.deepEqual(bm.blockTable(2), adapted);
  assert.ok(base.every((b) => !adapted.includes(b)));
});

Deno.test("block manager: dropAdapter frees the adapter's cached blocks, not while it runs", () => {
  const bm = manager();
  cache(bm, 1, range(10, 9));
  cache(bm, 2, range(10, 9), "a@1");
  bm.allocate(3, range(50, 5), "a@1");
  bm.commitTokens(3, range(50, 5));
  assert.throws(() => bm.dropAdapter("a@1"), BlockManagerUsageError);
  bm.free(3);
  const before = bm.stats();
  bm.dropAdapter("a@1");
  bm.checkIntegrity();
  const after = bm.stats();
  assert.equal(
    after.cached,
    before.cached - 3,
    "a@1's three cached blocks (two of seq 2, one of seq 3) are freed",
  );
  assert.equal(after.free, before.free + 3);
  assert.equal(cache(bm, 4, range(10, 9)), 8, "the base model's cache is untouched");
  assert.equal(cache(bm, 5, range(10, 9), "a@1"), 0);
  bm.dropAdapter("never-used");
});
