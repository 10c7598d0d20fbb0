import assert from "node:assert/strict";
import { MaceError } from "../../src/engine/errors.ts";
import { BlockManager, type BlockManagerOptions } from "../../src/scheduler/block_manager.ts";
import {
  BlockManagerUsageError,
  KvIntegrityError,
  OutOfKvBlocksError,
} from "../../src/scheduler/errors.ts";
import { rng } from "../helpers/random.ts";

/** A block manager whose every method call is followed by checkIntegrity(), even when it throws. */
function checked(options: Partial<BlockManagerOptions> = {}): BlockManager {
  const manager = new BlockManager({
    numBlocks: 8,
    blockSize: 4,
    enablePrefixCaching: true,
    ...options,
  });
  manager.checkIntegrity();
  return new Proxy(manager, {
    get(target, property) {
      const value = Reflect.get(target, property, target);
      if (typeof value !== "function") return value;
      return (...args: unknown[]) => {
        try {
          return value.apply(target, args);
        } finally {
          target.checkIntegrity();
        }
      };
    },
  });
}

/** n consecutive token ids starting at `from`. */
function range(from: number, n: number): number[] {
  return Array.from({ length: n }, (_, i) => from + i);
}

function counts(bm: BlockManager) {
  const { free, used, cached } = bm.stats();
  return { free, used, cached };
}

function refs(bm: BlockManager, blocks: number[]): number[] {
  return blocks.map((b) => bm.refCount(b));
}

Deno.test("block manager: allocation hands out the lowest free ids", () => {
  const bm = checked();
  assert.deepEqual(bm.allocate(1, range(100, 10)), { numCached: 0, blockTable: [0, 1, 2] });
  assert.deepEqual(bm.allocate(2, range(200, 5)), { numCached: 0, blockTable: [3, 4] });
  assert.deepEqual(counts(bm), { free: 3, used: 5, cached: 0 });
  bm.free(1); // nothing committed, so nothing is cached
  assert.deepEqual(counts(bm), { free: 6, used: 2, cached: 0 });
  assert.deepEqual(bm.allocate(3, range(300, 4))?.blockTable, [0]);
  assert.equal(bm.appendSlots(3, 1), true);
  assert.deepEqual(bm.blockTable(3), [0, 1]);
  assert.equal(bm.appendSlots(3, 6), true, "11 slots in 3 blocks");
  assert.deepEqual(bm.blockTable(3), [0, 1, 2]);
});

Deno.test("block manager: a prefix hit shares full blocks and prefills the partial tail", () => {
  const bm = checked();
  const a = range(100, 10);
  assert.deepEqual(bm.allocate(1, a)?.blockTable, [0, 1, 2]);
  bm.commitTokens(1, a.slice(0, 6)); // block 0 full, block 1 half
  bm.commitTokens(1, a.slice(6)); // block 1 full, block 2 half (2 of 4)
  bm.free(1);
  assert.deepEqual(counts(bm), { free: 6, used: 0, cached: 2 }, "blocks 0, 1 stay cached");

  // Same first 8 tokens, then a different tail: 2 blocks hit, the tail is prefilled.
  const b = [...a.slice(0, 8), 900, 901, 902];
  assert.deepEqual(bm.allocate(2, b), { numCached: 8, blockTable: [0, 1, 2] });
  assert.deepEqual(refs(bm, [0, 1, 2]), [1, 1, 1]);
  assert.deepEqual(counts(bm), { free: 5, used: 3, cached: 0 });
  bm.commitTokens(2, b.slice(8));

  // Diverges inside block 1: only block 0 is shared.
  const c = [...a.slice(0, 6), 77, 77, 77];
  assert.deepEqual(bm.allocate(3, c), { numCached: 4, blockTable: [0, 3, 4] });
  assert.deepEqual(refs(bm, [0, 1, 3, 4]), [2, 1, 1, 1]);

  const s = bm.stats();
  assert.equal(s.prefixHitTokens, 12);
  assert.equal(s.promptTokens, 10 + 11 + 9);
  assert.equal(s.hitRate, 12 / 30);
});

