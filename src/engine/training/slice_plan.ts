/**
 * How one DPO optimizer step is cut into slices (pure TypeScript, no GPU): the trainer runs
 * these slices and the scheduler places them, one per iteration, between serving steps.
 *
 *   reference(pair)  the pair's reference log-probs (adapter off), once per pair (then cached),
 *   forward(pair)    the policy forward of chosen and rejected and the DPO loss,
 *   backward(pair, layers [fromLayer, toLayer) going down)  the head when fromLayer = L, then
 *                    layers fromLayer-1 .. toLayer of both sequences,
 *   optimizer        gradient norm, clipping, the optimizer update, gradients cleared.
 */

export type TrainingSlice =
  | { kind: "reference"; pair: number }
  | { kind: "forward"; pair: number }
  | { kind: "backward"; pair: number; fromLayer: number; toLayer: number }
  | { kind: "optimizer" };

/**
 * The slices of one step over `pairs` pairs, in the order they must run: references of the
 * pairs not cached (`referenceCached[j]`), then per pair its forward and its backward slices of
 * `layersPerSlice` layers each (clamped to 1..numLayers), then the optimizer.
 */
export function planDpoSlices(
  referenceCached: readonly boolean[],
  numLayers: number,
  layersPerSlice = numLayers,
): TrainingSlice[] {
  const per = Math.max(1, Math.min(numLayers, Math.floor(layersPerSlice)));
  const slices: TrainingSlice[] = [];
  referenceCached.forEach((cached, j) => {
    if (!cached) slices.push({ kind: "reference", pair: j });
  });
  referenceCached.forEach((_, j) => {
    slices.push({ kind: "forward", pair: j });
    for (let hi = numLayers; hi > 0; hi -= per) {
      slices.push({ kind: "backward", pair: j, fromLayer: hi, toLayer: Math.max(0, hi - per) });
    }
  });
  slices.push({ kind: "optimizer" });
  return slices;
}
