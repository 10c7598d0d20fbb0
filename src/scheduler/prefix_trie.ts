/**
 * Prefix trie over full KV blocks. The K/V of a block depend on its own token
 * ids and on every token before it (causal attention), so a block's identity is
 * its whole token path: a node is (parent node, the blockSize token ids of its
 * block). Two sequences whose prompts start with the same full blocks walk the
 * same nodes and can share the physical blocks those nodes hold.
 *
 * The trie does not own reference counts (the block manager does); it asks
 * `isReferenced(block)` and keeps the set of evictable leaves (unreferenced
 * nodes without children) up to date when told a count changed. Only leaves are
 * evicted, so removing a node never orphans a child that a sequence still reads
 * through.
 *
 * K/V also depend on the weights that computed them, so a sequence on a LoRA adapter
 * must never share blocks with the base model or another adapter: every adapter id
 * (a namespace) has its own root, and the same tokens under different roots are
 * different nodes. The base model's root is `root` (namespace undefined).
 */

import { KvIntegrityError } from "./errors.ts";

export interface TrieNode {
  /** Physical KV block holding this node's tokens; -1 for the root. */
  readonly block: number;
  /** The blockSize token ids of the block ([] for the root). */
  readonly tokens: readonly number[];
  readonly parent: TrieNode | null;
  /** 0 for the root; a node at depth d covers positions (d-1)*blockSize .. d*blockSize-1. */
  readonly depth: number;
  readonly children: Map<string, TrieNode>;
  /** Logical clock of the last request that used this prefix (for LRU eviction). */
  lastUsed: number;
}

/** Children are keyed by their token ids; a string key makes Map lookup by value work. */
function keyOf(tokens: readonly number[]): string {
  return tokens.join(",");
}

export class PrefixTrie {
  readonly root: TrieNode = {
    block: -1,
    tokens: [],
    parent: null,
    depth: 0,
    children: new Map(),
    lastUsed: 0,
  };
  /** Root of each namespace (adapter id; undefined: the base model). */
  private readonly roots = new Map<string | undefined, TrieNode>([[undefined, this.root]]);
  private readonly nodeByBlock = new Map<number, TrieNode>();
  private readonly evictableLeaves = new Set<TrieNode>();

  constructor(
    readonly blockSize: number,
    private readonly isReferenced: (block: number) => boolean,
  ) {}

  /** Number of blocks held by the trie (referenced or not). */
  get size(): number {
    return this.nodeByBlock.size;
  }

  nodeOf(block: number): TrieNode | undefined {
    return this.nodeByBlock.get(block);
  }

  /** The root of a namespace (adapter id; undefined: the base model), made on first use. */
  rootOf(namespace: string | undefined): TrieNode {
    let root = this.roots.get(namespace);
    if (!root) {
      root = { block: -1, tokens: [], parent: null, depth: 0, children: new Map(), lastUsed: 0 };
      this.roots.set(namespace, root);
    }
    return root;
  }

  /**
   * Removes a namespace and every block cached under it (none may be referenced: the caller
   * makes sure no sequence runs on it). Returns the blocks, now free. The base namespace stays.
   */
  dropNamespace(namespace: string): number[] {
    const root = this.roots.get(namespace);
    if (!root) return [];
    const blocks: number[] = [];
    const visit = (node: TrieNode): void => {
      for (const child of node.children.values()) {
        visit(child);
        if (this.isReferenced(child.block)) {
          throw new KvIntegrityError(
            `trie: dropping namespace "${namespace}", but its block ${child.block} is referenced`,
          );
        }
        blocks.push(child.block);
      }
    };
    visit(root);
    for (const block of blocks) {
      this.evictableLeaves.delete(this.nodeByBlock.get(block)!);
      this.nodeByBlock.delete(block);
    }
    this.roots.delete(namespace);
    return blocks;
  }

  /**
   * Nodes of the longest run of full blocks that `tokens` starts with, at most `maxBlocks`,
   * in the namespace (adapter id; undefined: the base model).
   */
  match(tokens: readonly number[], maxBlocks: number, namespace?: string): TrieNode[] {
    const path: TrieNode[] = [];
    const root = this.roots.get(namespace);
    if (!root) return path;
    let node = root;
    const B = this.blockSize;
    for (let i = 0; i < maxBlocks && (i + 1) * B <= tokens.length; i++) {
      const child = node.children.get(keyOf(tokens.slice(i * B, (i + 1) * B)));
      if (!child) break;
      path.push(child);
      node = child;
    }
    return path;
  }

