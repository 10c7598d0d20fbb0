/**
 * KV block manager: decides which physical blocks of the engine's paged KV pool
 * (numBlocks blocks of blockSize token positions) each sequence writes through.
 *
 * Every block is in exactly one state:
 *  - free:   in the free list, referenced by nothing;
 *  - used:   in at least one sequence's block table (refCount = number of tables);
 *  - cached: a full block kept in the prefix trie with refCount 0, so a later
 *            request with the same token prefix reuses its K/V; evicted least
 *            recently used first when free blocks run out.
 *
 * Life of a sequence (the scheduler drives it):
 *  1. allocate(seqId, prompt): the longest cached prefix of whole blocks is
 *     shared, blocks for the rest of the prompt are reserved; prefill starts at
 *     position numCached.
 *  2. After each step computed tokens, commitTokens(seqId, thoseTokens): full
 *     blocks enter the trie. If the same token path is already cached in another
 *     block, the sequence switches to that block and its own copy is freed
 *     (same K/V, less memory), so re-read blockTable() before every step.
 *  3. appendSlots(seqId, n) before decoding n more tokens.
 *  4. free(seqId) when done or preempted.
 *
 * Only full blocks are ever shared (prefix hits and identical committed blocks), so a sequence
 * always writes new tokens into a block it holds alone; prune copies the shared blocks its
 * compaction writes into.
 *
 * allocate and appendSlots return null when the pool is full right now: the
 * scheduler then preempts its lowest-priority sequence (free it, recompute it
 * later; its full blocks stay cached, so the recompute mostly hits the trie) and
 * retries. They throw OutOfKvBlocksError only when the sequence alone needs more
 * blocks than the whole pool.
 *
 * Determinism (tests pin exact ids): new blocks are the lowest free ids, in
 * ascending order. The LRU clock is logical: it advances by one on each
 * successful allocate, each commitTokens and each free, and stamps the trie path
 * the operation used.
 */

import type { BlockCopy } from "../engine/step.ts";
import { BlockManagerUsageError, KvIntegrityError, OutOfKvBlocksError } from "./errors.ts";
import { PrefixTrie, type TrieNode } from "./prefix_trie.ts";

export interface BlockManagerOptions {
  /** Blocks in the engine's KV pool. */
  numBlocks: number;
  /** Token positions per block (16 by default in the engine). */
  blockSize: number;
  /** Share full blocks between requests with a common prefix (off for the ablation). */
  enablePrefixCaching: boolean;
}

export interface Allocation {
  /**
   * Leading prompt tokens whose K/V are already in shared blocks: a multiple of blockSize, < prompt
   * length.
   */
  numCached: number;
  /** Physical blocks covering positions 0 .. prompt.length - 1. */
  blockTable: number[];
}

export interface BlockManagerStats {
  total: number;
  free: number;
  used: number;
  cached: number;
  /** Prompt tokens served from the prefix cache, over all successful allocations. */
  prefixHitTokens: number;
  /** Prompt tokens of all successful allocations. */
  promptTokens: number;
  /** prefixHitTokens / promptTokens (0 before any allocation). */
  hitRate: number;
}

interface Sequence {
  /** Physical block of each blockSize-token span of positions. */
  blockTable: number[];
  /** The prompt given to allocate: committed tokens must agree with it. */
  prompt: readonly number[];
  /** Token ids whose K/V are computed, position order (the prefix hit included). */
  committed: number[];
  /**
   * Positions with a block reserved: the committed ones plus those appended but not yet computed.
   */
  numSlots: number;
  /** Trie node of the last full committed block; the root when none or prefix caching is off. */
  lastNode: TrieNode;
  /**
   * The LoRA adapter whose K/V the blocks hold (undefined: the base model): its own trie namespace.
   */
  adapterId: string | undefined;
  /**
   * KV entries were evicted (pruning): slots no longer match positions, so the sequence's
   * later blocks never enter the trie; its path covers only the blocks before the first edit.
   */
  pruned: boolean;
}

/** What the engine must do to compact a pruned sequence: see BlockManager.prune. */
export interface PruneEdit {
  /** Copies of shared or cached blocks the compaction writes into (done first). */
  copies: BlockCopy[];
  /** (source, destination) physical slots (block * blockSize + offset), original contents. */
  moves: [number, number][];
  /** Blocks the sequence gave back. */
  releasedBlocks: number;
}

export class BlockManager {
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly enablePrefixCaching: boolean;
  private readonly refCounts: Int32Array;
  private readonly freeList: FreeBlockList;
  private readonly trie: PrefixTrie;
  private readonly sequences = new Map<number, Sequence>();
  private clock = 0;
  private prefixHitTokens = 0;
  private promptTokens = 0;

