import assert from "node:assert/strict";
import { KvIntegrityError } from "../../src/scheduler/errors.ts";
import { PrefixTrie, type TrieNode } from "../../src/scheduler/prefix_trie.ts";

/** A trie of block size 2 whose reference counts are a set the test controls. */
function makeTrie() {
  const referenced = new Set<number>();
  const trie = new PrefixTrie(2, (block) => referenced.has(block));
  const check = () => assert.deepEqual(trie.problems(), []);
  /** Evict until nothing is evictable; returns the blocks in eviction order. */
  const drain = () => {
    const order: number[] = [];
    for (
      let b = trie.evictLeastRecentlyUsed();
      b !== undefined;
      b = trie.evictLeastRecentlyUsed()
    ) {
      order.push(b);
      check();
    }
    return order;
  };
  return { trie, referenced, check, drain };
}

/** Insert a chain of blocks for `tokens` (whole blocks only) at `clock`; returns the nodes. */
function insertChain(trie: PrefixTrie, tokens: number[], blocks: number[], clock: number) {
  const nodes: TrieNode[] = [];
  let parent = trie.root;
  blocks.forEach((block, i) => {
    parent = trie.insert(parent, tokens.slice(2 * i, 2 * i + 2), block, clock);
    nodes.push(parent);
  });
  return nodes;
}

Deno.test("trie: match walks whole blocks of the longest cached prefix", () => {
  const { trie, check } = makeTrie();
  insertChain(trie, [1, 2, 3, 4, 5, 6], [10, 11, 12], 1);
  check();
  const blocksOf = (nodes: TrieNode[]) => nodes.map((n) => n.block);
  assert.deepEqual(blocksOf(trie.match([1, 2, 3, 4, 5, 6, 7], 9)), [10, 11, 12]);
  assert.deepEqual(blocksOf(trie.match([1, 2, 3, 4, 5, 6], 2)), [10, 11], "maxBlocks caps the hit");
  assert.deepEqual(blocksOf(trie.match([1, 2, 3, 9, 5, 6], 9)), [10], "diverges inside block 2");
  assert.deepEqual(blocksOf(trie.match([1, 2, 3], 9)), [10], "a partial tail block never matches");
  assert.deepEqual(blocksOf(trie.match([2, 1], 9)), []);
  const deepest = trie.match([1, 2, 3, 4, 5, 6], 9)[2];
  assert.equal(deepest.depth, 3);
  assert.deepEqual(deepest.tokens, [5, 6]);
  assert.equal(trie.size, 3);
});

Deno.test("trie: the same tokens under different parents are different nodes", () => {
  const { trie, check } = makeTrie();
  insertChain(trie, [1, 2, 7, 7], [0, 1], 1);
  insertChain(trie, [3, 4, 7, 7], [2, 3], 1);
  check();
  assert.deepEqual(trie.match([3, 4, 7, 7], 9).map((n) => n.block), [2, 3]);
  assert.deepEqual(trie.match([7, 7], 9), [], "[7, 7] is cached only after a prefix");
});

Deno.test("trie: inserting a cached path returns the existing node and inserts nothing", () => {
  const { trie, check } = makeTrie();
  const [first] = insertChain(trie, [1, 2], [5], 1);
  const again = trie.insert(trie.root, [1, 2], 6, 2);
  assert.equal(again, first);
  assert.equal(again.block, 5);
  assert.equal(trie.nodeOf(6), undefined);
  assert.equal(trie.size, 1);
  check();
});

Deno.test("trie: malformed inserts are integrity errors", () => {
  const { trie } = makeTrie();
  insertChain(trie, [1, 2], [5], 1);
  assert.throws(() => trie.insert(trie.root, [1, 2, 3], 6, 1), KvIntegrityError);
  assert.throws(() => trie.insert(trie.root, [3, 4], 5, 1), /already in the trie/);
});

Deno.test("trie: eviction takes least recently used leaves; ties: deeper, then lower id", () => {
  const { trie, drain } = makeTrie();
  insertChain(trie, [1, 2, 3, 4, 5, 6], [0, 1, 2], 5); // one chain, all at clock 5
  insertChain(trie, [7, 8], [3], 3); // older
  insertChain(trie, [9, 9], [4], 5); // same clock as the chain, depth 1
  // Block 3 is oldest. At clock 5 the deeper leaf goes first (2, then 1, each
  // a leaf once its child is gone); 0 and 4 then tie at depth 1 and the lower
  // id goes first.
  assert.deepEqual(drain(), [3, 2, 1, 0, 4]);
  assert.equal(trie.size, 0);
});

Deno.test("trie: referenced blocks and their ancestors are never evicted", () => {
  const { trie, referenced, check, drain } = makeTrie();
  const [, middle] = insertChain(trie, [1, 2, 3, 4, 5, 6], [0, 1, 2], 1);
  insertChain(trie, [1, 2, 9, 9], [0, 3], 2); // shares block 0, adds sibling 3
  referenced.add(1);
  trie.refCountChanged(1);
  check();
  assert.equal(
    trie.countEvictable(),
    2,
    "leaf 2 and sibling 3; not 1 (referenced) nor 0 (its parent)",
  );
  assert.deepEqual(drain(), [2, 3]);
  assert.equal(trie.nodeOf(1), middle);
  referenced.delete(1);
  trie.refCountChanged(1);
  assert.equal(trie.countEvictable(), 2);
  assert.deepEqual(drain(), [1, 0]);
});

Deno.test("trie: touchPath refreshes a node and its ancestors", () => {
  const { trie, drain } = makeTrie();
  const [a, b] = insertChain(trie, [1, 2, 3, 4], [0, 1], 1);
  insertChain(trie, [5, 6], [2], 2);
  trie.touchPath(b, 3);
  assert.equal(a.lastUsed, 3);
  assert.equal(b.lastUsed, 3);
  assert.equal(trie.root.lastUsed, 0, "the root is not a block");
  assert.deepEqual(drain(), [2, 1, 0]);
});

Deno.test("trie: problems() reports a corrupted structure", () => {
  const { trie, referenced, check } = makeTrie();
  insertChain(trie, [1, 2, 3, 4], [0, 1], 1);
  check();
  // Reference block 1 behind the trie's back: the evictable-leaf set is now stale.
  referenced.add(1);
  assert.match(trie.problems().join("; "), /trie node of block 1: evictable-leaf set/);
  trie.refCountChanged(1);
  check();
  // Detach a child from its parent map without removing it from the block index.
  trie.root.children.clear();
  assert.match(trie.problems().join("; "), /0 nodes reachable from the root, block index holds 2/);
});
