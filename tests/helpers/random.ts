/** Seeded random data for tests (mulberry32 + Box-Muller): the same seed gives the same data. */
import { rng } from "../../src/engine/training/seeded_random.ts";

export { rng };

/** n normal(0, std) values as Float32Array. */
export function randn(n: number, seed: number, std = 1): Float32Array {
  const next = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(next(), 1e-12);
    out[i] = std * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * next());
  }
  return out;
}

/** n uniform integers in [0, max). */
export function randInts(n: number, max: number, seed: number): Uint32Array {
  const next = rng(seed);
  return Uint32Array.from({ length: n }, () => Math.floor(next() * max));
}
