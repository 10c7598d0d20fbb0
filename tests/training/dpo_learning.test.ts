/**
 * Runs on wgpu only (a plain .test.ts): it samples a few hundred stories and trains for dozens
 * of steps, minutes on Dawn's SwiftShader; every training kernel and the trainer's gradient are
 * tested on both backends (tests/kernels/*, tests/training/dpo_gradient.gpu.test.ts).
 *
 * DPO learns a preference on the bundled model. The rule: a story that mentions a park beats
 * one that does not. Pairs come from the model's own samples (temperature 1 from "Once upon a
 * time", seeds 0..95, 48 tokens): a story with "park" is chosen over one without (each park
 * story against up to three others). LoRA r=8 on q and v, AdamW lr 1e-3, beta 0.1, 16 steps of 4
 * pairs (longer or faster training over-optimizes: the chosen log-prob falls and text degrades).
 * After training,
 *  - the share of sampled stories (seeds 1000..1063, same seeds before and after) that mention
 *    a park rises by at least 10 points (measured: 14% -> 36%), and
 *  - reward accuracy on held-out pairs (from stories the training never saw) is above 0.5.
 */
import { ok } from "node:assert/strict";
import { openModelWithTokenizer } from "../../src/engine/load.ts";
import { DpoTrainer, type TrainingPair } from "../../src/engine/training/dpo_trainer.ts";
import type { LoraTarget } from "../../src/engine/lora/lora.ts";
import { inferenceEngine } from "../helpers/engine.ts";
import { gpuTest, testContext } from "../helpers/gpu.ts";

const MODEL_DIR = new URL("../../models/stories260K/", import.meta.url).pathname;
const STORY_TOKENS = 48;
const mentionsPark = (text: string) => /\bpark\b/i.test(text);

Deno.test(
  { name: "DPO on the model's own samples teaches it to mention a park", ...gpuTest },
  async () => {
    const ctx = await testContext();
    const { source, tokenizer } = await openModelWithTokenizer(MODEL_DIR);
    const engine = await inferenceEngine(source, {
      maxSeqs: 16,
      maxContext: 64,
      maxTokensPerStep: 256,
      maxAdapters: 1,
      adapterRank: 8,
      adapterTargets: ["q", "v"],
    });

    const prompt = tokenizer.encode("Once upon a time", { addSpecialTokens: true });
    const sample = (seeds: number[], adapter?: string) =>
      Promise.all(seeds.map((seed) =>
        engine.generate({
          prompt,
          maxTokens: STORY_TOKENS,
          sampling: { temperature: 1, topK: 0, topP: 1, seed },
          ignoreEos: true,
          adapter,
        }).then((o) => o.tokens)
      ));
    const range = (start: number, n: number) => Array.from({ length: n }, (_, i) => start + i);
    const share = (stories: number[][]) =>
      stories.filter((s) => mentionsPark(tokenizer.decode(s))).length / stories.length;

    // Preference pairs: every story with a park against up to three without, in seed order.
    const pairsFrom = (stories: number[][]): TrainingPair[] => {
      const yes = stories.filter((s) => mentionsPark(tokenizer.decode(s)));
      const no = stories.filter((s) => !mentionsPark(tokenizer.decode(s)));
      return no.slice(0, 3 * yes.length).map((rejected, i) => ({
        prompt,
        chosen: yes[i % yes.length],
        rejected,
      }));
    };
    const train = pairsFrom(await sample(range(0, 96)));
    const heldOut = pairsFrom(await sample(range(500, 48)));
    const evalSeeds = range(1000, 64);
    const before = share(await sample(evalSeeds));

    const targets: LoraTarget[] = ["q", "v"];
    const trainer = new DpoTrainer(ctx, source.config, engine.runner.weights, {
      rank: 8,
      alpha: 16,
      targets,
      dropout: 0,
    }, {
      beta: 0.1,
      learningRate: 1e-3,
      maxPairsPerStep: 4,
      maxLength: prompt.length + STORY_TOKENS,
    });
    trainer.initialize(1);
    const heldBefore = await trainer.evaluate(heldOut);
    const steps = 16;
    for (let step = 0; step < steps; step++) {
      await trainer.step(Array.from({ length: 4 }, (_, i) => train[(step * 4 + i) % train.length]));
    }
    const heldAfter = await trainer.evaluate(heldOut);
    const adapter = await engine.publishAdapter("park", await trainer.params.read());
    const after = share(await sample(evalSeeds, adapter));
    trainer.destroy();
    await engine.close();

    console.log(
      `park stories (seeds 1000..1063): base ${(100 * before).toFixed(1)}% -> DPO ${
        (100 * after).toFixed(1)
      }%; ` +
        `${train.length} train pairs, ${steps} steps of 4; ` +
        `held-out (${heldOut.length} pairs) reward accuracy ` +
        `${heldBefore.rewardAccuracy.toFixed(2)} -> ${heldAfter.rewardAccuracy.toFixed(2)}, ` +
        `loss ${heldBefore.loss.toFixed(3)} -> ${heldAfter.loss.toFixed(3)}`,
    );
    ok(after >= before + 0.1, `park share must rise clearly: ${before} -> ${after}`);
    ok(heldAfter.rewardAccuracy > 0.5, `held-out reward accuracy ${heldAfter.rewardAccuracy}`);
  },
);