Deno.test("block manager: a fully cached prompt recomputes its last block, then shares it", () => {
  const bm = checked();
  const a = range(100, 8);
  bm.allocate(1, a);
  bm.commitTokens(1, a);
  bm.free(1);
  assert.deepEqual(counts(bm), { free: 6, used: 0, cached: 2 });
  // The last token must be computed to get logits: block 1 is not reused for prefill.
  assert.deepEqual(bm.allocate(2, a), { numCached: 4, blockTable: [0, 2] });
  // Once computed, block 2 holds the same token path as cached block 1: the
  // sequence switches to block 1 and block 2 goes back to the free list.
  bm.commitTokens(2, a.slice(4));
  assert.deepEqual(bm.blockTable(2), [0, 1]);
  assert.deepEqual(refs(bm, [0, 1, 2]), [1, 1, 0]);
  assert.deepEqual(counts(bm), { free: 6, used: 2, cached: 0 });
});

Deno.test("block manager: a one-token prompt always computes its token", () => {
  const bm = checked({ blockSize: 1 });
  bm.allocate(1, [5]);
  bm.commitTokens(1, [5]);
  bm.free(1);
  assert.deepEqual(bm.allocate(2, [5]), { numCached: 0, blockTable: [1] });
  assert.deepEqual(bm.allocate(3, [5, 6]), { numCached: 1, blockTable: [0, 2] });
});

Deno.test("block manager: eviction is least recently used first, leaves before parents", () => {
  const bm = checked({ numBlocks: 6, blockSize: 2 });
  for (const [seqId, prompt] of [[1, [1, 2, 3, 4]], [2, [5, 6, 7, 8]], [3, [9, 10, 11, 12]]]) {
    bm.allocate(seqId as number, prompt as number[]);
    bm.commitTokens(seqId as number, prompt as number[]);
    bm.free(seqId as number);
  }
  // Chains 0->1 (oldest), 2->3, 4->5 (newest), all cached.
  assert.deepEqual(counts(bm), { free: 0, used: 0, cached: 6 });
  // Shares block 0 and needs one more: the LRU leaf is block 1.
  assert.deepEqual(bm.allocate(4, [1, 2, 9]), { numCached: 2, blockTable: [0, 1] });
  assert.deepEqual(bm.evict(2), [3, 2], "chain 2->3 next, leaf first");
  assert.deepEqual(bm.evict(2), [], "2 blocks are already free");
  assert.deepEqual(bm.evict(6), [5, 4], "block 0 is in use");
  assert.deepEqual(counts(bm), { free: 4, used: 2, cached: 0 });
});

Deno.test("block manager: using a prefix again protects it from eviction", () => {
  const bm = checked({ numBlocks: 4, blockSize: 2 });
  for (const [seqId, prompt] of [[1, [1, 2, 3, 4]], [2, [5, 6, 7, 8]]]) {
    bm.allocate(seqId as number, prompt as number[]);
    bm.commitTokens(seqId as number, prompt as number[]);
    bm.free(seqId as number);
  }
  // Reusing chain 0->1 makes chain 2->3 the least recently used: it gives block 3.
  assert.deepEqual(bm.allocate(3, [1, 2, 3, 4, 5]), { numCached: 4, blockTable: [0, 1, 3] });
  bm.free(3); // its tail was never committed: block 3 is free, 0->1 cached again
  assert.deepEqual(counts(bm), { free: 1, used: 0, cached: 3 });
  assert.deepEqual(bm.evict(4), [2, 1, 0]);
});

