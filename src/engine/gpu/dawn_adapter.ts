/**
 * Dawn through the `webgpu` npm package (dawn.node, Node-API; loads in Deno and Node): loads it
 * once with the event pump installed, and finds an adapter without help from the environment.
 *
 * Dawn on Linux only knows Vulkan, and on a machine without a GPU the Vulkan loader's default
 * drivers give it nothing usable: Mesa's lavapipe is rejected (with a warning on stderr) and the
 * hardware drivers Mesa installs find no device. So, unless the user chose drivers with
 * VK_DRIVER_FILES or VK_ICD_FILENAMES:
 *  1. hardware: the default drivers with lavapipe hidden (VK_LOADER_DRIVERS_DISABLE), skipped
 *     when the caller already knows there is no hardware GPU (the loader then complains too);
 *  2. software: SwiftShader's driver where Chromium or Chrome installed it (driver_env.ts).
 * The variables are set only while Dawn creates its Vulkan instance.
 */
import { installDawnEventPump } from "./dawn_event_pump.ts";
import { chosenVulkanDrivers, findSwiftShaderIcd, withEnv } from "./driver_env.ts";
import process from "node:process";

export interface DawnAdapter {
  adapter: GPUAdapter;
  /** The SwiftShader manifest the engine found and used; null when Vulkan chose by itself. */
  swiftShaderIcd: string | null;
}

/** Manifest name globs of drivers Dawn rejects: Mesa's lavapipe (lvp_icd.<arch>.json). */
const REJECTED_DRIVERS = "*lvp_icd*";

let module: { create: (flags: string[]) => unknown } | null = null;
/**
 * One Dawn instance per driver choice, made once and kept for the process (its adapters and
 * devices use it): a Vulkan instance reads the driver variables only when it is created.
 */
const instances = new Map<string, GPU>();

async function loadDawn(): Promise<NonNullable<typeof module>> {
  if (module) return module;
  const mod = await import("webgpu");
  // Before dawn.node's first tick: its own busy poll stalls Deno for seconds (see the pump).
  installDawnEventPump(mod.globals as Record<string, unknown>);
  // Under Node the WebGPU constants (GPUBufferUsage, ...) are not global yet.
  for (const [name, value] of Object.entries(mod.globals)) {
    if (!(name in globalThis)) (globalThis as Record<string, unknown>)[name] = value;
  }
  module = mod;
  return mod;
}

async function request(drivers: string, env: Record<string, string> = {}) {
  let gpu = instances.get(drivers);
  if (!gpu) {
    const dawn = await loadDawn();
    gpu = await withEnv(env, () => Promise.resolve(dawn.create([]) as GPU));
    instances.set(drivers, gpu);
  }
  // Dawn creates its Vulkan instance when first asked for an adapter.
  return await withEnv(env, () => gpu.requestAdapter({ powerPreference: "high-performance" }));
}

/**
 * A Dawn adapter, hardware first. `noHardware` says (when asked, only if it matters) whether the
 * caller knows there is no hardware GPU, e.g. because Deno's WebGPU saw only a software adapter:
 * then this goes straight to SwiftShader.
 */
export async function requestDawnAdapter(
  noHardware: () => Promise<boolean> = () => Promise.resolve(false),
): Promise<DawnAdapter | null> {
  const chosen = chosenVulkanDrivers();
  if (chosen) {
    const adapter = await request(`chosen:${chosen}`);
    return adapter && { adapter, swiftShaderIcd: null };
  }
  if (!(await noHardware())) {
    const disabled = [process.env.VK_LOADER_DRIVERS_DISABLE, REJECTED_DRIVERS].filter(Boolean);
    const adapter = await request("hardware", { VK_LOADER_DRIVERS_DISABLE: disabled.join(",") });
    if (adapter) return { adapter, swiftShaderIcd: null };
  }
  const icd = findSwiftShaderIcd();
  if (!icd) return null;
  const adapter = await request(`swiftshader:${icd}`, { VK_ICD_FILENAMES: icd });
  return adapter && { adapter, swiftShaderIcd: icd };
}
