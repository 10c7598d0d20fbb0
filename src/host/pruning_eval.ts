/**
 * Measures what KV pruning costs in quality: the log-likelihood of a reference
 * text under teacher forcing (token t is fed, log p(token t+1) is read from the
 * logits) with the KV cache pruned to a budget, against the same text with the
 * full cache. Uses the engine's own pruning path: attention mass accumulated by
 * the GPU, the policy's slot selection, BlockManager.prune and the runner's KV
 * edit; one sequence, one token per step.
 */
import type { ModelRunner } from "../engine/runner/model_runner.ts";
import { GREEDY } from "../engine/step.ts";
import { BlockManager } from "../scheduler/block_manager.ts";
import { meanAttentionMass, type PruningPolicy, selectKeptSlots } from "../scheduler/kv_pruning.ts";

export interface PruningEvalResult {
  /** Sum over t >= 1 of log p(text[t] | kept KV of text[0..t-1]), natural log. */
  logLikelihood: number;
  tokensScored: number;
  /** Most KV blocks the sequence held at once. */
  peakBlocks: number;
  evictedTokens: number;
  pruneEvents: number;
}

/** `budget` 0 = no pruning. The runner must hold one sequence of text.length tokens. */
export async function scoreWithPruning(
  runner: ModelRunner,
  text: readonly number[],
  budget: number,
  policy: PruningPolicy,
): Promise<PruningEvalResult> {
  const { blockSize } = runner.capacity;
  const vocab = runner.config.vocabSize;
  const blocks = new BlockManager({
    numBlocks: runner.kvBlocks,
    blockSize,
    enablePrefixCaching: false,
  });
  const seqId = 0;
  let evicted = 0, pruneEvents = 0, peakBlocks = 0, logLikelihood = 0;
  /** Position of the token in each KV slot. */
  let positions: number[] = [];
  blocks.allocate(seqId, [text[0]]);
  for (let t = 0; t + 1 < text.length; t++) {
    if (t > 0) {
      if (budget > 0 && t - evicted >= budget) {
        const mass = await runner.readMass();
        const table = blocks.blockTable(seqId);
        const keep = selectKeptSlots(
          t - evicted,
          budget - blockSize,
          policy,
          (slot) =>
            meanAttentionMass(
              mass[table[Math.floor(slot / blockSize)] * blockSize + (slot % blockSize)],
              t - positions[slot],
            ),
        );
        positions = keep.map((slot) => positions[slot]);
        const edit = blocks.prune(seqId, keep)!;
        await runner.applyKvEdit(edit);
        evicted = t - keep.length;
        pruneEvents++;
      }
      blocks.appendSlots(seqId, 1);
    }
    peakBlocks = Math.max(peakBlocks, blocks.blockTable(seqId).length);
    await runner.execute({
      sequences: [{
        seqId,
        tokens: [text[t]],
        startPosition: t,
        startSlot: t - evicted,
        blockTable: blocks.blockTable(seqId),
        sample: true,
        sampling: GREEDY,
        trackMass: budget > 0,
      }],
    });
    blocks.commitTokens(seqId, [text[t]]);
    positions.push(t);
    logLikelihood += logSoftmaxAt(await runner.readLogits(1), vocab, text[t + 1]);
  }
  blocks.checkIntegrity();
  return {
    logLikelihood,
    tokensScored: text.length - 1,
    peakBlocks,
    evictedTokens: evicted,
    pruneEvents,
  };
}

function logSoftmaxAt(logits: Float32Array, vocab: number, id: number): number {
  let max = -Infinity;
  for (let i = 0; i < vocab; i++) max = Math.max(max, logits[i]);
  let sum = 0;
  for (let i = 0; i < vocab; i++) sum += Math.exp(logits[i] - max);
  return logits[id] - max - Math.log(sum);
}