Deno.test("block manager: a full pool returns null, changing nothing; preemption helps", () => {
  const bm = checked({ numBlocks: 4 });
  const a = range(100, 12);
  bm.allocate(1, a);
  bm.commitTokens(1, a);
  const before = bm.stats();
  // Shares blocks 0, 1 but needs 2 more with 1 free and nothing evictable.
  const b = [...a.slice(0, 8), 5, 5, 5, 5, 6];
  assert.equal(bm.allocate(2, b), null);
  assert.deepEqual(bm.stats(), before, "hit counters and states unchanged");
  assert.deepEqual(refs(bm, [0, 1, 2, 3]), [1, 1, 1, 0], "the pinned prefix was released");
  assert.equal(bm.numAvailableBlocks(), 1);

  bm.free(1); // preempt seq 1: its three full blocks stay cached
  assert.equal(bm.numAvailableBlocks(), 4);
  assert.deepEqual(bm.allocate(2, b), { numCached: 8, blockTable: [0, 1, 2, 3] });
  assert.equal(bm.appendSlots(2, 3), true, "16 slots fill the pool exactly");

  const full = checked({ numBlocks: 4 });
  full.allocate(1, range(0, 8));
  full.allocate(2, range(0, 8));
  assert.equal(full.appendSlots(1, 1), false);
  assert.deepEqual(full.blockTable(1), [0, 1], "a refused append changes nothing");
  full.free(2);
  assert.equal(full.appendSlots(1, 1), true);
  assert.deepEqual(full.blockTable(1), [0, 1, 2]);
});

Deno.test("block manager: OutOfKvBlocksError only when one sequence exceeds the whole pool", () => {
  const bm = checked({ numBlocks: 4 });
  const e = captureError(() => bm.allocate(7, range(0, 17)));
  assert.ok(e instanceof OutOfKvBlocksError && e instanceof MaceError);
  assert.equal(e.code, "out_of_kv_blocks");
  assert.deepEqual(
    [e.seqId, e.numTokens, e.blocksNeeded, e.numBlocks, e.blockSize],
    [7, 17, 5, 4, 4],
  );
  assert.match(e.message, /needs 5 KV blocks for 17 tokens.*pool has 4 blocks.*at most 16 tokens/);
  bm.allocate(1, range(0, 16));
  assert.throws(() => bm.appendSlots(1, 1), /sequence 1 needs 5 KV blocks for 17 tokens/);
  assert.deepEqual(bm.blockTable(1), [0, 1, 2, 3]);
});

function captureError(f: () => unknown): unknown {
  try {
    f();
  } catch (e) {
    return e;
  }
  throw new Error("expected an error");
}

Deno.test("block manager: with prefix caching off nothing is shared or cached", () => {
  const bm = checked({ enablePrefixCaching: false });
  const a = range(100, 8);
  bm.allocate(1, a);
  bm.commitTokens(1, a);
  bm.free(1);
  assert.deepEqual(counts(bm), { free: 8, used: 0, cached: 0 });
  assert.deepEqual(bm.allocate(2, [...a, 1]), { numCached: 0, blockTable: [0, 1, 2] });
  assert.deepEqual(bm.evict(8), []);
  assert.equal(bm.stats().hitRate, 0);
});

Deno.test("block manager: calls out of contract are usage errors", () => {
  const bm = checked();
  bm.allocate(1, range(0, 5));
  const usage = BlockManagerUsageError;
  assert.throws(() => bm.allocate(1, [1]), usage);
  assert.throws(() => bm.allocate(2, []), usage);
  assert.throws(() => bm.free(9), /sequence 9 is not allocated/);
  assert.throws(() => bm.appendSlots(1, 0), usage);
  assert.throws(() => bm.commitTokens(1, range(0, 6)), /exceeds its 5 reserved slots/);
  assert.throws(() => bm.commitTokens(1, [0, 1, 99]), /token 99 at position 2 differs/);
  bm.commitTokens(1, range(0, 5));
  assert.throws(() => bm.refCount(8), usage);
  assert.throws(
    () => new BlockManager({ numBlocks: 0, blockSize: 4, enablePrefixCaching: true }),
    usage,
  );
  assert.throws(
    () => new BlockManager({ numBlocks: 4, blockSize: 1.5, enablePrefixCaching: true }),
    usage,
  );
});

