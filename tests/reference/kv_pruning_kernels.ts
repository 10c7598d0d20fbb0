/**
 * Float64 CPU references for the H2O-style KV-pruning kernels:
 *  - attentionMassReference (attention_mass.wgsl): accumulated attention probability per cached
 *    key, over the paged K pool [numBlocks, Hkv, BS, hd];
 *  - kvCompactReference (kv_compact.wgsl): moves of KV entries (and their mass) between physical
 *    slots, every move reading the original contents.
 * A physical slot is block * BS + offset, an index into a per-slot array [numBlocks * BS].
 */
import { InvalidRequestError } from "../../src/engine/errors.ts";

export interface KvPoolShape {
  numKvHeads: number;
  headDim: number;
  /** Tokens per KV block (BS). */
  blockSize: number;
}

export interface MassShape extends KvPoolShape {
  numHeads: number;
}

/** One sequence's query tokens of this step, as attention_mass.wgsl's chunks entries. */
export interface MassChunk {
  /** Row of the chunk's first token in q [T, H hd]. */
  firstToken: number;
  numTokens: number;
  /** Index in the flat block tables of the sequence's first block id. */
  blockTableOffset: number;
  /** Keys seen by the chunk's first token (slots 0..numKeys0-1); token i sees numKeys0 + i. */
  numKeys0: number;
}

/**
 * Unweighted attention probability each logical key slot of one sequence receives from its
 * chunk: out[j] = sum over tokens i and query heads h of softmax_j(q[firstToken + i, h] .
 * keys[j, h / (H / Hkv)] / sqrt(hd)) over j < numKeys0 + i. keys: [numKeys, Hkv, hd] logical
 * (numKeys >= numKeys0 + numTokens - 1); q [T, H hd]. Returns out [numKeys0 + numTokens - 1].
 */
export function attentionMassLogical(
  q: ArrayLike<number>,
  keys: ArrayLike<number>,
  chunk: Pick<MassChunk, "firstToken" | "numTokens" | "numKeys0">,
  shape: Omit<MassShape, "blockSize">,
): Float64Array {
  const { numHeads: H, numKvHeads: Hkv, headDim: hd } = shape;
  const group = H / Hkv;
  const scale = 1 / Math.sqrt(hd);
  const total = chunk.numTokens > 0 ? chunk.numKeys0 + chunk.numTokens - 1 : 0;
  const out = new Float64Array(total);
  const scores = new Float64Array(total);
  for (let i = 0; i < chunk.numTokens; i++) {
    const t = chunk.firstToken + i;
    const numKeys = chunk.numKeys0 + i;
    for (let h = 0; h < H; h++) {
      const g = Math.floor(h / group);
      const qBase = (t * H + h) * hd;
      let max = -Infinity;
      for (let j = 0; j < numKeys; j++) {
        const kBase = (j * Hkv + g) * hd;
        let dot = 0;
        for (let d = 0; d < hd; d++) dot += q[qBase + d] * keys[kBase + d];
        scores[j] = dot * scale;
        max = Math.max(max, scores[j]);
      }
      let sum = 0;
      for (let j = 0; j < numKeys; j++) {
        scores[j] = Math.exp(scores[j] - max);
        sum += scores[j];
      }
      for (let j = 0; j < numKeys; j++) out[j] += scores[j] / sum;
    }
  }
  return out;
}

/**
 * Logical keys [numKeys, Hkv, hd] of a sequence read from a paged pool [numBlocks, Hkv, BS, hd]
 * through its block table (blockTables[tableOffset + j / BS] holds slot j's block).
 */