  constructor(options: BlockManagerOptions) {
    const { numBlocks, blockSize, enablePrefixCaching } = options;
    if (!Number.isInteger(numBlocks) || numBlocks < 1) {
      throw new BlockManagerUsageError(`numBlocks must be a positive integer, got ${numBlocks}`);
    }
    if (!Number.isInteger(blockSize) || blockSize < 1) {
      throw new BlockManagerUsageError(`blockSize must be a positive integer, got ${blockSize}`);
    }
    this.numBlocks = numBlocks;
    this.blockSize = blockSize;
    this.enablePrefixCaching = enablePrefixCaching;
    this.refCounts = new Int32Array(numBlocks);
    this.freeList = new FreeBlockList(numBlocks);
    this.trie = new PrefixTrie(blockSize, (block) => this.refCounts[block] > 0);
  }

  /**
   * Reserve blocks for a new sequence's prompt, sharing the cached blocks of its
   * longest cached prefix. At least the last prompt token is left to compute, so
   * the step produces logits for it. Null when the pool cannot hold it now.
   * Blocks are shared only between sequences on the same adapter (`adapterId`; undefined:
   * the base model), since the adapter changes the K/V of every token.
   */
  allocate(seqId: number, prompt: readonly number[], adapterId?: string): Allocation | null {
    if (this.sequences.has(seqId)) {
      throw new BlockManagerUsageError(`sequence ${seqId} is already allocated`);
    }
    if (prompt.length === 0) {
      throw new BlockManagerUsageError(`sequence ${seqId}: the prompt is empty`);
    }
    const blocksNeeded = this.blocksFor(prompt.length);
    if (blocksNeeded > this.numBlocks) {
      throw new OutOfKvBlocksError(
        seqId,
        prompt.length,
        blocksNeeded,
        this.numBlocks,
        this.blockSize,
      );
    }
    const maxShared = Math.floor((prompt.length - 1) / this.blockSize);
    const shared = this.enablePrefixCaching ? this.trie.match(prompt, maxShared, adapterId) : [];
    // Pin the shared blocks first so that making room cannot evict them.
    for (const node of shared) this.addRef(node.block);
    const fresh = blocksNeeded - shared.length;
    if (!this.canFree(fresh)) {
      for (const node of shared) this.release(node.block);
      return null;
    }
    const blockTable = [...shared.map((node) => node.block), ...this.takeBlocks(fresh)];
    const numCached = shared.length * this.blockSize;
    const lastNode = shared.at(-1) ??
      (this.enablePrefixCaching ? this.trie.rootOf(adapterId) : this.trie.root);
    this.clock++;
    this.trie.touchPath(lastNode, this.clock);
    this.sequences.set(seqId, {
      blockTable,
      prompt: [...prompt],
      committed: prompt.slice(0, numCached),
      numSlots: prompt.length,
      lastNode,
      adapterId,
      pruned: false,
    });
    this.prefixHitTokens += numCached;
    this.promptTokens += prompt.length;
    return { numCached, blockTable: [...blockTable] };
  }

  /**
   * Reserve positions for `n` more tokens after the sequence's current slots. False (nothing
   * changed) when the pool cannot hold them now. The sequence's last block, where the first of
   * them go, is never shared: sharing covers full blocks only.
   */
  appendSlots(seqId: number, n: number): boolean {
    const seq = this.sequence(seqId);
    if (!Number.isInteger(n) || n < 1) {
      throw new BlockManagerUsageError(
        `sequence ${seqId}: appendSlots needs a positive token count, got ${n}`,
      );
    }
    const newSlots = seq.numSlots + n;
    const blocksNeeded = this.blocksFor(newSlots);
    if (blocksNeeded > this.numBlocks) {
      throw new OutOfKvBlocksError(seqId, newSlots, blocksNeeded, this.numBlocks, this.blockSize);
    }
    const fresh = blocksNeeded - seq.blockTable.length;
    if (!this.canFree(fresh)) return false;
    seq.blockTable.push(...this.takeBlocks(fresh));
    seq.numSlots = newSlots;
    return true;
  }

