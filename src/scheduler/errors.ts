/**
 * Errors of the KV block manager. Like the engine's errors (../engine/errors.ts)
 * they carry a `code` that survives structured cloning across the worker boundary.
 */

import { MaceError } from "../engine/errors.ts";

/**
 * One sequence needs more KV blocks than the whole pool holds, so no amount of
 * waiting, eviction or preemption can ever make it fit. (A pool that is merely
 * busy is not an error: the block manager returns null and the scheduler
 * preempts or waits.)
 */
export class OutOfKvBlocksError extends MaceError {
  override readonly code = "out_of_kv_blocks";
  constructor(
    readonly seqId: number,
    readonly numTokens: number,
    readonly blocksNeeded: number,
    readonly numBlocks: number,
    readonly blockSize: number,
  ) {
    super(
      `sequence ${seqId} needs ${blocksNeeded} KV blocks for ${numTokens} tokens ` +
        `(block size ${blockSize}) but the whole pool has ${numBlocks} blocks; ` +
        `give the KV pool more blocks or lower the request's prompt length + max tokens ` +
        `to at most ${numBlocks * blockSize} tokens`,
    );
  }
}

/** The block manager was called out of contract (unknown or duplicate sequence, bad count). */
export class BlockManagerUsageError extends MaceError {
  override readonly code = "block_manager_usage";
}

/** The block manager's bookkeeping broke an invariant: a bug, never a user error. */
export class KvIntegrityError extends MaceError {
  override readonly code = "kv_integrity";
}

/** The scheduler's request or fine-tuning queues broke an invariant: a bug, never a user error. */
export class SchedulerInvariantError extends MaceError {
  override readonly code = "scheduler_invariant";
}
