/**
 * Replays a workload against a live Engine in real time: each arrival is submitted at its time
 * with the simulator's synthetic prompt (same ids, so the same prefix sharing) and generates
 * exactly its output length (ignoreEos); a feedback arrival sends its preference pair when its
 * request ends (prompt, chosen = the tokens it generated, rejected = the same tokens reversed,
 * both clamped like the simulator's pairs). The engine's own metrics are the result, so the live
 * run and `mace simulate` report the same numbers under the same names.
 */
import type { Engine, EngineMetrics, GenerateResult } from "./engine_api.ts";
import { feedbackShape, syntheticPrompt } from "../scheduler/sim/simulator.ts";
import type { Arrival } from "../scheduler/sim/workload.ts";

export interface ReplayOptions {
  /** Shared prefix tokens after BOS (the simulator's default: 32). */
  sharedPrefixTokens: number;
  vocabSize: number;
  /** The fine-tuner's longest prompt + response. */
  trainMaxLength: number;
  ttftSloMs: number;
  tbtSloMs: number;
  /** Called as each request ends (progress). */
  onResult?: (result: GenerateResult, arrival: Arrival) => void;
}

export interface ReplayResult {
  metrics: EngineMetrics;
  results: GenerateResult[];
  /** Feedback pairs submitted. */
  feedback: number;
}

export async function replayWorkload(
  engine: Engine,
  workload: readonly Arrival[],
  o: ReplayOptions,
): Promise<ReplayResult> {
  const start = performance.now();
  let feedback = 0;
  const runs = workload.map(async (a) => {
    const wait = start + a.atMs - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    const prompt = syntheticPrompt(a, o.sharedPrefixTokens, o.vocabSize);
    const result = await engine.generate({
      prompt,
      maxTokens: a.outputTokens,
      ignoreEos: true,
      requestId: `r${a.id}`,
    });
    if (a.feedback) {
      const { promptLength, responseLength } = feedbackShape(a, o.trainMaxLength);
      const chosen = result.tokens.slice(0, responseLength);
      await engine.submitFeedback([{
        prompt: prompt.slice(0, promptLength),
        chosen,
        rejected: [...chosen].reverse(),
      }]);
      feedback++;
    }
    o.onResult?.(result, a);
    return result;
  });
  const results = await Promise.all(runs);
  const metrics = await engine.metrics({ ttftMs: o.ttftSloMs, tbtMs: o.tbtSloMs });
  return { metrics, results, feedback };
}
