/**
 * The layers of src/ (docs/ARCHITECTURE.md), checked on the relative-import graph: no import
 * cycle, and every arrow points down:
 *   cli, server, ui -> host -> scheduler -> engine      (worker sits beside host, above it)
 * - src/engine and src/scheduler import nothing from host, worker, cli, server or ui;
 * - src/host imports nothing from worker or cli;
 * - src/engine imports nothing from src/scheduler;
 * - src/scheduler touches no WebGPU API: it does not reach src/engine/gpu or the webgpu package
 *   (directly or through what it imports) and names no GPUDevice / navigator.gpu;
 * - nothing in src/ imports from tests/.
 * GPU-free: it only reads files.
 */
import assert from "node:assert/strict";
import {
  findCycles,
  importGraph,
  importSpecifiers,
  stripComments,
} from "./helpers/import_graph.ts";

const ROOT = new URL("..", import.meta.url).pathname;
Deno.chdir(ROOT);
const graph = await importGraph("src");

/** "file -> target" for each import of a file under `from` that lands under one of `banned`. */
function arrows(from: string, banned: readonly string[]): string[] {
  const found: string[] = [];
  for (const [file, targets] of graph) {
    if (!file.startsWith(from)) continue;
    for (const target of targets) {
      if (banned.some((b) => target.startsWith(b))) found.push(`${file} -> ${target}`);
    }
  }
  return found;
}

Deno.test("layers: the import graph covers src/ and every relative import resolves", async () => {
  assert.ok(graph.size > 100, `only ${graph.size} files under src/`);
  const missing: string[] = [];
  for (const [file, targets] of graph) {
    for (const target of targets) {
      if (target.endsWith(".ts") && !graph.has(target)) {
        try {
          await Deno.stat(target);
        } catch {
          missing.push(`${file} -> ${target}`);
        }
      }
    }
  }
  assert.deepEqual(missing, [], "imports of files that do not exist");
});

Deno.test("layers: src/ has no import cycle", () => {
  const cycles = findCycles(graph).map((c) => c.join(" -> "));
  assert.deepEqual(cycles, [], `import cycles:\n${cycles.join("\n")}`);
});

Deno.test("layers: engine and scheduler import nothing above them", () => {
  const above = ["src/host/", "src/worker/", "src/cli/", "src/server/", "src/ui/"];
  assert.deepEqual([...arrows("src/engine/", above), ...arrows("src/scheduler/", above)], []);
});

Deno.test("layers: host imports neither the worker nor the CLI", () => {
  assert.deepEqual(arrows("src/host/", ["src/worker/", "src/cli/"]), []);
});

Deno.test("layers: the engine does not import the scheduler", () => {
  assert.deepEqual(arrows("src/engine/", ["src/scheduler/"]), []);
});

Deno.test("layers: nothing in src/ imports from tests/", () => {
  assert.deepEqual(arrows("src/", ["tests/"]), []);
});

Deno.test("layers: the scheduler reaches no WebGPU API, directly or via imports", async () => {
  const problems: string[] = [];
  // Every file the scheduler loads, with the import path that led there.
  const via = new Map<string, string[]>();
  const queue = [...graph.keys()].filter((f) => f.startsWith("src/scheduler/"));
  for (const f of queue) via.set(f, [f]);
  for (let i = 0; i < queue.length; i++) {
    const file = queue[i];
    const path = via.get(file)!;
    if (file.startsWith("src/engine/gpu/")) problems.push(`${path.join(" -> ")}: WebGPU context`);
    const code = stripComments(await Deno.readTextFile(file));
    if (/\bnavigator\.gpu\b|\bGPUDevice\b/.test(code)) {
      problems.push(`${path.join(" -> ")}: names GPUDevice or navigator.gpu`);
    }
    const packages = importSpecifiers(code).filter((s) => /^(npm:)?(@webgpu\/|webgpu\b)/.test(s));
    if (packages.length > 0) problems.push(`${path.join(" -> ")}: imports ${packages}`);
    for (const target of graph.get(file) ?? []) {
      if (via.has(target) || !graph.has(target)) continue;
      via.set(target, [...path, target]);
      queue.push(target);
    }
  }
  assert.deepEqual(problems, []);
});

Deno.test("layers: the import reader sees every import form and finds a planted cycle", () => {
  const source = [
    `import a from "./a.ts";`,
    `import type {`,
    `  B,`,
    `  C,`,
    `} from "../b.ts";`,
    `export { d } from "./d.ts";`,
    `export * from './e.ts';`,
    `import "./f.ts";`,
    `const g = await import("./g.ts");`,
    `new Worker(new URL("./h.ts", import.meta.url));`,
    `// import x from "./commented.ts";`,
    `/* export { y } from "./block.ts"; */`,
    `const url = "https://example.com/x"; import z from "npm:webgpu";`,
  ].join("\n");
  assert.deepEqual(importSpecifiers(source), [
    "./a.ts",
    "../b.ts",
    "./d.ts",
    "./e.ts",
    "./f.ts",
    "./g.ts",
    "./h.ts",
    "npm:webgpu",
  ]);
  const planted = new Map([
    ["src/a.ts", ["src/b.ts"]],
    ["src/b.ts", ["src/c.ts", "src/outside.ts"]],
    ["src/c.ts", ["src/a.ts"]],
    ["src/d.ts", ["src/d.ts"]],
    ["src/e.ts", ["src/a.ts"]],
  ]);
  assert.deepEqual(findCycles(planted), [
    ["src/a.ts", "src/b.ts", "src/c.ts", "src/a.ts"],
    ["src/d.ts", "src/d.ts"],
  ]);
});
