import assert from "node:assert/strict";
import { planDpoSlices } from "../../src/engine/training/slice_plan.ts";

Deno.test("slice plan: uncached references; per pair forward up, backward down; optimizer", () => {
  const r = (pair: number, fromLayer: number, toLayer: number) => ({
    kind: "reference",
    pair,
    fromLayer,
    toLayer,
  });
  const f = (pair: number, fromLayer: number, toLayer: number) => ({
    kind: "forward",
    pair,
    fromLayer,
    toLayer,
  });
  const b = (pair: number, fromLayer: number, toLayer: number) => ({
    kind: "backward",
    pair,
    fromLayer,
    toLayer,
  });
  assert.deepEqual(planDpoSlices([false, true], 5, 2), [
    r(0, 0, 2),
    r(0, 2, 4),
    r(0, 4, 5),
    f(0, 0, 2),
    f(0, 2, 4),
    f(0, 4, 5),
    b(0, 5, 3),
    b(0, 3, 1),
    b(0, 1, 0),
    f(1, 0, 2),
    f(1, 2, 4),
    f(1, 4, 5),
    b(1, 5, 3),
    b(1, 3, 1),
    b(1, 1, 0),
    { kind: "optimizer" },
  ]);
  // Whole depth per slice (the default), and out-of-range slice sizes clamp to 1..L.
  assert.deepEqual(planDpoSlices([true], 3), [f(0, 0, 3), b(0, 3, 0), { kind: "optimizer" }]);
  assert.deepEqual(planDpoSlices([true], 3, 99), planDpoSlices([true], 3));
  assert.deepEqual(planDpoSlices([true], 2, 0), [f(0, 0, 1), f(0, 1, 2), b(0, 2, 1), b(0, 1, 0), {
    kind: "optimizer",
  }]);
});
