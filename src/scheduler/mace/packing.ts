/**
 * Best-fit packing of one iteration (the MACE paper's Algorithm 1, for the single bin an
 * iteration is). The bin has a memory capacity (bytes under τ_mem) and a time capacity (ms the
 * iteration may take before a running decode misses its TBT deadline). Tasks are visited in
 * priority order; each fitting task offers a placement (a prefill sizes its chunk to what is
 * left). Among the first `window` fitting tasks the one leaving the smallest
 *   f = λ1·|memory residual| / memory capacity + λ2·|time residual| / time capacity
 * goes in (ties: the higher priority), the capacities shrink, and it repeats until nothing fits.
 */

export interface Capacity {
  memBytes: number;
  timeMs: number;
}

export interface Placement<T> {
  value: T;
  /** Added memory and time if placed now (marginal: the iteration's fixed cost is paid once). */
  memBytes: number;
  timeMs: number;
}

export interface PackTask<T> {
  priority: number;
  /** The placement this task would take given what is left, or null if it cannot fit. */
  fit(left: Capacity): Placement<T> | null;
}

export interface PackOptions<T> {
  lambdaMem: number;
  lambdaTime: number;
  window: number;
  /** Called as each placement is chosen, before the next round of fits (tasks may depend on it). */
  place?: (value: T) => void;
}

/** Rounding slack (ms, bytes): marginal costs are differences of predictions and round off. */
export const FIT_EPSILON = 1e-6;

/** The placements chosen, in the order they were placed. */
export function bestFitPack<T>(
  tasks: readonly PackTask<T>[],
  capacity: Capacity,
  o: PackOptions<T>,
): Placement<T>[] {
  const left = { ...capacity };
  const pending = tasks.map((task, index) => ({ task, index }))
    .sort((a, b) => b.task.priority - a.task.priority || a.index - b.index);
  const placed: Placement<T>[] = [];
  for (;;) {
    let best: { at: number; placement: Placement<T>; f: number } | null = null;
    let seen = 0;
    for (let at = 0; at < pending.length && seen < o.window; at++) {
      const placement = pending[at].task.fit(left);
      if (!placement || !fits(placement, left)) continue;
      seen++;
      const f = o.lambdaMem * Math.abs(left.memBytes - placement.memBytes) /
          Math.max(capacity.memBytes, 1) +
        o.lambdaTime * Math.abs(left.timeMs - placement.timeMs) / Math.max(capacity.timeMs, 1e-9);
      if (!best || f < best.f) best = { at, placement, f };
    }
    if (!best) return placed;
    placed.push(best.placement);
    o.place?.(best.placement.value);
    left.memBytes -= best.placement.memBytes;
    left.timeMs -= best.placement.timeMs;
    pending.splice(best.at, 1);
  }
}

/** The placement's cost is within what is left (up to rounding). */
export function fits(cost: Capacity, left: Capacity): boolean {
  return cost.memBytes <= left.memBytes + FIT_EPSILON && cost.timeMs <= left.timeMs + FIT_EPSILON;
}
