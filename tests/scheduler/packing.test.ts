import assert from "node:assert/strict";
import { bestFitPack, FIT_EPSILON, type PackTask } from "../../src/scheduler/mace/packing.ts";
import { rng } from "../../src/engine/training/seeded_random.ts";

const fixed = (
  name: string,
  priority: number,
  memBytes: number,
  timeMs: number,
): PackTask<string> => ({
  priority,
  fit: () => ({ value: name, memBytes, timeMs }),
});

Deno.test("best fit: of the first `window` fitting tasks, the smallest residual goes in", () => {
  const tasks = [fixed("a", 3, 10, 10), fixed("b", 2, 10, 45), fixed("c", 1, 10, 50)];
  const cap = { memBytes: 100, timeMs: 50 };
  // window 2 sees a (residual time 40) and b (5): b first; then a does not fit (10 > 5); c neither.
  assert.deepEqual(
    bestFitPack(tasks, cap, { lambdaMem: 0, lambdaTime: 1, window: 2 }).map((p) => p.value),
    ["b"],
  );
  // window 1 is strict priority order: a, then b does not fit (45 > 40), then c neither.
  assert.deepEqual(
    bestFitPack(tasks, cap, { lambdaMem: 0, lambdaTime: 1, window: 1 }).map((p) => p.value),
    ["a"],
  );
  // window 3 sees c, which fills the bin exactly.
  assert.deepEqual(
    bestFitPack(tasks, cap, { lambdaMem: 0, lambdaTime: 1, window: 3 }).map((p) => p.value),
    ["c"],
  );
  // Memory can decide: λ on memory only, b and c tie on time but c leaves less memory.
  const mem = [fixed("b", 2, 10, 45), fixed("c", 1, 90, 45)];
  assert.deepEqual(
    bestFitPack(mem, cap, { lambdaMem: 1, lambdaTime: 0, window: 2 }).map((p) => p.value),
    ["c"],
  );
});

Deno.test("property: packing never exceeds a capacity and stops only when nothing fits", () => {
  const random = rng(12345);
  for (let trial = 0; trial < 500; trial++) {
    const cap = { memBytes: 1 + random() * 1000, timeMs: 1 + random() * 100 };
    const n = Math.floor(random() * 12);
    const tasks: PackTask<number>[] = Array.from({ length: n }, (_, i) => {
      const mem = random() * 400, time = random() * 60, divisible = random() < 0.5;
      return {
        priority: random() * 5,
        // Half the tasks size themselves to what is left (like prefill chunks), down to a minimum.
        fit: (left) => {
          if (!divisible) return { value: i, memBytes: mem, timeMs: time };
          const share = Math.min(1, left.timeMs / time, left.memBytes / mem);
          return share < 0.25 ? null : { value: i, memBytes: mem * share, timeMs: time * share };
        },
      };
    });
    const window = 1 + Math.floor(random() * 3);
    const placed = bestFitPack(tasks, cap, { lambdaMem: random(), lambdaTime: random(), window });
    const mem = placed.reduce((s, p) => s + p.memBytes, 0),
      time = placed.reduce((s, p) => s + p.timeMs, 0);
    assert.ok(
      mem <= cap.memBytes + placed.length * FIT_EPSILON,
      `trial ${trial}: memory ${mem} > ${cap.memBytes}`,
    );
    assert.ok(
      time <= cap.timeMs + placed.length * FIT_EPSILON,
      `trial ${trial}: time ${time} > ${cap.timeMs}`,
    );
    assert.equal(
      new Set(placed.map((p) => p.value)).size,
      placed.length,
      "each task placed at most once",
    );
    const left = { memBytes: cap.memBytes - mem, timeMs: cap.timeMs - time };
    for (const [i, t] of tasks.entries()) {
      if (placed.some((p) => p.value === i)) continue;
      const p = t.fit(left);
      assert.ok(
        !p || p.memBytes > left.memBytes + FIT_EPSILON || p.timeMs > left.timeMs + FIT_EPSILON,
        `trial ${trial}: task ${i} still fits`,
      );
    }
  }
});