  /**
   * Record that the next `tokens` of the sequence (already appended) have their
   * K/V computed. Blocks that became full enter the prefix trie.
   */
  commitTokens(seqId: number, tokens: readonly number[]): void {
    const seq = this.sequence(seqId);
    const start = seq.committed.length;
    if (start + tokens.length > seq.numSlots) {
      throw new BlockManagerUsageError(
        `sequence ${seqId}: committing ${tokens.length} tokens after ${start} exceeds its ` +
          `${seq.numSlots} reserved slots; call appendSlots first`,
      );
    }
    for (let i = 0; i < tokens.length && start + i < seq.prompt.length && !seq.pruned; i++) {
      if (tokens[i] !== seq.prompt[start + i]) {
        throw new BlockManagerUsageError(
          `sequence ${seqId}: committed token ${tokens[i]} at position ${start + i} differs ` +
            `from the prompt's ${seq.prompt[start + i]}`,
        );
      }
    }
    this.clock++;
    seq.committed.push(...tokens);
    if (this.enablePrefixCaching && !seq.pruned) this.insertFullBlocks(seq);
  }

  /**
   * Evict KV entries of a sequence: keep only the slots in `keep` (ascending, each below its
   * slot count), compacted to slots 0 .. keep.length-1 in that order. Blocks the compaction
   * writes into that other sequences share or the trie caches are copied first; blocks past
   * the new end are released. Every appended slot must be committed (no step in flight for
   * it). Null (nothing changed) when the copies need more blocks than are available.
   */
  prune(seqId: number, keep: readonly number[]): PruneEdit | null {
    const seq = this.sequence(seqId);
    if (seq.committed.length !== seq.numSlots) {
      throw new BlockManagerUsageError(
        `prune: sequence ${seqId} has ${seq.numSlots - seq.committed.length} uncommitted slots`,
      );
    }
    keep.forEach((slot, i) => {
      if (
        !Number.isInteger(slot) || slot < 0 || slot >= seq.numSlots ||
        (i > 0 && slot <= keep[i - 1])
      ) {
        throw new BlockManagerUsageError(
          `prune: sequence ${seqId}: keep must list ascending slots below ${seq.numSlots}`,
        );
      }
    });
    const B = this.blockSize;
    let firstMoved = keep.findIndex((slot, i) => slot !== i);
    if (firstMoved < 0) firstMoved = keep.length;
    const newBlocks = this.blocksFor(keep.length);
    const written: number[] = [];
    for (let b = Math.floor(firstMoved / B); b < newBlocks; b++) {
      const block = seq.blockTable[b];
      if (this.refCounts[block] > 1 || this.trie.nodeOf(block)) written.push(b);
    }
    if (!this.canFree(written.length)) return null;
    this.clock++;
    const copies: BlockCopy[] = [];
    for (const b of written) {
      const src = seq.blockTable[b];
      const [dst] = this.takeBlocks(1);
      copies.push({ src, dst });
      seq.blockTable[b] = dst;
      this.release(src);
    }
    const physical = (slot: number) => seq.blockTable[Math.floor(slot / B)] * B + (slot % B);
    const moves: [number, number][] = [];
    for (let i = firstMoved; i < keep.length; i++) moves.push([physical(keep[i]), physical(i)]);
    const released = seq.blockTable.splice(newBlocks);
    for (const block of released) this.release(block);
    seq.committed = keep.map((slot) => seq.committed[slot]);
    seq.numSlots = keep.length;
    seq.pruned = true;
    // The trie path keeps only whole blocks before the first moved slot (unchanged, still cached).
    while (seq.lastNode.depth > Math.floor(firstMoved / B)) seq.lastNode = seq.lastNode.parent!;
    return { copies, moves, releasedBlocks: released.length };
  }

  /**
   * Drop the sequence (finished or preempted). Its blocks lose a reference;
   * full blocks in the trie that nobody references become cached, the rest free.
   */
  free(seqId: number): void {
    const seq = this.sequence(seqId);
    this.clock++;
    this.trie.touchPath(seq.lastNode, this.clock);
    for (const block of seq.blockTable) this.release(block);
    this.sequences.delete(seqId);
  }

  /**
   * Frees every block cached for an adapter that will never run again (an unloaded version):
   * its K/V can match no later request. No sequence may still run on it.
   */
  dropAdapter(adapterId: string): void {
    for (const [seqId, seq] of this.sequences) {
      if (seq.adapterId === adapterId) {
        throw new BlockManagerUsageError(
          `dropAdapter: sequence ${seqId} still runs on adapter "${adapterId}"`,
        );
      }
    }
    for (const block of this.trie.dropNamespace(adapterId)) this.freeList.add(block);
  }

  blockTable(seqId: number): number[] {
    return [...this.sequence(seqId).blockTable];
  }

  /** Blocks a new request could get now: free ones plus cached ones that eviction can reach. */
  numAvailableBlocks(): number {
    return this.freeList.size + this.trie.countEvictable();
  }