Deno.test("block manager: checkIntegrity names the broken invariant", () => {
  // Reach into private state the way a bug would.
  type Internals = {
    refCounts: Int32Array;
    sequences: Map<number, { blockTable: number[] }>;
  };
  const fresh = () => {
    const bm = new BlockManager({ numBlocks: 8, blockSize: 4, enablePrefixCaching: true });
    bm.allocate(1, range(0, 8));
    bm.checkIntegrity();
    return { bm, internals: bm as unknown as Internals };
  };

  let { bm, internals } = fresh();
  internals.refCounts[0]++;
  assert.throws(() => bm.checkIntegrity(), /block 0: ref count 2 but 1 tables hold it/);

  ({ bm, internals } = fresh());
  internals.sequences.get(1)!.blockTable.push(5);
  assert.throws(() => bm.checkIntegrity(), KvIntegrityError);
  assert.throws(() => bm.checkIntegrity(), /sequence 1: 3 blocks for 8 slots/);
  assert.throws(() => bm.checkIntegrity(), /free block 5 is referenced by a block table/);

  ({ bm, internals } = fresh());
  internals.sequences.get(1)!.blockTable[1] = 0;
  assert.throws(() => bm.checkIntegrity(), /block 0 appears twice in its table/);
  assert.throws(() => bm.checkIntegrity(), /block 1: ref count 1 but 0 tables hold it/);

  ({ bm, internals } = fresh());
  internals.sequences.delete(1);
  assert.throws(() => bm.checkIntegrity(), /block 0: ref count 1 but 0 tables hold it/);
});

/**
 * Randomized property test. A fake KV pool stores, per block slot, the token
 * whose K/V the "engine" wrote there; writes, and a prune's block copies and
 * slot moves, follow the manager's answers. After every operation:
 * checkIntegrity(), ref counts equal the number of tables holding each block,
 * every live sequence reads back exactly its committed tokens through its block
 * table (so no block was reused, evicted or shared wrongly), and no write or
 * move lands in a block another sequence also holds.
 */
