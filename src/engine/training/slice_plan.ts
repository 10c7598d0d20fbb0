/**
 * How one DPO optimizer step is cut into slices (pure TypeScript, no GPU): the trainer runs
 * these slices and the scheduler places them, one per iteration, between serving steps.
 *
 *   reference(pair, layers [fromLayer, toLayer))  the pair's reference forward (adapter off) of
 *                    chosen and rejected through those layers (embedding when fromLayer = 0; head
 *                    and the log-prob sums, read back and cached, when toLayer = L); once per pair,
 *   forward(pair, layers [fromLayer, toLayer))  the policy forward likewise, and the DPO loss
 *                    when toLayer = L,
 *   backward(pair, layers [fromLayer, toLayer) going down)  the head when fromLayer = L, then
 *                    layers fromLayer-1 .. toLayer of both sequences,
 *   optimizer        gradient norm, clipping, the optimizer update, gradients cleared.
 * Layer ranges let a slice fit a small gap: each covers at most `layersPerSlice` layers.
 */

export type TrainingSlice =
  | { kind: "reference"; pair: number; fromLayer: number; toLayer: number }
  | { kind: "forward"; pair: number; fromLayer: number; toLayer: number }
  | { kind: "backward"; pair: number; fromLayer: number; toLayer: number }
  | { kind: "optimizer" };

/**
 * The slices of one step over `pairs` pairs, in the order they must run: the reference slices of
 * the pairs not cached (`referenceCached[j]`), then per pair its forward and its backward slices,
 * then the optimizer; forward, reference and backward cover `layersPerSlice` layers each
 * (clamped to 1..numLayers).
 */
export function planDpoSlices(
  referenceCached: readonly boolean[],
  numLayers: number,
  layersPerSlice = numLayers,
): TrainingSlice[] {
  const per = Math.max(1, Math.min(numLayers, Math.floor(layersPerSlice)));
  const up: [number, number][] = [];
  for (let lo = 0; lo < numLayers; lo += per) up.push([lo, Math.min(numLayers, lo + per)]);
  const slices: TrainingSlice[] = [];
  referenceCached.forEach((cached, j) => {
    if (cached) return;
    for (const [fromLayer, toLayer] of up) {
      slices.push({ kind: "reference", pair: j, fromLayer, toLayer });
    }
  });
  referenceCached.forEach((_, j) => {
    for (const [fromLayer, toLayer] of up) {
      slices.push({ kind: "forward", pair: j, fromLayer, toLayer });
    }
    for (let hi = numLayers; hi > 0; hi -= per) {
      slices.push({ kind: "backward", pair: j, fromLayer: hi, toLayer: Math.max(0, hi - per) });
    }
  });
  slices.push({ kind: "optimizer" });
  return slices;
}
