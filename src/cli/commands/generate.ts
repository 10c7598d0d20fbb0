/**
 * `mace generate`: text generation with the bundled or a given model, from one
 * prompt (streamed to stdout) or from a JSONL file of prompts run together as one
 * continuously batched workload (one JSON line out per prompt, in file order).
 */
import { backendFlag, DEFAULT_MODEL, numberFlag, parseFlags } from "../args.ts";
import { createGpuContext } from "../../engine/gpu/context.ts";
import { openModelWithTokenizer } from "../../engine/load.ts";
import { StreamDecoder } from "../../engine/tokenizer/stream_decoder.ts";
import type { Tokenizer } from "../../engine/tokenizer/tokenizer.ts";
import type { SamplingParams } from "../../engine/step.ts";
import { InvalidRequestError } from "../../engine/errors.ts";
import { MaceEngine } from "../../host/mace_engine.ts";
import type { RequestOutput } from "../../scheduler/request.ts";
import { parsePromptsFile } from "../generate/prompts_file.ts";
import { readPeftAdapter } from "../../engine/lora/peft.ts";

export const GENERATE_HELP = `mace generate [--model DIR|FILE] [--tokenizer FILE]
    [--prompt TEXT | --prompts FILE.jsonl] [--max-tokens N] [--temperature T] [--top-k K]
    [--top-p P] [--seed S] [--backend auto|wgpu|dawn] [--weights f32|f16] [--json]
    [--max-seqs N] [--chunk-tokens N] [--no-prefix-cache] [--pipeline-depth N] [--kv-budget N]
    [--adapter DIR]
  Generates text; stops at EOS or --max-tokens. An empty prompt starts from BOS.
  --prompts runs every line ({"prompt", "max_tokens"?, "seed"?, "temperature"?, "top_k"?,
  "top_p"?}) as one continuously batched workload and prints one JSON line per prompt.
  --kv-budget N prunes each request's KV cache to N tokens (H2O-style; default 0 = exact).
  --adapter DIR serves with a LoRA adapter in the PEFT layout (e.g. written by mace train).`;

export async function generateCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    model: { type: "string", default: DEFAULT_MODEL },
    tokenizer: { type: "string" },
    prompt: { type: "string", default: "" },
    prompts: { type: "string" },
    "max-tokens": { type: "string" },
    temperature: { type: "string" },
    "top-k": { type: "string" },
    "top-p": { type: "string" },
    seed: { type: "string" },
    backend: { type: "string", default: "auto" },
    weights: { type: "string", default: "f32" },
    json: { type: "boolean", default: false },
    "max-seqs": { type: "string" },
    "chunk-tokens": { type: "string" },
    "no-prefix-cache": { type: "boolean", default: false },
    "pipeline-depth": { type: "string" },
    "kv-budget": { type: "string" },
    adapter: { type: "string" },
  }, "generate");
  const backend = backendFlag(flags.backend);
  if (flags.weights !== "f32" && flags.weights !== "f16") {
    throw new InvalidRequestError(`--weights ${flags.weights}: expected f32 or f16`);
  }
  const positiveInt = (n: number) => Number.isInteger(n) && n >= 1;
  const lines = flags.prompts !== undefined
    ? parsePromptsFile(await readPromptsFile(flags.prompts), flags.prompts)
    : [{ prompt: flags.prompt! }];
  const { source, tokenizer } = await openModelWithTokenizer(flags.model!, flags.tokenizer);
  const defaults = source.generationConfig ?? {};
  const maxTokens = numberFlag(flags["max-tokens"], "max-tokens", 256, positiveInt);
  const sampling: SamplingParams = {
    temperature: numberFlag(
      flags.temperature,
      "temperature",
      defaults.temperature ?? 0,
      (n) => n >= 0,
    ),
    topK: numberFlag(
      flags["top-k"],
      "top-k",
      defaults.topK ?? 0,
      (n) => Number.isInteger(n) && n >= 0,
    ),
    topP: numberFlag(flags["top-p"], "top-p", defaults.topP ?? 1, (n) => n > 0 && n <= 1),
    seed: numberFlag(flags.seed, "seed", 0, (n) => Number.isInteger(n) && n >= 0),
  };
  const requests = lines.map((line) => ({
    text: line.prompt,
    prompt: encodePrompt(tokenizer, line.prompt, source.config.bosTokenId),
    maxTokens: line.maxTokens ?? maxTokens,
    sampling: {
      temperature: line.temperature ?? sampling.temperature,
      topK: line.topK ?? sampling.topK,
      topP: line.topP ?? sampling.topP,
      seed: line.seed ?? sampling.seed,
    },
  }));
  const longest = Math.max(...requests.map((r) => r.prompt.length + r.maxTokens));
  const adapter = flags.adapter === undefined
    ? null
    : await readPeftAdapter(flags.adapter, source.config);

  const ctx = await createGpuContext({ backend });
  const engine = await MaceEngine.open(ctx, source, {
    policy: "inference-only",
    maxContext: Math.min(source.config.maxPositionEmbeddings, longest),
    serving: {
      weights: flags.weights as "f32" | "f16",
      maxSeqs: numberFlag(
        flags["max-seqs"],
        "max-seqs",
        Math.min(16, requests.length),
        positiveInt,
      ),
      maxTokensPerStep: numberFlag(flags["chunk-tokens"], "chunk-tokens", 256, positiveInt),
      prefixCaching: !flags["no-prefix-cache"],
      pipelineDepth: flags["pipeline-depth"] === undefined
        ? undefined
        : numberFlag(flags["pipeline-depth"], "pipeline-depth", 1, positiveInt),
      kvBudget: numberFlag(
        flags["kv-budget"],
        "kv-budget",
        0,
        (n) => Number.isInteger(n) && n >= 0,
      ),
      adapterRank: adapter?.config.rank,
      adapterTargets: adapter?.config.targets,
    },
  });
  const adapterId = adapter ? await engine.publishAdapter("adapter", adapter) : undefined;
  try {
    if (flags.prompts === undefined) {
      await generateOne(
        engine,
        tokenizer,
        { ...requests[0], adapter: adapterId },
        flags.json!,
        ctx,
      );
    } else {
      const outputs = await Promise.all(
        requests.map((r) =>
          engine.generate({
            prompt: r.prompt,
            maxTokens: r.maxTokens,
            sampling: r.sampling,
            adapter: adapterId,
          })
        ),
      );
      for (const output of outputs) {
        console.log(JSON.stringify(outputJson(output, tokenizer, adapterId)));
      }
      const stats = engine.blockManager.stats();
      console.error(
        `[${outputs.length} prompts, ${outputs.reduce((n, o) => n + o.tokens.length, 0)} tokens, ` +
          `prefix hit rate ${
            (100 * stats.hitRate).toFixed(1)
          }%, ${ctx.backend}: ${ctx.adapterDescription}]`,
      );
    }
  } finally {
    await engine.close();
    ctx.destroy();
  }
}

