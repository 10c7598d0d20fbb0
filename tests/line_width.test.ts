/**
 * No line of source is wider than deno.json's fmt.lineWidth: every .ts file under src/, tests/
 * and scripts/, and every .wgsl file under src/shaders/. `deno fmt` keeps code within the width
 * but leaves long strings, comments and test names as they are; this catches those.
 * GPU-free: it only reads files.
 */
import assert from "node:assert/strict";

const ROOT = new URL("..", import.meta.url).pathname;
Deno.chdir(ROOT);

const config = JSON.parse(await Deno.readTextFile("deno.json"));
const LINE_WIDTH: number = config.fmt.lineWidth;

/** Paths (relative to the repository root) of the files under `dir`, sorted, at any depth. */
async function walk(dir: string): Promise<string[]> {
  const files: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const path = `${dir}/${entry.name}`;
    if (entry.isDirectory) files.push(...await walk(path));
    else if (entry.isFile) files.push(path);
  }
  return files.sort();
}

/** Whether the width rule covers `path`. */
function checked(path: string): boolean {
  return path.endsWith(".ts") || (path.startsWith("src/shaders/") && path.endsWith(".wgsl"));
}

/** "file:line (N chars)" for each line of `path` over the width, N counted in code points. */
async function overWidth(path: string): Promise<string[]> {
  const lines = (await Deno.readTextFile(path)).split("\n");
  const found: string[] = [];
  lines.forEach((line, i) => {
    const width = [...line.replace(/\r$/, "")].length;
    if (width > LINE_WIDTH) found.push(`${path}:${i + 1} (${width} chars)`);
  });
  return found;
}

Deno.test("the line width is read from deno.json", () => {
  assert.ok(Number.isInteger(LINE_WIDTH) && LINE_WIDTH > 0, `fmt.lineWidth: ${LINE_WIDTH}`);
});

Deno.test(`no .ts or shader line is over deno.json's fmt.lineWidth`, async () => {
  const files: string[] = [];
  for (const dir of ["src", "tests", "scripts"]) files.push(...(await walk(dir)).filter(checked));
  assert.ok(files.some((f) => f.endsWith(".wgsl")), "no .wgsl file found under src/shaders/");
  const found: string[] = [];
  for (const file of files) found.push(...await overWidth(file));
  assert.equal(
    found.length,
    0,
    `${found.length} lines over ${LINE_WIDTH} characters:\n${found.join("\n")}`,
  );
});
