/** `mace info`: the GPU adapter, its features and limits, and (with --model) the model's shape. */
import { backendFlag, parseFlags } from "../args.ts";
import { createGpuContext } from "../../engine/gpu/context.ts";
import { openModel } from "../../engine/model/open_model.ts";
import { parameterCount } from "../../engine/model/config.ts";

export const INFO_HELP = `mace info [--backend auto|wgpu|dawn] [--model DIR|FILE] [--json]
  Prints the adapter, the features and limits the engine adapts to, and the model's config.`;

export async function infoCommand(argv: string[]): Promise<void> {
  const flags = parseFlags(argv, {
    backend: { type: "string", default: "auto" },
    model: { type: "string" },
    json: { type: "boolean", default: false },
  }, "info");
  const ctx = await createGpuContext({ backend: backendFlag(flags.backend) });
  const info: Record<string, unknown> = {
    backend: ctx.backend,
    adapter: ctx.adapterDescription,
    software: ctx.isSoftware,
    features: ctx.features,
    limits: ctx.limits,
  };
  if (flags.model) {
    const source = await openModel(flags.model);
    info.model = {
      path: source.description,
      parameters: parameterCount(source.config),
      ...source.config,
    };
  }
  console.log(flags.json ? JSON.stringify(info) : JSON.stringify(info, null, 2));
  ctx.destroy();
}