function runRandomOps(options: BlockManagerOptions, seed: number, steps: number) {
  const B = options.blockSize;
  const rand = rng(seed);
  const int = (n: number) => Math.floor(rand() * n);
  // A tiny vocabulary makes identical blocks (and so dedupe on commit) common.
  const randomTokens = (n: number) => Array.from({ length: n }, () => int(3));
  const sharedPrefixes = Array.from({ length: 3 }, () => randomTokens(int(3 * B + 3)));
  const maxLength = 6 * B;

  const bm = new BlockManager(options);
  const kvPool = new Map<number, number[]>();
  const live = new Map<number, { prompt: number[]; committed: number[]; slots: number }>();
  const seen = { nulls: 0, copies: 0, evicted: 0, prunes: 0 };
  let nextSeqId = 0;

  const poison = (blocks: number[]) => blocks.forEach((b) => kvPool.set(b, Array(B).fill(-1)));
  const holders = (block: number) =>
    [...live.keys()].filter((id) => bm.blockTable(id).includes(block)).length;
  const write = (seqId: number, tokens: number[]) => {
    const seq = live.get(seqId)!;
    const table = bm.blockTable(seqId);
    tokens.forEach((token, i) => {
      const position = seq.committed.length + i;
      const block = table[Math.floor(position / B)];
      assert.equal(holders(block), 1, `seq ${seqId} writes block ${block} that another holds`);
      kvPool.get(block)![position % B] = token;
    });
    bm.commitTokens(seqId, tokens);
    seq.committed.push(...tokens);
  };
  // The lowest-priority sequence (here: the newest) is preempted when the pool is full.
  const preempt = () => {
    seen.nulls++;
    const victim = Math.max(...live.keys());
    bm.free(victim);
    live.delete(victim);
  };
  const pick = () => [...live.keys()][int(live.size)];

  for (let step = 0; step < steps; step++) {
    const r = rand();
    if (r < 0.2 || live.size === 0) {
      const prompt = [...sharedPrefixes[int(3)], ...randomTokens(1 + int(B + 1))];
      const seqId = nextSeqId++;
      const got = bm.allocate(seqId, prompt);
      if (got === null) {
        if (live.size > 0) preempt();
      } else {
        assert.equal(got.numCached % B, 0);
        assert.ok(got.numCached < prompt.length);
        assert.equal(got.blockTable.length, Math.ceil(prompt.length / B));
        poison(got.blockTable.slice(got.numCached / B));
        live.set(seqId, {
          prompt,
          committed: prompt.slice(0, got.numCached),
          slots: prompt.length,
        });
      }
    } else if (r < 0.6) {
      const seqId = pick();
      const seq = live.get(seqId)!;
      if (seq.committed.length < seq.prompt.length) {
        const start = seq.committed.length;
        write(seqId, seq.prompt.slice(start, start + 1 + int(2 * B))); // a prefill chunk
      } else if (seq.slots >= maxLength) {
        bm.free(seqId);
        live.delete(seqId);
      } else {
        const before = bm.blockTable(seqId).length;
        if (!bm.appendSlots(seqId, 1)) {
          preempt();
        } else {
          poison(bm.blockTable(seqId).slice(before));
          seq.slots++;
          write(seqId, [int(3)]); // one decode token
        }
      }
    } else if (r < 0.7) {
      const seqId = pick();
      const seq = live.get(seqId)!;
      if (seq.committed.length === seq.slots && seq.committed.length >= seq.prompt.length) {
        // Prune to a random non-empty subset of the slots (H2O-style compaction).
        const keep = range(0, seq.slots).filter(() => rand() < 0.6);
        if (keep.length === 0) keep.push(seq.slots - 1);
        const edit = bm.prune(seqId, keep);
        if (edit === null) {
          preempt();
        } else {
          for (const { src, dst } of edit.copies) kvPool.set(dst, [...kvPool.get(src)!]);
          const table = bm.blockTable(seqId);
          // Every move reads the contents from before any move.
          const read = (slot: number) => kvPool.get(Math.floor(slot / B))![slot % B];
          const values = edit.moves.map(([src]) => read(src));
          edit.moves.forEach(([, dst], i) => {
            const block = Math.floor(dst / B);
            assert.ok(table.includes(block), `seq ${seqId} moves into block ${block} it lacks`);
            assert.equal(holders(block), 1, `seq ${seqId} moves into block ${block} others hold`);
            kvPool.get(block)![dst % B] = values[i];
          });
          seq.committed = keep.map((slot) => seq.committed[slot]);
          seq.slots = keep.length;
          seq.prompt = []; // nothing is left to prefill; new tokens are decodes
          seen.copies += edit.copies.length;
          seen.prunes++;
        }
      }
    } else if (r < 0.85) {
      const seqId = pick();
      bm.free(seqId);
      live.delete(seqId);
    } else {
      const evicted = bm.evict(int(options.numBlocks + 1));
      for (const block of evicted) assert.equal(bm.refCount(block), 0);
      poison(evicted);
      seen.evicted += evicted.length;
    }

    bm.checkIntegrity();
    const tableHolders = new Map<number, number>();
    for (const [seqId, seq] of live) {
      const table = bm.blockTable(seqId);
      assert.equal(table.length, Math.ceil(seq.slots / B), `seq ${seqId} table length`);
      const readBack = seq.committed.map((_, p) => kvPool.get(table[Math.floor(p / B)])![p % B]);
      assert.deepEqual(readBack, seq.committed, `step ${step}: seq ${seqId} reads back its tokens`);
      for (const block of table) tableHolders.set(block, (tableHolders.get(block) ?? 0) + 1);
    }
    for (let b = 0; b < options.numBlocks; b++) {
      assert.equal(
        bm.refCount(b),
        tableHolders.get(b) ?? 0,
        `step ${step}: ref count of block ${b}`,
      );
    }
  }
  return { stats: bm.stats(), seen };
}