  /**
   * Put `block` (holding `tokens`) under `parent`. If that token path is already
   * cached the existing node is returned and `block` is not inserted: the caller
   * decides what to do with its duplicate.
   */
  insert(parent: TrieNode, tokens: readonly number[], block: number, clock: number): TrieNode {
    if (tokens.length !== this.blockSize) {
      throw new KvIntegrityError(
        `trie insert: block ${block} has ${tokens.length} tokens, not ${this.blockSize}`,
      );
    }
    const key = keyOf(tokens);
    const existing = parent.children.get(key);
    if (existing) return existing;
    if (this.nodeByBlock.has(block)) {
      throw new KvIntegrityError(
        `trie insert: block ${block} is already in the trie at another path`,
      );
    }
    const node: TrieNode = {
      block,
      tokens: [...tokens],
      parent,
      depth: parent.depth + 1,
      children: new Map(),
      lastUsed: clock,
    };
    parent.children.set(key, node);
    this.nodeByBlock.set(block, node);
    // The parent gained a child, so it is no longer a leaf.
    this.evictableLeaves.delete(parent);
    this.refresh(node);
    return node;
  }

  /** Mark `node` and its ancestors used at `clock`: using a prefix uses everything before it. */
  touchPath(node: TrieNode, clock: number): void {
    for (let n: TrieNode | null = node; n && n.depth > 0; n = n.parent) n.lastUsed = clock;
  }

  /** Re-evaluate whether `block`'s node is an evictable leaf, after its reference count changed. */
  refCountChanged(block: number): void {
    const node = this.nodeByBlock.get(block);
    if (node) this.refresh(node);
  }

  /**
   * Remove the evictable leaf used least recently and return its block, or
   * undefined when none is evictable. Ties (same clock) go to the deeper node,
   * then to the lower block id, so eviction order is fully deterministic.
   */
  evictLeastRecentlyUsed(): number | undefined {
    let victim: TrieNode | undefined;
    for (const leaf of this.evictableLeaves) {
      if (!victim || evictsBefore(leaf, victim)) victim = leaf;
    }
    if (!victim) return undefined;
    const parent = victim.parent!;
    parent.children.delete(keyOf(victim.tokens));
    this.nodeByBlock.delete(victim.block);
    this.evictableLeaves.delete(victim);
    if (parent.depth > 0) this.refresh(parent);
    return victim.block;
  }

  /**
   * How many blocks repeated leaf eviction could free: nodes whose whole subtree is unreferenced.
   */
  countEvictable(): number {
    let count = 0;
    // Returns true when the subtree under `node` (node included) holds no referenced block.
    const visit = (node: TrieNode): boolean => {
      let unreferenced = true;
      for (const child of node.children.values()) unreferenced = visit(child) && unreferenced;
      if (node.depth === 0) return unreferenced;
      unreferenced &&= !this.isReferenced(node.block);
      if (unreferenced) count++;
      return unreferenced;
    };
    for (const root of this.roots.values()) visit(root);
    return count;
  }

  /** Structural problems (empty when consistent): links, depths, keys, block index, leaf set. */
  problems(): string[] {
    const problems: string[] = [];
    let reachable = 0;
    const visit = (node: TrieNode): void => {
      for (const [key, child] of node.children) {
        reachable++;
        const where = `trie node of block ${child.block}`;
        if (child.parent !== node) {
          problems.push(`${where}: parent link does not point to its parent`);
        }
        if (child.depth !== node.depth + 1) {
          problems.push(`${where}: depth ${child.depth}, parent depth ${node.depth}`);
        }
        if (child.tokens.length !== this.blockSize) {
          problems.push(`${where}: ${child.tokens.length} tokens, block size ${this.blockSize}`);
        }
        if (key !== keyOf(child.tokens)) {
          problems.push(`${where}: child key does not match its tokens`);
        }
        if (this.nodeByBlock.get(child.block) !== child) {
          problems.push(`${where}: block index points elsewhere`);
        }
        const shouldBeEvictable = !this.isReferenced(child.block) && child.children.size === 0;
        if (shouldBeEvictable !== this.evictableLeaves.has(child)) {
          problems.push(
            `${where}: evictable-leaf set says ${!shouldBeEvictable}, should be ` +
              `${shouldBeEvictable}`,
          );
        }
        visit(child);
      }
    };
    for (const root of this.roots.values()) visit(root);
    if (reachable !== this.nodeByBlock.size) {
      problems.push(
        `trie: ${reachable} nodes reachable from the root, block index holds ` +
          `${this.nodeByBlock.size}`,
      );
    }
    for (const leaf of this.evictableLeaves) {
      if (this.nodeByBlock.get(leaf.block) !== leaf) {
        problems.push(`trie: evictable-leaf set holds removed block ${leaf.block}`);
      }
    }
    return problems;
  }

  private refresh(node: TrieNode): void {
    if (!this.isReferenced(node.block) && node.children.size === 0) this.evictableLeaves.add(node);
    else this.evictableLeaves.delete(node);
  }
}

function evictsBefore(a: TrieNode, b: TrieNode): boolean {
  if (a.lastUsed !== b.lastUsed) return a.lastUsed < b.lastUsed;
  if (a.depth !== b.depth) return a.depth > b.depth;
  return a.block < b.block;
}