export function gatherLogicalKeys(
  pool: ArrayLike<number>,
  blockTables: ArrayLike<number>,
  tableOffset: number,
  numKeys: number,
  { numKvHeads: Hkv, headDim: hd, blockSize: bs }: KvPoolShape,
): Float64Array {
  const out = new Float64Array(numKeys * Hkv * hd);
  for (let j = 0; j < numKeys; j++) {
    const block = blockTables[tableOffset + Math.floor(j / bs)];
    for (let g = 0; g < Hkv; g++) {
      const src = ((block * Hkv + g) * bs + (j % bs)) * hd;
      for (let d = 0; d < hd; d++) out[(j * Hkv + g) * hd + d] = pool[src + d];
    }
  }
  return out;
}

/**
 * attention_mass.wgsl in float64: returns a copy of mass [numBlocks * BS] with, for every chunk
 * and every logical key slot j it attends to, weight * attentionMassLogical(...)[j] added at the
 * slot's physical index blockTables[offset + j / BS] * BS + j % BS. kCache [numBlocks, Hkv, BS,
 * hd]; q [T, H hd]. Chunks must belong to different sequences (disjoint physical slots).
 */
export function attentionMassReference(
  q: ArrayLike<number>,
  blockTables: ArrayLike<number>,
  kCache: ArrayLike<number>,
  chunks: readonly MassChunk[],
  mass: ArrayLike<number>,
  weight: number,
  shape: MassShape,
): Float64Array {
  const bs = shape.blockSize;
  const out = Float64Array.from(mass);
  for (const chunk of chunks) {
    if (chunk.numTokens === 0) continue;
    const numKeys = chunk.numKeys0 + chunk.numTokens - 1;
    const keys = gatherLogicalKeys(kCache, blockTables, chunk.blockTableOffset, numKeys, shape);
    const probs = attentionMassLogical(q, keys, chunk, shape);
    for (let j = 0; j < numKeys; j++) {
      const slot = blockTables[chunk.blockTableOffset + Math.floor(j / bs)] * bs + (j % bs);
      out[slot] += weight * probs[j];
    }
  }
  return out;
}

/** Offset of (physical slot, kv head g, element 0) in a pool [numBlocks, Hkv, BS, hd]. */
function slotBase(slot: number, g: number, { numKvHeads, headDim, blockSize }: KvPoolShape) {
  const block = Math.floor(slot / blockSize);
  return ((block * numKvHeads + g) * blockSize + (slot % blockSize)) * headDim;
}

/**
 * kv_compact.wgsl on CPU copies: for each move (src, dst) = (moves[2i], moves[2i + 1]), every kv
 * head's K and V row of physical slot src, and mass[src] when mass is given, are copied to slot
 * dst, reading the contents from before any move (so chains and swaps behave as one permutation).
 * Destinations must be distinct. Returns new arrays; untouched slots keep their values.
 */
export function kvCompactReference(
  kCache: ArrayLike<number>,
  vCache: ArrayLike<number>,
  mass: ArrayLike<number> | null,
  moves: ArrayLike<number>,
  shape: KvPoolShape,
): { k: Float64Array; v: Float64Array; mass: Float64Array | null } {
  const { numKvHeads: Hkv, headDim: hd } = shape;
  const seen = new Set<number>();
  for (let i = 1; i < moves.length; i += 2) {
    if (seen.has(moves[i])) {
      throw new InvalidRequestError(`kv_compact: destination slot ${moves[i]} appears twice`);
    }
    seen.add(moves[i]);
  }
  const k = Float64Array.from(kCache);
  const v = Float64Array.from(vCache);
  const m = mass ? Float64Array.from(mass) : null;
  for (let i = 0; i + 1 < moves.length; i += 2) {
    const src = moves[i];
    const dst = moves[i + 1];
    for (let g = 0; g < Hkv; g++) {
      const from = slotBase(src, g, shape);
      const to = slotBase(dst, g, shape);
      for (let d = 0; d < hd; d++) {
        k[to + d] = kCache[from + d];
        v[to + d] = vCache[from + d];
      }
    }
    if (m && mass) m[dst] = mass[src];
  }
  return { k, v, mass: m };
}
