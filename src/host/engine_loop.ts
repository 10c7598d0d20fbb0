/**
 * The one engine loop: iterations chosen by the CoScheduler, run by an executor, up to
 * `depth` of them in flight.
 *
 *   it = scheduler.schedule(now); executor.launch(it)      // encoded and submitted at once
 *   ... while fewer than `depth` are in flight, schedule and launch the next ...
 *   outcome = await the oldest; scheduler.complete(it, outcome, now)
 *
 * Iteration k+1 is submitted before k's results are read: decodes take their input token on the
 * GPU (FEEDBACK_TOKEN), so the GPU never waits for a readback (about 11 ms on Deno's wgpu).
 * Some iterations need earlier results on the CPU first (the executor says which: a DPO forward
 * needs its pair's reference log-probs); pruning needs every step accounted. For those the loop
 * drains what is in flight before going on.
 *
 * Time attribution: the queue runs iterations back to back, so an iteration's own time is from
 * when the GPU could start it (its launch, or the completion of the one before, whichever is
 * later) to its completion. The executor may measure it on the GPU instead (timestamp queries)
 * and return `gpuMs`, which then wins. Either is what the cost model learns.
 *
 * Imports no WebGPU: tests drive it with a CPU executor (tests/host/).
 */
import type { StepResult } from "../engine/step.ts";
import type { CoScheduler, Iteration, IterationEffects } from "../scheduler/mace/co_scheduler.ts";

/** What an executor reports when an iteration's work is done. */
export interface IterationResults {
  /** The serving step's samples (null without a serving step). */
  result: StepResult | null;
  /** After an optimizer slice: each pair's DPO loss. */
  losses?: readonly number[];
  /** The iteration's GPU time when the executor measured it (timestamp queries), ms. */
  gpuMs?: number;
}

export interface IterationExecutor<T> {
  /**
   * Encodes and submits `it` now, after everything launched before it; resolves when its results
   * are on the CPU. Rejects if the GPU failed.
   */
  launch(it: Iteration<T>): Promise<IterationResults>;
  /** True when `it` can only be encoded once every iteration in flight has completed. */
  needsDrain(it: Iteration<T>): boolean;
  /** Prunes requests over their KV budget; called with nothing in flight. */
  prune(): Promise<void>;
}

export interface EngineLoopHooks<T> {
  /** After each completed iteration, in order; the loop waits for it before going on. */
  completed(it: Iteration<T>, effects: IterationEffects<T>, now: number): Promise<void> | void;
  /** An iteration failed: the GPU state is unknown and every live request must fail. */
  failed(error: unknown): void;
  /** Whether the loop should stop when idle (no work, nothing to wait for). */
  idleExit(): boolean;
}

export interface EngineLoopOptions {
  /** Iterations in flight at once (1: none pipelined). */
  depth: number;
  /** Milliseconds on the caller's clock (default performance.now). */
  now?: () => number;
}

interface InFlight<T> {
  it: Iteration<T>;
  /** When it was submitted. */
  launchedAt: number;
  done: Promise<IterationResults>;
}

export class EngineLoop<T> {
  private running = false;
  private closed = false;
  private wake: (() => void) | null = null;
  private finished: Promise<void> = Promise.resolve();
  private readonly now: () => number;
  /** When the last completed iteration completed (-Infinity: none yet). */
  private lastDoneAt = -Infinity;

  constructor(
    private readonly scheduler: CoScheduler<T>,
    private readonly batch: { pruneCandidates(): readonly unknown[] },
    private readonly executor: IterationExecutor<T>,
    private readonly hooks: EngineLoopHooks<T>,
    readonly options: EngineLoopOptions,
  ) {
    if (!Number.isInteger(options.depth) || options.depth < 1) {
      throw new RangeError(`pipeline depth must be a positive integer, got ${options.depth}`);
    }
    this.now = options.now ?? (() => performance.now());
  }

  /** Starts the loop, or wakes it from idle, after new work arrived. */
  kick(): void {
    if (this.closed) return;
    if (this.running) {
      this.wake?.();
      return;
    }
    this.running = true;
    this.finished = this.run();
  }

  /** Stops after the iterations in flight complete. */
  async close(): Promise<void> {
    this.closed = true;
    this.wake?.();
    await this.finished;
  }

  private async run(): Promise<void> {
    // Start after the current task, so work submitted together shares the first iteration.
    await Promise.resolve();
    const inFlight: InFlight<T>[] = [];
    try {
      while (!this.closed || inFlight.length > 0) {
        if (!this.closed && this.batch.pruneCandidates().length > 0) {
          // Pruning reads the attention mass of every computed slot: account every step first.
          while (inFlight.length > 0) await this.complete(inFlight.shift()!);
          await this.executor.prune();
        }
        const it = this.closed ? null : this.scheduler.schedule(this.now());
        if (it) {
          if (this.executor.needsDrain(it)) {
            while (inFlight.length > 0) await this.complete(inFlight.shift()!);
          }
          inFlight.push({ it, launchedAt: this.now(), done: this.executor.launch(it) });
          if (inFlight.length < this.options.depth) continue;
        }
        if (inFlight.length > 0) {
          await this.complete(inFlight.shift()!);
          continue;
        }
        if (!(await this.idle())) return;
      }
      this.running = false;
    } catch (error) {
      // Whatever else is in flight ran on a GPU state that is now unknown: let it settle, drop it.
      await Promise.allSettled(inFlight.map((f) => f.done));
      this.running = false;
      this.hooks.failed(error);
    }
  }

  private async complete(f: InFlight<T>): Promise<void> {
    const results = await f.done;
    const now = this.now();
    const ms = results.gpuMs ?? now - Math.max(f.launchedAt, this.lastDoneAt);
    this.lastDoneAt = now;
    const effects = this.scheduler.complete(f.it, {
      result: results.result,
      ms,
      losses: results.losses,
    }, now);
    await this.hooks.completed(f.it, effects, now);
  }

  /**
   * Waits for new work or the next retraining period. False when there is none to wait for: the
   * loop has stopped (`running` is cleared in the same synchronous step as the check, so work
   * that arrives afterwards starts a new loop).
   */
  private async idle(): Promise<boolean> {
    const now = this.now();
    if (this.scheduler.hasWork(now)) {
      throw new Error("the scheduler has work but scheduled nothing with no iteration in flight");
    }
    const wakeAt = this.scheduler.nextWakeAt();
    if (wakeAt === null && this.hooks.idleExit()) {
      this.running = false;
      return false;
    }
    await new Promise<void>((resolve) => {
      const timer = wakeAt === null ? undefined : setTimeout(resolve, Math.max(0, wakeAt - now));
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.wake = null;
    if (this.closed) this.running = false;
    return !this.closed;
  }
}
