/**
 * The serving loop: plan = scheduler.schedule(); result = executor.execute(plan);
 * scheduler.update(plan, result). Up to `pipelineDepth` steps are in flight at
 * once: the next step is submitted before the previous one's samples are read
 * (decodes take their input token on the GPU), which hides the readback latency.
 * The executor is any StepExecutor (the engine's ModelRunner); this file imports
 * no WebGPU.
 */
import type { KvEdit, StepPlan, StepResult } from "../engine/step.ts";
import type { BatchScheduler, ScheduledStep } from "./batch_scheduler.ts";
import type { GenerationRequest, RequestOutput } from "./request.ts";
import type { RequestState } from "./request.ts";

export interface StepExecutor {
  execute(plan: StepPlan): Promise<StepResult>;
  /** Attention mass of every physical KV slot (for pruning), after all submitted steps. */
  readMass(): Promise<Float32Array>;
  /** Applies a KV edit before any later step. */
  applyKvEdit(edit: KvEdit): Promise<void>;
}

export interface EngineLoopOptions {
  /** Steps in flight at once (1 = no pipelining). */
  pipelineDepth?: number;
  /** Called after every step with its plan and result (metrics, benchmarks). */
  onStep?: (step: ScheduledStep, result: StepResult) => void;
}

/**
 * Prunes the KV of every request over its budget (H2O: the policy keeps slots by the attention
 * mass read from the GPU) and applies the edits. Call with no step in flight.
 */
export async function pruneOverBudget(
  scheduler: BatchScheduler,
  executor: Pick<StepExecutor, "readMass" | "applyKvEdit">,
): Promise<void> {
  const candidates = scheduler.pruneCandidates();
  if (candidates.length === 0) return;
  const mass = await executor.readMass();
  for (const req of candidates) {
    const edit = scheduler.prune(req, mass);
    if (edit) await executor.applyKvEdit(edit);
  }
}

interface Pending {
  resolve: (output: RequestOutput) => void;
  reject: (error: unknown) => void;
}

export class EngineLoop {
  private readonly pending = new Map<RequestState, Pending>();
  /**
   * True while run() is looping. Cleared by run() in the same synchronous step in which it finds
   * no work, so a request submitted by a callback of the last finished request starts a new loop.
   */
  private active = false;
  private readonly depth: number;

  constructor(
    private readonly executor: StepExecutor,
    readonly scheduler: BatchScheduler,
    private readonly options: EngineLoopOptions = {},
  ) {
    this.depth = Math.max(1, options.pipelineDepth ?? 3);
  }

  /** Queues a request; resolves when it finishes. Invalid requests reject at once. */
  submit(request: GenerationRequest): Promise<RequestOutput> {
    let state: RequestState;
    try {
      state = this.scheduler.add(request, performance.now());
    } catch (error) {
      return Promise.reject(error);
    }
    const result = new Promise<RequestOutput>((resolve, reject) => {
      this.pending.set(state, { resolve, reject });
    });
    if (!this.active) {
      this.active = true;
      // run() reports failures through the requests' promises.
      this.run().catch(() => {});
    }
    return result;
  }

  private async finish(done: { step: ScheduledStep; result: Promise<StepResult> }): Promise<void> {
    const result = await done.result;
    const now = performance.now();
    for (const req of this.scheduler.update(done.step, result, now)) {
      this.pending.get(req)?.resolve(req.result(now));
      this.pending.delete(req);
    }
    this.options.onStep?.(done.step, result);
  }

  private async run(): Promise<void> {
    const inFlight: { step: ScheduledStep; result: Promise<StepResult> }[] = [];
    // Start after the current task, so requests submitted together share the first step.
    await Promise.resolve();
    try {
      for (;;) {
        if (this.scheduler.pruneCandidates().length > 0) {
          // Pruning reads the mass of every computed slot: account every step in flight first.
          while (inFlight.length > 0) await this.finish(inFlight.shift()!);
          await pruneOverBudget(this.scheduler, this.executor);
        }
        const step = this.scheduler.schedule();
        if (step) inFlight.push({ step, result: this.executor.execute(step.plan) });
        if (inFlight.length === 0) {
          if (!this.scheduler.hasWork()) {
            this.active = false;
            return;
          }
          throw new Error("scheduler has requests but scheduled nothing with no step in flight");
        }
        if (step && inFlight.length < this.depth) continue;
        await this.finish(inFlight.shift()!);
      }
    } catch (error) {
      // A failed step leaves the KV state unknown: fail every request and start afresh.
      await Promise.allSettled(inFlight.map((f) => f.result));
      this.scheduler.abortAll();
      for (const { reject } of this.pending.values()) reject(error);
      this.pending.clear();
      this.active = false;
    }
  }
}