for (
  const options of [
    { numBlocks: 24, blockSize: 4, enablePrefixCaching: true },
    { numBlocks: 16, blockSize: 2, enablePrefixCaching: true },
    { numBlocks: 12, blockSize: 1, enablePrefixCaching: true },
    { numBlocks: 20, blockSize: 3, enablePrefixCaching: false },
  ]
) {
  const name = `B=${options.blockSize}, ${options.numBlocks} blocks, ` +
    `caching ${options.enablePrefixCaching ? "on" : "off"}`;
  Deno.test(`block manager: 3 x 3000 random operations keep every invariant (${name})`, () => {
    for (const seed of [1, 2, 3]) {
      const { stats, seen } = runRandomOps(options, seed, 3000);
      // The run must have exercised the interesting paths, not just passed.
      assert.ok(seen.nulls > 0, "the pool ran full and sequences were preempted");
      assert.ok(seen.prunes > 0, "prunes happened");
      if (options.enablePrefixCaching) {
        // Only the trie shares blocks: a prune copies the shared or cached ones it writes into.
        assert.ok(seen.copies > 0, "prunes copied shared blocks");
        assert.ok(stats.hitRate > 0, "prefix hits happened");
        assert.ok(seen.evicted > 0, "explicit evictions happened");
      } else {
        assert.equal(stats.prefixHitTokens, 0);
        assert.equal(seen.copies, 0);
      }
    }
  });
}

Deno.test("block manager: prune compacts, copies shared blocks first, frees the tail", () => {
  const bm = checked({ numBlocks: 10 });
  // Sequence 1: 12 committed tokens in blocks [0, 1, 2]; all three enter the trie.
  bm.allocate(1, range(100, 12));
  bm.commitTokens(1, range(100, 12));
  // Sequence 2 shares the first two blocks (a prefix hit of 8 tokens).
  assert.deepEqual(bm.allocate(2, [...range(100, 8), 500, 501]), {
    numCached: 8,
    blockTable: [0, 1, 3],
  });
  bm.commitTokens(2, [500, 501]);
  // Keep slots 0, 1 (sinks), 6 (a heavy hitter), 10, 11 (window): slots 2, 3, 4 are written.
  const edit = bm.prune(1, [0, 1, 6, 10, 11]);
  // Blocks 0 and 1 are written and shared with sequence 2: copied to the lowest free, 4 and 5.
  // Moves read through the new table [4, 5, 2]: slot 6 = 5*4+2, slot 10 = 2*4+2, slot 11 =
  // 2*4+3, to slots 2, 3, 4 = 4*4+2, 4*4+3, 5*4+0. Block 2 (past the end) is released and
  // stays cached in the trie, its contents untouched.
  assert.deepEqual(edit, {
    copies: [{ src: 0, dst: 4 }, { src: 1, dst: 5 }],
    moves: [[22, 18], [10, 19], [11, 20]],
    releasedBlocks: 1,
  });
  assert.deepEqual(bm.blockTable(1), [4, 5]);
  assert.deepEqual(refs(bm, [0, 1, 2, 3, 4, 5]), [1, 1, 0, 1, 1, 1]);
  assert.deepEqual(counts(bm), { free: 4, used: 5, cached: 1 });
  // The pruned sequence keeps growing (5 slots + 4) but adds nothing to the trie.
  assert.equal(bm.appendSlots(1, 4), true);
  bm.commitTokens(1, range(900, 4));
  assert.deepEqual(bm.blockTable(1), [4, 5, 6]);
  bm.free(1);
  assert.deepEqual(counts(bm), { free: 6, used: 3, cached: 1 });
});

Deno.test("block manager: prune of an unshared sequence moves in place; misuse throws", () => {
  const bm = checked({ enablePrefixCaching: false });
  bm.allocate(1, range(100, 7));
  assert.throws(() => bm.prune(1, [0, 1]), BlockManagerUsageError, "uncommitted slots");
  bm.commitTokens(1, range(100, 7));
  assert.throws(() => bm.prune(1, [0, 3, 2]), BlockManagerUsageError, "not ascending");
  assert.throws(() => bm.prune(1, [0, 7]), BlockManagerUsageError, "slot past the end");
  // Keep 0, 1, 5, 6: no copies, slots 5, 6 move to 2, 3 in block 0; block 1 is freed.
  assert.deepEqual(bm.prune(1, [0, 1, 5, 6]), {
    copies: [],
    moves: [[5, 2], [6, 3]],
    releasedBlocks: 1,
  });
  assert.deepEqual(bm.blockTable(1), [0]);
  assert.deepEqual(counts(bm), { free: 7, used: 1, cached: 0 });
});
