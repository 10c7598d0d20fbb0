import assert from "node:assert/strict";
import { meanAttentionMass, selectKeptSlots } from "../../src/scheduler/kv_pruning.ts";
import { InvalidRequestError } from "../../src/engine/errors.ts";

// Scores of slots 0..19: slot 7 and slot 12 stand out, slot 3 ties with slot 9 (lower wins).
const score = (slot: number) =>
  ({ 7: 9, 12: 8, 3: 5, 9: 5 } as Record<number, number>)[slot] ?? slot / 100;

Deno.test("kv pruning: heavy hitters fill the budget between the sinks and the window", () => {
  const keep = selectKeptSlots(20, 10, { sinks: 2, window: 4, heavyHitters: true }, score);
  assert.deepEqual(keep, [0, 1, 3, 7, 9, 12, 16, 17, 18, 19]);
});

Deno.test("kv pruning: without heavy hitters the rest of the budget is the newest slots", () => {
  const keep = selectKeptSlots(20, 10, { sinks: 2, window: 4, heavyHitters: false }, score);
  assert.deepEqual(keep, [0, 1, 12, 13, 14, 15, 16, 17, 18, 19]);
});

Deno.test("kv pruning: a budget >= the slot count keeps all; too small a budget throws", () => {
  assert.deepEqual(selectKeptSlots(5, 8, { sinks: 2, window: 2, heavyHitters: true }, score), [
    0,
    1,
    2,
    3,
    4,
  ]);
  assert.throws(
    () => selectKeptSlots(20, 5, { sinks: 2, window: 4, heavyHitters: true }, score),
    InvalidRequestError,
  );
});

Deno.test("kv pruning: the score is mass per query that saw the key, never x / 0", () => {
  assert.equal(meanAttentionMass(6, 3), 2);
  assert.equal(meanAttentionMass(0.5, 0), 0.5);
});
