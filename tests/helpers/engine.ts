/**
 * Serving-only engines for tests: a MaceEngine under the inference-only policy (no fine-tuner)
 * on the test process's GPU context, which close() leaves open for the next test.
 */
import type { ModelSource } from "../../src/engine/model/source.ts";
import type { EngineOptions } from "../../src/host/engine_api.ts";
import { MaceEngine } from "../../src/host/mace_engine.ts";
import { testContext } from "./gpu.ts";

/** The serving options, and the longest prompt + output in tokens. */
export type InferenceOptions = NonNullable<EngineOptions["serving"]> & { maxContext?: number };

export async function inferenceEngine(
  source: ModelSource,
  options: InferenceOptions = {},
): Promise<MaceEngine> {
  const { maxContext, ...serving } = options;
  return await MaceEngine.open(await testContext(), source, {
    policy: "inference-only",
    maxContext,
    serving,
  });
}
