/**
 * One iteration on the GPU: the serving step, then the fine-tuning slice, submitted back to back
 * so the step's tokens come out first. The measured time runs from the first submit until both
 * are done: it is what the next iteration waits for, and what the cost model predicts. The live
 * loop and `mace profile` both run iterations through here, so a profile measures exactly what
 * the scheduler will see.
 */
import type { ModelRunner } from "../engine/runner/model_runner.ts";
import type { StepPlan, StepResult } from "../engine/step.ts";
import type { DpoTrainer } from "../engine/training/dpo_trainer.ts";
import type { TrainingSlice } from "../engine/training/slice_plan.ts";

export interface IterationWork {
  plan: StepPlan | null;
  slice: TrainingSlice | null;
}

export interface IterationTiming {
  step: StepResult | null;
  /** Wall ms from the first submit until the step's samples are read and the slice is done. */
  ms: number;
}

export async function runIteration(
  runner: ModelRunner,
  trainer: DpoTrainer | null,
  work: IterationWork,
): Promise<IterationTiming> {
  const start = performance.now();
  const step = work.plan && work.plan.sequences.length > 0 ? runner.execute(work.plan) : null;
  if (work.slice) {
    if (!trainer) throw new Error("an iteration with a fine-tuning slice needs a trainer");
    // Submits the slice's GPU work; a reference slice also waits for its log-probs.
    await trainer.runSlice(work.slice);
  }
  const result = step ? await step : null;
  if (work.slice) {
    await runner.ctx.device.queue.onSubmittedWorkDone();
    runner.ctx.throwIfFailed();
  }
  return { step: result, ms: performance.now() - start };
}
