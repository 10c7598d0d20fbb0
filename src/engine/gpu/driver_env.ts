/**
 * The process environment the Vulkan drivers read, set from inside the engine so that a plain
 * `mace` run on a machine without a GPU finds a software driver by itself and prints no driver
 * warnings. Deno and Node only (context.ts imports this module lazily, never in a browser).
 */
import { existsSync, mkdirSync, statSync } from "node:fs";
import process from "node:process";

/**
 * Where Chromium and Chrome packages install SwiftShader's Vulkan driver manifest (Debian and
 * Ubuntu's chromium, Fedora's chromium, Google Chrome), in order of preference.
 */
export const SWIFTSHADER_ICD_PATHS: readonly string[] = [
  "/usr/lib/chromium/vk_swiftshader_icd.json",
  "/usr/lib64/chromium-browser/vk_swiftshader_icd.json",
  "/usr/lib/chromium-browser/vk_swiftshader_icd.json",
  "/opt/google/chrome/vk_swiftshader_icd.json",
];

/** The first SwiftShader manifest of `paths` that exists, or null. */
export function findSwiftShaderIcd(
  paths: readonly string[] = SWIFTSHADER_ICD_PATHS,
): string | null {
  return paths.find((path) => existsSync(path)) ?? null;
}

/** The Vulkan driver manifests the user chose (VK_DRIVER_FILES or VK_ICD_FILENAMES), if any. */
export function chosenVulkanDrivers(): string | null {
  return process.env.VK_DRIVER_FILES || process.env.VK_ICD_FILENAMES || null;
}

/**
 * Runs `fn` with the environment variables `vars` set (undefined: removed), then restores the
 * previous values: the Vulkan loader reads them when an instance is created, and nothing else
 * in the process should see them.
 */
export async function withEnv<T>(
  vars: Record<string, string | undefined>,
  fn: () => Promise<T>,
): Promise<T> {
  const saved = Object.keys(vars).map((name) => [name, process.env[name]] as const);
  const put = (name: string, value: string | undefined) => {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  };
  for (const [name, value] of Object.entries(vars)) put(name, value);
  try {
    return await fn();
  } finally {
    for (const [name, value] of saved) put(name, value);
  }
}

/**
 * Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" (several times) when it
 * does not name a writable folder, as in containers and CI. Points it at a private folder under
 * the temp folder first; scripts/env.sh does the same for the scripts. Returns the folder set,
 * or null when the existing value was fine or the environment cannot be changed.
 */
export function ensureRuntimeDir(tmp = process.env.TMPDIR || "/tmp"): string | null {
  const current = process.env.XDG_RUNTIME_DIR;
  if (current && isWritableDir(current)) return null;
  const uid = typeof process.getuid === "function" ? process.getuid() : "user";
  const dir = `${tmp}/mace-runtime-${uid}`;
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    process.env.XDG_RUNTIME_DIR = dir;
    return dir;
  } catch {
    return null; // only a warning is at stake: carry on without it
  }
}

function isWritableDir(path: string): boolean {
  try {
    // Owner-writable folder: the drivers only create sockets and locks there.
    const stat = statSync(path);
    return stat.isDirectory() && (stat.mode & 0o200) !== 0;
  } catch {
    return false;
  }
}