async function readPromptsFile(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    throw new InvalidRequestError(`--prompts ${path}: cannot read it (${(e as Error).message})`);
  }
}

function encodePrompt(tokenizer: Tokenizer, text: string, bos: number | null): number[] {
  const ids = tokenizer.encode(text, { addSpecialTokens: true });
  if (ids.length === 0 && bos !== null) ids.push(bos);
  if (ids.length === 0) {
    throw new InvalidRequestError(
      "the prompt is empty and the model has no BOS token to start from",
    );
  }
  return ids;
}

function outputJson(output: RequestOutput, tokenizer: Tokenizer, adapter: string | undefined) {
  const decodeMs = output.tokenTimesMs.reduce((a, b) => a + b, 0);
  return {
    promptTokens: output.promptTokens,
    tokens: output.tokens,
    text: tokenizer.decode(output.tokens),
    stopReason: output.stopReason,
    ttftMs: output.ttftMs,
    tokenTimesMs: output.tokenTimesMs,
    decodeTokensPerSecond: output.tokenTimesMs.length / (decodeMs / 1000),
    prefixHitTokens: output.prefixHitTokens,
    evictedTokens: output.evictedTokens,
    loraAdapter: adapter ?? null,
  };
}

async function generateOne(
  engine: MaceEngine,
  tokenizer: Tokenizer,
  request: {
    text: string;
    prompt: number[];
    maxTokens: number;
    sampling: SamplingParams;
    adapter?: string;
  },
  json: boolean,
  ctx: { backend: string; adapterDescription: string },
): Promise<void> {
  const decoder = new StreamDecoder(tokenizer);
  const encoder = new TextEncoder();
  if (!json) await Deno.stdout.write(encoder.encode(request.text));
  const output = await engine.generate(
    {
      prompt: request.prompt,
      maxTokens: request.maxTokens,
      sampling: request.sampling,
      adapter: request.adapter,
    },
    json ? undefined : (id) => Deno.stdout.writeSync(encoder.encode(decoder.push(id))),
  );
  if (json) {
    console.log(JSON.stringify({
      backend: ctx.backend,
      adapter: ctx.adapterDescription,
      ...outputJson(output, tokenizer, request.adapter),
    }));
    return;
  }
  Deno.stdout.writeSync(encoder.encode(decoder.flush() + "\n"));
  const decodeMs = output.tokenTimesMs.reduce((a, b) => a + b, 0);
  console.error(
    `[${output.tokens.length} tokens, TTFT ${output.ttftMs.toFixed(1)} ms, ` +
      `${(output.tokenTimesMs.length / (decodeMs / 1000)).toFixed(1)} tokens/s, ` +
      `${ctx.backend}: ${ctx.adapterDescription}]`,
  );
}
