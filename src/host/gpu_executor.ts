/**
 * Runs the engine loop's iterations on the GPU: the serving step (ModelRunner) and then the DPO
 * slice (DpoTrainer), submitted back to back so the step's tokens come out first. Everything is
 * encoded and submitted in launch() itself, so iterations launched one after another run on the
 * GPU in launch order while their results are read later. `mace profile` measures iterations
 * through the same launchIteration, so a profile times exactly what the loop runs.
 */
import type { SpanTimer } from "../engine/gpu/span_timer.ts";
import type { ModelRunner } from "../engine/runner/model_runner.ts";
import type { KvEdit, StepPlan } from "../engine/step.ts";
import type { DpoTrainer, TrainingPair } from "../engine/training/dpo_trainer.ts";
import type { TrainingSlice } from "../engine/training/slice_plan.ts";
import type { BatchScheduler } from "../scheduler/batch_scheduler.ts";
import type { Iteration } from "../scheduler/mace/co_scheduler.ts";
import type { IterationExecutor, IterationResults } from "./engine_loop.ts";

export interface IterationWork {
  plan: StepPlan | null;
  slice: TrainingSlice | null;
}

/**
 * Submits a serving step and/or a DPO slice now; resolves when both are done, with the step's
 * samples, after an optimizer slice each pair's loss (read by a copy submitted with the slice,
 * so later work cannot overwrite it first), and with a timer the iteration's GPU time.
 */
export function launchIteration(
  runner: ModelRunner,
  trainer: DpoTrainer | null,
  work: IterationWork,
  timer: SpanTimer | null = null,
): Promise<IterationResults> {
  if (work.slice && !trainer) {
    throw new Error("an iteration with a fine-tuning slice needs a trainer");
  }
  const span = timer?.begin() ?? null;
  const step = work.plan && work.plan.sequences.length > 0 ? runner.execute(work.plan) : null;
  // Each of these submits its GPU work before its first await; a reference slice resolves when
  // its log-probs are cached.
  const sliceDone = work.slice ? trainer!.runSlice(work.slice) : null;
  const stats = work.slice?.kind === "optimizer" ? trainer!.readStepStats() : null;
  // Without a serving step nothing else says when the slice's work is done.
  const gpuDone = work.slice ? runner.ctx.device.queue.onSubmittedWorkDone() : null;
  const gpuMs = span ? timer!.end(span) : null;
  return Promise.all([step, sliceDone, stats, gpuDone, gpuMs]).then(([result, , s, , ms]) => {
    runner.ctx.throwIfFailed();
    return { result, losses: s?.perPair.map((p) => p.loss), gpuMs: ms ?? undefined };
  });
}

/**
 * Prunes the KV of every request over its budget (H2O: slots kept by the attention mass read from
 * the GPU) and applies the edits. Call with no step in flight.
 */
export async function pruneOverBudget(
  scheduler: BatchScheduler,
  runner: Pick<ModelRunner, "readMass" | "applyKvEdit">,
): Promise<void> {
  const candidates = scheduler.pruneCandidates();
  if (candidates.length === 0) return;
  const mass = await runner.readMass();
  for (const req of candidates) {
    const edit: KvEdit | null = scheduler.prune(req, mass);
    if (edit) await runner.applyKvEdit(edit);
  }
}

export class GpuIterationExecutor implements IterationExecutor<TrainingPair> {
  constructor(
    private readonly runner: ModelRunner,
    private readonly trainer: DpoTrainer | null,
    private readonly batch: BatchScheduler,
    private readonly layersPerSlice: number,
    /** GPU time per iteration where the adapter has timestamp queries. */
    private readonly timer: SpanTimer | null,
  ) {}

  launch(it: Iteration<TrainingPair>): Promise<IterationResults> {
    const ft = it.finetune;
    // The trainer checks and loads the step's pairs; its slices are the scheduler's (same planner).
    if (ft?.startsStep) {
      this.trainer?.planStep(ft.pairs.map((p) => p.item.payload), this.layersPerSlice);
    }
    return launchIteration(this.runner, this.trainer, {
      plan: it.step?.plan ?? null,
      slice: ft?.slice ?? null,
    }, this.timer);
  }

  /** A pair's first forward slice reads its reference log-probs on the CPU when it is encoded. */
  needsDrain(it: Iteration<TrainingPair>): boolean {
    const ft = it.finetune;
    if (!ft || !this.trainer || ft.slice.kind !== "forward" || ft.slice.fromLayer !== 0) {
      return false;
    }
    return !this.trainer.hasReference(ft.pairs[ft.slice.pair].item.payload);
  }

  prune(): Promise<void> {
    return pruneOverBudget(this.batch, this.runner);
  }
}
