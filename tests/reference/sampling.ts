/**
 * CPU reference of token sampling (src/shaders/sample.wgsl): the same rules and
 * the same random number, in float64, for one row of logits at a time.
 *
 * Rules for one row (logits f32 [V], all finite):
 *  - Order: tokens sorted by (logit desc, index asc). This is the order of the
 *    exact probabilities, with ties broken towards the lower index; comparing
 *    logits (not rounded exp values) makes the order identical on CPU and GPU.
 *  - temperature <= 0 or topK == 1: greedy, the first token in that order.
 *  - Otherwise weights p_i = exp((logit_i - max) / temperature); the keep set is
 *    the first topK tokens of the order (topK = 0 or >= V: all), then the shortest
 *    prefix of those whose mass reaches topP times their total mass (topP >= 1:
 *    all of them; at least one token). The draw u = uniform(seed, counter) picks
 *    the first kept token, in index order, whose cumulative weight exceeds
 *    u * (total kept weight).
 */
import type { SamplingRow } from "../../src/engine/kernels/sample.ts";

const PRIME2 = 0x85ebca77;
const PRIME3 = 0xc2b2ae3d;
const PRIME4 = 0x27d4eb2f;
const PRIME5 = 0x165667b1;

function mixWord(h: number, word: number): number {
  h = (h + Math.imul(word, PRIME3)) >>> 0;
  h = ((h << 17) | (h >>> 15)) >>> 0;
  return Math.imul(h, PRIME4) >>> 0;
}

/** xxHash32-style hash of the 8 bytes (seed, counter): well mixed, u32 out. */
export function samplingHash(seed: number, counter: number): number {
  let h = (PRIME5 + 8) >>> 0;
  h = mixWord(h, seed >>> 0);
  h = mixWord(h, counter >>> 0);
  h = (h ^ (h >>> 15)) >>> 0;
  h = Math.imul(h, PRIME2) >>> 0;
  h = (h ^ (h >>> 13)) >>> 0;
  h = Math.imul(h, PRIME3) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

/** The draw's uniform number in [0, 1): the hash's top 24 bits (exact in f32). */
export function samplingUniform(seed: number, counter: number): number {
  return (samplingHash(seed, counter) >>> 8) / 16777216;
}

const f32 = new Float32Array(1);
const f32Bits = new Uint32Array(f32.buffer);

/**
 * A u32 whose unsigned order is the order of the f32 value x (-0 and +0 equal):
 * the sort key the GPU compares, so ties are exactly the equal logits.
 */
export function orderKey(x: number): number {
  f32[0] = x;
  const bits = f32Bits[0];
  if (bits === 0x80000000) return 0x80000000; // -0 sorts with +0
  return (bits & 0x80000000) !== 0 ? ~bits >>> 0 : (bits | 0x80000000) >>> 0;
}

/** Token indices sorted by (logit desc, index asc). */
function sortedByLikelihood(logits: Float32Array): number[] {
  const keys = Array.from(logits, orderKey);
  return Array.from(logits.keys()).sort((a, b) => keys[b] - keys[a] || a - b);
}

/** Greedy choice: the largest logit, ties to the lowest index. */
export function greedyToken(logits: Float32Array): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) {
    if (orderKey(logits[i]) > orderKey(logits[best])) best = i;
  }
  return best;
}

export interface KeepSet {
  /** Kept token indices in likelihood order. */
  tokens: number[];
  /** Weight exp((logit - max) / temperature) of every token (index order). */
  weights: Float64Array;
  /**
   * How far the top-p target is from the nearest cumulative-mass boundary, as a
   * share of the mass it is taken of (Infinity without top-p). A float32 kernel
   * may cut differently only when this is within rounding of 0.
   */
  margin: number;
}

/** The keep set after temperature, top-k and top-p (temperature > 0). */
export function keepSet(logits: Float32Array, options: SamplingRow): KeepSet {
  const vocab = logits.length;
  // The kernel sees temperature and topP as float32 (packSamplingParams).
  const temperature = Math.fround(options.temperature);
  const topP = Math.fround(Math.min(options.topP, 1));
  const max = logits[greedyToken(logits)];
  const weights = Float64Array.from(
    logits,
    (x) => (orderKey(x) === orderKey(max) ? 1 : Math.exp((x - max) / temperature)),
  );
  let tokens = sortedByLikelihood(logits);
  if (options.topK > 0 && options.topK < vocab) tokens = tokens.slice(0, options.topK);
  let margin = Infinity;
  if (topP < 1) {
    const mass = tokens.reduce((sum, i) => sum + weights[i], 0);
    const target = topP * mass;
    let cumulative = 0;
    let kept = 0;
    while (kept < tokens.length) {
      const before = cumulative;
      cumulative += weights[tokens[kept++]];
      if (cumulative >= target) {
        margin = Math.min(target - before, cumulative - target) / mass;
        break;
      }
    }
    tokens = tokens.slice(0, kept); // kept >= 1
  }
  return { tokens, weights, margin };
}

export interface SampledToken {
  token: number;
  /**
   * Distance of the random draw, and of the top-p target, from the nearest
   * boundary where a float32 computation could choose differently, as a share of
   * the total mass (Infinity for greedy choices).
   */
  margin: number;
}

/** Samples one row of logits f32 [V] with the GPU kernel's rules. */
export function sampleToken(logits: Float32Array, options: SamplingRow): SampledToken {
  if (options.temperature <= 0 || options.topK === 1) {
    return { token: greedyToken(logits), margin: Infinity };
  }
  const keep = keepSet(logits, options);
  const kept = keep.tokens.slice().sort((a, b) => a - b);
  const total = kept.reduce((sum, i) => sum + keep.weights[i], 0);
  const point = samplingUniform(options.seed, options.counter) * total;
  let cumulative = 0;
  for (const token of kept) {
    const before = cumulative;
    cumulative += keep.weights[token];
    if (cumulative > point) {
      const drawMargin = Math.min(point - before, cumulative - point) / total;
      return { token, margin: Math.min(drawMargin, keep.margin) };
    }
  }
  throw new Error("unreachable: the draw point is below the total kept weight");
}

/** Samples every row of logits f32 [rows, V]. */
export function sampleTokens(
  logits: Float32Array,
  rows: readonly SamplingRow[],
): SampledToken[] {
  const vocab = logits.length / rows.length;
  return rows.map((options, s) =>
    sampleToken(logits.subarray(s * vocab, (s + 1) * vocab), options)
  );
}