  /**
   * Evict cached blocks, least recently used leaves first, until at least `n`
   * blocks are free or nothing more is evictable. Returns the evicted ids in order.
   */
  evict(n: number): number[] {
    const evicted: number[] = [];
    while (this.freeList.size < n) {
      const block = this.trie.evictLeastRecentlyUsed();
      if (block === undefined) break;
      this.freeList.add(block);
      evicted.push(block);
    }
    return evicted;
  }

  /** How many block tables hold `block` (0 for free and cached blocks). */
  refCount(block: number): number {
    if (!Number.isInteger(block) || block < 0 || block >= this.numBlocks) {
      throw new BlockManagerUsageError(`block id ${block} is outside 0..${this.numBlocks - 1}`);
    }
    return this.refCounts[block];
  }

  stats(): BlockManagerStats {
    let used = 0;
    let cached = 0;
    for (let b = 0; b < this.numBlocks; b++) {
      if (this.refCounts[b] > 0) used++;
      else if (this.trie.nodeOf(b)) cached++;
    }
    return {
      total: this.numBlocks,
      free: this.freeList.size,
      used,
      cached,
      prefixHitTokens: this.prefixHitTokens,
      promptTokens: this.promptTokens,
      hitRate: this.promptTokens === 0 ? 0 : this.prefixHitTokens / this.promptTokens,
    };
  }

  /** Throws KvIntegrityError listing every broken invariant. Tests call it after each operation. */
  checkIntegrity(): void {
    const problems: string[] = [];
    const refsFromTables = new Int32Array(this.numBlocks);
    for (const [seqId, seq] of this.sequences) {
      const where = `sequence ${seqId}`;
      if (seq.blockTable.length !== this.blocksFor(seq.numSlots)) {
        problems.push(`${where}: ${seq.blockTable.length} blocks for ${seq.numSlots} slots`);
      }
      if (seq.committed.length > seq.numSlots) {
        problems.push(`${where}: ${seq.committed.length} committed tokens > ${seq.numSlots} slots`);
      }
      const inThisTable = new Set<number>();
      for (const block of seq.blockTable) {
        if (!Number.isInteger(block) || block < 0 || block >= this.numBlocks) {
          problems.push(`${where}: block id ${block} out of range`);
          continue;
        }
        if (inThisTable.has(block)) {
          problems.push(`${where}: block ${block} appears twice in its table`);
        }
        inThisTable.add(block);
        refsFromTables[block]++;
      }
      problems.push(...this.pathProblems(where, seq));
    }
    for (let b = 0; b < this.numBlocks; b++) {
      if (this.refCounts[b] < 0) {
        problems.push(`block ${b}: negative ref count ${this.refCounts[b]}`);
      }
      if (this.refCounts[b] !== refsFromTables[b]) {
        problems.push(
          `block ${b}: ref count ${this.refCounts[b]} but ${refsFromTables[b]} tables hold it`,
        );
      }
    }
    const inFreeList = new Set<number>();
    for (const block of this.freeList.ascending()) {
      if (inFreeList.has(block)) problems.push(`free block ${block} listed twice`);
      inFreeList.add(block);
      if (refsFromTables[block] > 0) {
        problems.push(`free block ${block} is referenced by a block table`);
      }
      if (this.trie.nodeOf(block)) problems.push(`free block ${block} is referenced by the trie`);
    }
    for (let b = 0; b < this.numBlocks; b++) {
      if (this.refCounts[b] === 0 && !this.trie.nodeOf(b) && !inFreeList.has(b)) {
        problems.push(`block ${b} leaked: not free, not used, not cached`);
      }
    }
    if (!this.freeList.isSorted()) problems.push(`free list is out of order`);
    const s = this.stats();
    if (s.free + s.used + s.cached !== s.total) {
      problems.push(`free ${s.free} + used ${s.used} + cached ${s.cached} != total ${s.total}`);
    }
    if (!this.enablePrefixCaching && this.trie.size > 0) {
      problems.push(`prefix caching is off but the trie holds ${this.trie.size} blocks`);
    }
    if (s.prefixHitTokens > s.promptTokens) {
      problems.push(`prefix hit tokens ${s.prefixHitTokens} > prompt tokens ${s.promptTokens}`);
    }
    problems.push(...this.trie.problems());
    if (problems.length > 0) throw new KvIntegrityError(`KV block manager: ${problems.join("; ")}`);
  }

