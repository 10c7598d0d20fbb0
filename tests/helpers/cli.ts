/**
 * Runs `mace <args>` as a user does: a subprocess from the repository root, output captured.
 * The CLI tests run in the wgpu suite only, so their subprocesses use Deno's WebGPU too.
 */

/** The repository root, with a trailing slash. */
export const ROOT = new URL("../../", import.meta.url).pathname;

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export async function mace(...args: string[]): Promise<CliResult> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ROOT + "src/cli/mace.ts", ...args],
    cwd: ROOT,
    env: { MACE_BACKEND: "wgpu" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}
