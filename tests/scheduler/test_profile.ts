/**
 * A cost profile with round numbers for scheduler tests, so expected plans can be worked out by
 * hand: an iteration costs 10 ms + 0.2 ms per prefill token + 1 ms per decode; a fine-tuning
 * slice 5 ms + 0.05 ms per token (reference, forward), 0.1 ms per token per full depth (backward),
 * 1 ms (optimizer). Attention is free here. Not a measurement: the shipped profiles are.
 */
import type { CostProfile } from "../../src/scheduler/cost_model.ts";

export const TEST_PROFILE: CostProfile = {
  schema: "mace.profile.v1",
  device: "round numbers (tests)",
  model: "test",
  numLayers: 2,
  maxContext: 256,
  coefficients: {
    iteration: 10,
    prefillTokens: 0.2,
    decodeSeqs: 1,
    attentionKPairs: 0,
    ftSlice: 5,
    ftReferenceTokens: 0.05,
    ftForwardTokens: 0.05,
    ftBackwardTokens: 0.1,
    ftHeadTokens: 0,
    ftOptimizer: 1,
  },
  memory: {
    kvBytesPerToken: 100,
    blockSize: 4,
    kvBlocks: 64,
    trainBytesPerToken: 10,
    trainStateBytes: 0,
  },
  fit: { samples: 0, meanAbsErrorMs: 0, meanAbsPercentError: 0 },
  measuredAt: "2026-11-23T00:00:00Z",
};