  /**
   * A sequence's trie path must be exactly its full committed blocks, in order, with their
   * tokens (for a pruned sequence: a prefix of them).
   */
  private pathProblems(where: string, seq: Sequence): string[] {
    if (!this.enablePrefixCaching) {
      return seq.lastNode === this.trie.root ? [] : [`${where}: has a trie path with caching off`];
    }
    const problems: string[] = [];
    const fullBlocks = Math.floor(seq.committed.length / this.blockSize);
    if (seq.pruned ? seq.lastNode.depth > fullBlocks : seq.lastNode.depth !== fullBlocks) {
      problems.push(
        `${where}: trie path depth ${seq.lastNode.depth}, ${fullBlocks} full committed blocks`,
      );
      return problems;
    }
    let node = seq.lastNode;
    for (; node.depth > 0; node = node.parent!) {
      const i = node.depth - 1;
      if (node.parent === null) {
        problems.push(`${where}: trie path is detached from the root`);
        break;
      }
      if (this.trie.nodeOf(node.block) !== node) {
        problems.push(`${where}: trie path node of block ${node.block} was evicted`);
      }
      if (seq.blockTable[i] !== node.block) {
        problems.push(
          `${where}: block ${i} is ${seq.blockTable[i]} but its trie node holds ${node.block}`,
        );
      }
      const tokens = seq.committed.slice(i * this.blockSize, (i + 1) * this.blockSize);
      if (tokens.join(",") !== node.tokens.join(",")) {
        problems.push(`${where}: block ${i}'s committed tokens differ from its trie node's`);
      }
    }
    if (node.depth === 0 && node !== this.trie.rootOf(seq.adapterId)) {
      problems.push(
        `${where}: trie path is not under its adapter's root (${seq.adapterId ?? "base"})`,
      );
    }
    return problems;
  }

  /**
   * Put the sequence's newly full committed blocks into the trie. When another
   * block already caches the same token path, share that one and free ours.
   */
  private insertFullBlocks(seq: Sequence): void {
    const B = this.blockSize;
    for (let i = seq.lastNode.depth; (i + 1) * B <= seq.committed.length; i++) {
      const own = seq.blockTable[i];
      const node = this.trie.insert(
        seq.lastNode,
        seq.committed.slice(i * B, (i + 1) * B),
        own,
        this.clock,
      );
      if (node.block !== own) {
        this.addRef(node.block);
        seq.blockTable[i] = node.block;
        this.release(own);
      }
      seq.lastNode = node;
    }
    this.trie.touchPath(seq.lastNode, this.clock);
  }

  private sequence(seqId: number): Sequence {
    const seq = this.sequences.get(seqId);
    if (!seq) throw new BlockManagerUsageError(`sequence ${seqId} is not allocated`);
    return seq;
  }

  private blocksFor(numTokens: number): number {
    return Math.ceil(numTokens / this.blockSize);
  }

  private canFree(n: number): boolean {
    return n <= this.freeList.size || n <= this.numAvailableBlocks();
  }

  /** The n lowest free ids (ascending), evicting cached blocks first if too few are free. */
  private takeBlocks(n: number): number[] {
    this.evict(n);
    const blocks: number[] = [];
    for (let i = 0; i < n; i++) {
      const block = this.freeList.takeLowest();
      this.refCounts[block] = 1;
      blocks.push(block);
    }
    return blocks;
  }

  private addRef(block: number): void {
    this.refCounts[block]++;
    if (this.refCounts[block] === 1) this.trie.refCountChanged(block);
  }

  /** Drop one reference; an unreferenced block becomes cached if the trie holds it, else free. */
  private release(block: number): void {
    this.refCounts[block]--;
    if (this.refCounts[block] > 0) return;
    if (this.trie.nodeOf(block)) this.trie.refCountChanged(block);
    else this.freeList.add(block);
  }
}

/** Free block ids, handed out lowest first so block tables are deterministic. */
class FreeBlockList {
  /** Sorted descending, so the lowest id pops off the end in O(1). */
  private readonly descending: number[];

  /** Starts with every block 0 .. numBlocks-1 free. */
  constructor(numBlocks: number) {
    this.descending = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i);
  }

  get size(): number {
    return this.descending.length;
  }

  add(block: number): void {
    // Binary search for the first index whose id is smaller than `block`.
    let lo = 0;
    let hi = this.descending.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.descending[mid] > block) lo = mid + 1;
      else hi = mid;
    }
    this.descending.splice(lo, 0, block);
  }

  takeLowest(): number {
    const block = this.descending.pop();
    if (block === undefined) throw new KvIntegrityError("free list is empty");
    return block;
  }

  ascending(): number[] {
    return [...this.descending].reverse();
  }

  isSorted(): boolean {
    return this.descending.every((b, i) => i === 0 || this.descending[i - 1] > b);
  }
}
