/** `mace convert`: a llama2.c checkpoint + tokenizer to the Hugging Face layout. */
import { parseFlags } from "../args.ts";
import { convertLlama2cToHf } from "../../engine/model/convert.ts";
import { InvalidRequestError } from "../../engine/errors.ts";

export const CONVERT_HELP = `mace convert --llama2c FILE.bin [--tokenizer tok.bin] --out DIR
  Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
  generation_config.json (--tokenizer defaults to tok512.bin beside the checkpoint).`;

export async function convertCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    llama2c: { type: "string" },
    tokenizer: { type: "string" },
    out: { type: "string" },
  }, "convert");
  if (!flags.llama2c || !flags.out) {
    throw new InvalidRequestError("convert needs --llama2c FILE and --out DIR");
  }
  const tokenizer = flags.tokenizer ?? flags.llama2c.replace(/[^/]*$/, "tok512.bin");
  await convertLlama2cToHf(flags.llama2c, tokenizer, flags.out);
  console.log(`wrote ${flags.out}`);
}
