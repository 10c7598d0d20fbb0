/**
 * The KV block manager and continuous-batching scheduler sized to a ModelRunner's capacity:
 * its KV pool, block size, step token and sequence limits, and context. Both hosts (ServingEngine,
 * MaceEngine) build theirs here.
 */
import type { ModelRunner } from "../engine/runner/model_runner.ts";
import { BlockManager } from "../scheduler/block_manager.ts";
import { BatchScheduler } from "../scheduler/batch_scheduler.ts";
import type { PruningPolicy } from "../scheduler/kv_pruning.ts";

export interface RunnerSchedulerOptions {
  prefixCaching: boolean;
  /** KV entries a request keeps before pruning (0 or absent: never prune). */
  kvBudget?: number;
  pruning?: PruningPolicy;
}

export function schedulerForRunner(
  runner: ModelRunner,
  o: RunnerSchedulerOptions,
): { blockManager: BlockManager; batch: BatchScheduler } {
  const { capacity } = runner;
  const blockManager = new BlockManager({
    numBlocks: runner.kvBlocks,
    blockSize: capacity.blockSize,
    enablePrefixCaching: o.prefixCaching,
  });
  const batch = new BatchScheduler({
    blockManager,
    maxTokensPerStep: capacity.maxTokens,
    maxSeqsPerStep: capacity.maxSeqs,
    maxContext: capacity.maxBlocksPerSeq * capacity.blockSize,
    kvBudget: o.kvBudget,
    pruning: o.pruning,
  });
  return { blockManager, batch };
}
