/** The mace command line: `deno task mace <command> [flags]`. */
import { MaceError } from "../engine/errors.ts";
import { GENERATE_HELP, generateCommand } from "./commands/generate.ts";
import { INFO_HELP, infoCommand } from "./commands/info.ts";
import { CONVERT_HELP, convertCommand } from "./commands/convert.ts";
import { BENCH_HELP, benchCommand } from "./commands/bench.ts";
import { EVAL_PRUNING_HELP, evalPruningCommand } from "./commands/eval_pruning.ts";
import { TRAIN_HELP, trainCommand } from "./commands/train.ts";
import { SIMULATE_HELP, simulateCommand } from "./commands/simulate.ts";
import { LOADTEST_HELP, loadtestCommand } from "./commands/loadtest.ts";
import { PROFILE_HELP, profileCommand } from "./commands/profile.ts";

const COMMANDS: Record<string, { run: (argv: string[]) => Promise<void>; help: string }> = {
  generate: { run: generateCommand, help: GENERATE_HELP },
  convert: { run: convertCommand, help: CONVERT_HELP },
  bench: { run: benchCommand, help: BENCH_HELP },
  info: { run: infoCommand, help: INFO_HELP },
  "eval-pruning": { run: evalPruningCommand, help: EVAL_PRUNING_HELP },
  train: { run: trainCommand, help: TRAIN_HELP },
  simulate: { run: simulateCommand, help: SIMULATE_HELP },
  loadtest: { run: loadtestCommand, help: LOADTEST_HELP },
  profile: { run: profileCommand, help: PROFILE_HELP },
};

function usage(): string {
  return "usage: mace <command> [flags]\n\n" +
    Object.values(COMMANDS).map((c) => c.help).join("\n\n");
}

const [name, ...rest] = Deno.args;
const command = name ? COMMANDS[name] : undefined;
if (!command) {
  console.error(
    name && name !== "help" ? `mace: unknown command "${name}"\n\n${usage()}` : usage(),
  );
  Deno.exit(name && name !== "help" ? 2 : 0);
}
try {
  await command.run(rest);
} catch (e) {
  if (e instanceof MaceError) {
    console.error(`mace ${name}: ${e.name}: ${e.message}`);
    Deno.exit(1);
  }
  throw e;
}
