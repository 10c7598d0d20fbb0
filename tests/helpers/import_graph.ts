/**
 * The relative-import graph of a source tree, for the layering test (tests/layers.test.ts):
 * which file imports which, read with regular expressions (no TypeScript parser needed).
 *
 * An edge is any `import ... from "./x.ts"`, `import type ...`, `export ... from`, bare
 * `import "./x.ts"`, dynamic `import("./x.ts")`, or a worker script named by
 * `new URL("./x.ts", import.meta.url)`. Comments are removed first, so prose that mentions a
 * path is no edge. Paths are relative to the repository root, with forward slashes.
 */

/** Module specifiers a source text loads (relative or not), in order of appearance. */
export function importSpecifiers(source: string): string[] {
  const code = stripComments(source);
  const patterns = [
    // import x from "m"; import type { X } from "m"; export { x } from "m"; export * from "m"
    /(?:^|[;\n}])\s*(?:import|export)\b[^;"'`]*?\bfrom\s*["']([^"']+)["']/g,
    // import "m" (side effects only)
    /(?:^|[;\n}])\s*import\s*["']([^"']+)["']/g,
    // import("m")
    /\bimport\s*\(\s*["']([^"']+)["']\s*\)/g,
    // new URL("./worker.ts", import.meta.url)
    /\bnew\s+URL\(\s*["'](\.{1,2}\/[^"']+\.ts)["']\s*,\s*import\.meta\.url\s*\)/g,
  ];
  const found: { at: number; spec: string }[] = [];
  for (const pattern of patterns) {
    for (const m of code.matchAll(pattern)) found.push({ at: m.index, spec: m[1] });
  }
  return found.sort((a, b) => a.at - b.at).map((f) => f.spec);
}

/** Removes block and line comments, leaving string literals (which may hold "//") intact. */
export function stripComments(source: string): string {
  let out = "";
  let i = 0;
  while (i < source.length) {
    const c = source[i], next = source[i + 1];
    if (c === "/" && next === "*") {
      const end = source.indexOf("*/", i + 2);
      i = end < 0 ? source.length : end + 2;
    } else if (c === "/" && next === "/") {
      while (i < source.length && source[i] !== "\n") i++;
    } else if (c === '"' || c === "'" || c === "`") {
      let j = i + 1;
      while (j < source.length && source[j] !== c) j += source[j] === "\\" ? 2 : 1;
      out += source.slice(i, j + 1);
      i = j + 1;
    } else {
      out += c;
      i++;
    }
  }
  return out;
}

/** Resolves a relative specifier against the importing file's path ("src/a/b.ts"). */
export function resolveRelative(from: string, spec: string): string {
  const parts = from.split("/").slice(0, -1);
  for (const part of spec.split("/")) {
    if (part === "..") parts.pop();
    else if (part !== ".") parts.push(part);
  }
  return parts.join("/");
}

/** file -> the files it imports (relative imports only, resolved), for every .ts under `root`. */
export async function importGraph(root: string): Promise<Map<string, string[]>> {
  const graph = new Map<string, string[]>();
  for await (const file of walkTs(root)) {
    const specs = importSpecifiers(await Deno.readTextFile(file));
    const targets = specs.filter((s) => s.startsWith("./") || s.startsWith("../"))
      .map((s) => resolveRelative(file, s));
    graph.set(file, [...new Set(targets)]);
  }
  return graph;
}

async function* walkTs(dir: string): AsyncGenerator<string> {
  const entries = [];
  for await (const entry of Deno.readDir(dir)) entries.push(entry);
  entries.sort((a, b) => a.name.localeCompare(b.name));
  for (const entry of entries) {
    const path = `${dir}/${entry.name}`;
    if (entry.isDirectory) yield* walkTs(path);
    else if (entry.isFile && path.endsWith(".ts")) yield path;
  }
}

/**
 * One cycle per strongly connected component that has one (Tarjan), each as the files along it
 * with the first repeated at the end: ["a.ts", "b.ts", "a.ts"]. Edges to files outside the graph
 * are ignored.
 */
export function findCycles(graph: ReadonlyMap<string, readonly string[]>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const components: string[][] = [];
  const next = (v: string) => (graph.get(v) ?? []).filter((w) => graph.has(w));

  // Iterative Tarjan: the source tree is small, but recursion depth should not depend on it.
  for (const root of graph.keys()) {
    if (index.has(root)) continue;
    const work: { v: string; edges: string[]; at: number }[] = [];
    const visit = (v: string) => {
      index.set(v, index.size);
      low.set(v, index.get(v)!);
      stack.push(v);
      onStack.add(v);
      work.push({ v, edges: next(v), at: 0 });
    };
    visit(root);
    while (work.length > 0) {
      const frame = work[work.length - 1];
      if (frame.at < frame.edges.length) {
        const w = frame.edges[frame.at++];
        if (!index.has(w)) visit(w);
        else if (onStack.has(w)) low.set(frame.v, Math.min(low.get(frame.v)!, index.get(w)!));
        continue;
      }
      work.pop();
      const parent = work[work.length - 1];
      if (parent) low.set(parent.v, Math.min(low.get(parent.v)!, low.get(frame.v)!));
      if (low.get(frame.v) !== index.get(frame.v)) continue;
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(w);
      } while (w !== frame.v);
      if (component.length > 1 || next(frame.v).includes(frame.v)) components.push(component);
    }
  }
  return components.map((c) => cycleWithin(new Set(c), next));
}

/**
 * A shortest cycle through the component's first file (in sorted order), by breadth-first search.
 */
function cycleWithin(component: Set<string>, next: (v: string) => string[]): string[] {
  const start = [...component].sort()[0];
  const cameFrom = new Map<string, string>();
  const queue = [start];
  for (let i = 0; i < queue.length; i++) {
    const v = queue[i];
    for (const w of next(v)) {
      if (!component.has(w)) continue;
      if (w === start) {
        const path = [start];
        for (let u = v; u !== start; u = cameFrom.get(u)!) path.push(u);
        return [start, ...path.slice(1).reverse(), start];
      }
      if (!cameFrom.has(w)) {
        cameFrom.set(w, v);
        queue.push(w);
      }
    }
  }
  throw new Error(`no cycle through ${start}, yet it is in a strongly connected component`);
}
