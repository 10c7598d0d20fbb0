/** `mace generate`: text generation from a prompt with the bundled or a given model. */
import { parseFlags, numberFlag, DEFAULT_MODEL } from "../args.ts";
import { createGpuContext, type BackendName } from "../../engine/gpu/context.ts";
import { openModelWithTokenizer } from "../../engine/load.ts";
import { ModelRunner } from "../../engine/runner/model_runner.ts";
import { generate } from "../../engine/generate.ts";
import { StreamDecoder } from "../../engine/tokenizer/stream_decoder.ts";
import { InvalidRequestError } from "../../engine/errors.ts";

export const GENERATE_HELP = `mace generate [--model DIR|FILE] [--tokenizer FILE] [--prompt TEXT]
    [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    [--backend auto|wgpu|dawn] [--weights f32|f16] [--json]
  Generates text; stops at EOS or --max-tokens. An empty prompt starts from BOS.`;

export async function generateCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    model: { type: "string", default: DEFAULT_MODEL },
    tokenizer: { type: "string" },
    prompt: { type: "string", default: "" },
    "max-tokens": { type: "string" },
    temperature: { type: "string" },
    "top-k": { type: "string" },
    "top-p": { type: "string" },
    seed: { type: "string" },
    backend: { type: "string", default: "auto" },
    weights: { type: "string", default: "f32" },
    json: { type: "boolean", default: false },
  }, "generate");
  const backend = flags.backend as BackendName;
  if (!["auto", "wgpu", "dawn"].includes(backend)) {
    throw new InvalidRequestError(`--backend ${backend}: expected auto, wgpu or dawn`);
  }
  if (flags.weights !== "f32" && flags.weights !== "f16") {
    throw new InvalidRequestError(`--weights ${flags.weights}: expected f32 or f16`);
  }
  const { source, tokenizer } = await openModelWithTokenizer(flags.model!, flags.tokenizer);
  const defaults = source.generationConfig ?? {};
  const maxTokens = numberFlag(flags["max-tokens"], "max-tokens", 256, (n) => Number.isInteger(n) && n >= 1);
  const sampling = {
    temperature: numberFlag(flags.temperature, "temperature", defaults.temperature ?? 0, (n) => n >= 0),
    topK: numberFlag(flags["top-k"], "top-k", defaults.topK ?? 0, (n) => Number.isInteger(n) && n >= 0),
    topP: numberFlag(flags["top-p"], "top-p", defaults.topP ?? 1, (n) => n > 0 && n <= 1),
    seed: numberFlag(flags.seed, "seed", 0, (n) => Number.isInteger(n) && n >= 0),
  };
  const prompt = tokenizer.encode(flags.prompt!, { addSpecialTokens: true });
  if (prompt.length === 0 && source.config.bosTokenId !== null) prompt.push(source.config.bosTokenId);

  const ctx = await createGpuContext({ backend });
  const runner = await ModelRunner.create(ctx, source, {
    weightDtype: flags.weights as "f32" | "f16",
    maxSeqs: 1,
    maxContext: Math.min(source.config.maxPositionEmbeddings, prompt.length + maxTokens),
    maxTokens: Math.min(512, prompt.length),
  });
  const eosIds = defaults.eosTokenIds ?? source.config.eosTokenIds;
  const decoder = new StreamDecoder(tokenizer);
  const encoder = new TextEncoder();
  if (!flags.json) await Deno.stdout.write(encoder.encode(flags.prompt!));
  const result = await generate(runner, prompt, {
    maxTokens,
    sampling,
    eosIds,
    onToken: flags.json ? undefined : (id) => {
      Deno.stdout.writeSync(encoder.encode(decoder.push(id)));
    },
  });
  const decodeMs = result.tokenTimesMs.reduce((a, b) => a + b, 0);
  if (flags.json) {
    console.log(JSON.stringify({
      model: source.description,
      backend: ctx.backend,
      adapter: ctx.adapterDescription,
      promptTokens: result.promptTokens,
      tokens: result.tokens,
      text: tokenizer.decode(result.tokens),
      stopReason: result.stopReason,
      ttftMs: result.ttftMs,
      tokenTimesMs: result.tokenTimesMs,
      decodeTokensPerSecond: result.tokenTimesMs.length / (decodeMs / 1000),
      loraAdapter: null,
    }));
  } else {
    Deno.stdout.writeSync(encoder.encode(decoder.flush() + "\n"));
    console.error(
      `[${result.tokens.length} tokens, TTFT ${result.ttftMs.toFixed(1)} ms, ` +
        `${(result.tokenTimesMs.length / (decodeMs / 1000)).toFixed(1)} tokens/s, ${ctx.backend}: ${ctx.adapterDescription}]`,
    );
  }
  runner.destroy();
  ctx.destroy();
}
