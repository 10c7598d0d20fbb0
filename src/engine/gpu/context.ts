/**
 * GPU context: one adapter + device, chosen by backend, with the features and
 * limits the engine adapts to. Three hosts share this code:
 *  - "wgpu":    Deno's built-in WebGPU (navigator.gpu in Deno),
 *  - "dawn":    Dawn through the `webgpu` npm package (Node-API, loads in Deno and Node),
 *  - "browser": the page's or worker's navigator.gpu.
 * "auto" prefers a hardware adapter and falls back to a software one with a one-line notice;
 * Dawn finds a driver without help (dawn_adapter.ts). How and why: docs/backends.md.
 */
import { GpuError, WebGPUNotAvailableError } from "../errors.ts";

export type BackendName = "auto" | "wgpu" | "dawn" | "browser";

export interface GpuFeatures {
  shaderF16: boolean;
  subgroups: boolean;
  timestampQuery: boolean;
}

export interface GpuContext {
  readonly device: GPUDevice;
  readonly backend: Exclude<BackendName, "auto">;
  readonly adapterDescription: string;
  readonly isSoftware: boolean;
  readonly features: GpuFeatures;
  readonly limits: {
    maxStorageBufferBindingSize: number;
    maxBufferSize: number;
    maxComputeWorkgroupStorageSize: number;
    maxStorageBuffersPerShaderStage: number;
    maxComputeWorkgroupsPerDimension: number;
    minUniformBufferOffsetAlignment: number;
    minStorageBufferOffsetAlignment: number;
  };
  /** Throws the first uncaptured GPU error seen so far (validation, OOM), if any. */
  throwIfFailed(): void;
  destroy(): void;
}

const SOFTWARE_PATTERN = /llvmpipe|lavapipe|swiftshader|software|warp/i;
const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";

function describe(adapter: GPUAdapter): string {
  const info = adapter.info;
  const parts = [info?.description, info?.vendor, info?.architecture, info?.device]
    .filter((s) => typeof s === "string" && s.length > 0);
  return parts.join(" / ") || "unknown adapter";
}

function isSoftwareAdapter(adapter: GPUAdapter): boolean {
  const info = adapter.info as GPUAdapterInfo & { isFallbackAdapter?: boolean };
  return info?.isFallbackAdapter === true || SOFTWARE_PATTERN.test(describe(adapter));
}

async function wgpuAdapter(): Promise<GPUAdapter | null> {
  const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
  if (!gpu) return null;
  return await gpu.requestAdapter({ powerPreference: "high-performance" });
}

const INSTALL_HINT =
  "On Debian run `bash scripts/setup.sh` as root (installs mesa-vulkan-drivers " +
  "and chromium, which provide the lavapipe and SwiftShader software Vulkan drivers), " +
  "or install your GPU's Vulkan driver.";

const HOST_NAMES: Record<Exclude<BackendName, "auto">, string> = {
  wgpu: "Deno's WebGPU",
  dawn: "Dawn",
  browser: "the browser's WebGPU",
};

/** The one line that says which software adapter a run uses, and why. */
export function softwareNotice(
  description: string,
  backend: Exclude<BackendName, "auto">,
  swiftShaderIcd: string | null = null,
): string {
  const name = /llvmpipe|lavapipe/i.test(description)
    ? "lavapipe (software Vulkan)"
    : /swiftshader/i.test(description)
    ? `SwiftShader (software Vulkan${swiftShaderIcd ? `, ${swiftShaderIcd}` : ""})`
    : description;
  return `mace: no hardware GPU found; using ${name} through ${HOST_NAMES[backend]} (slow)`;
}

interface Choice {
  adapter: GPUAdapter;
  backend: Exclude<BackendName, "auto">;
  /** A line for the user when the run is on a software adapter it did not ask for by name. */
  notice: string | null;
}

async function dawnChoice(
  noHardware: () => Promise<boolean>,
  quietSoftware: boolean,
): Promise<Choice | null> {
  let found;
  try {
    const { requestDawnAdapter } = await import("./dawn_adapter.ts");
    found = await requestDawnAdapter(noHardware);
  } catch (e) {
    throw new WebGPUNotAvailableError(
      `the "webgpu" package (Dawn) failed to load: ${(e as Error).message}. Run \`npm ci\`.`,
    );
  }
  if (!found) return null;
  const { adapter, swiftShaderIcd } = found;
  const software = isSoftwareAdapter(adapter) && (!quietSoftware || swiftShaderIcd !== null);
  const notice = software ? softwareNotice(describe(adapter), "dawn", swiftShaderIcd) : null;
  return { adapter, backend: "dawn", notice };
}

async function pickAdapter(backend: BackendName): Promise<Choice> {
  // Before any Vulkan driver loads: Mesa's warnings about it are noise.
  if (isDeno) (await import("./driver_env.ts")).ensureRuntimeDir();
  const host = isDeno ? "wgpu" : "browser";
  if (backend === "wgpu" || backend === "browser") {
    const adapter = await wgpuAdapter();
    if (!adapter) {
      throw new WebGPUNotAvailableError(
        `navigator.gpu gave no adapter for backend "${backend}". ${INSTALL_HINT}`,
      );
    }
    return { adapter, backend: host, notice: null };
  }
  if (backend === "dawn") {
    // Deno's WebGPU sees the same Vulkan drivers, quietly: if all it has is a software adapter,
    // there is no hardware GPU, and asking Dawn for one would only print the loader's complaints.
    const noHardware = async () => {
      const probe = isDeno ? await wgpuAdapter().catch(() => null) : null;
      return probe !== null && isSoftwareAdapter(probe);
    };
    const choice = await dawnChoice(noHardware, true);
    if (!choice) {
      throw new WebGPUNotAvailableError(
        `Dawn found no Vulkan adapter. ${INSTALL_HINT} To pick a driver yourself set ` +
          "VK_ICD_FILENAMES to its manifest.",
      );
    }
    return choice;
  }
  // auto: a hardware adapter (Deno's WebGPU, else Dawn), else a software one, with one line.
  const fromWgpu = await wgpuAdapter().catch(() => null);
  if (fromWgpu && !isSoftwareAdapter(fromWgpu)) {
    return { adapter: fromWgpu, backend: host, notice: null };
  }
  // Deno's WebGPU found only a software adapter: there is no hardware GPU for Dawn either.
  const fromDawn = isDeno && !fromWgpu
    ? await dawnChoice(() => Promise.resolve(false), false).catch(() => null)
    : null;
  if (fromDawn) return fromDawn;
  if (!fromWgpu) throw new WebGPUNotAvailableError(`no WebGPU adapter found. ${INSTALL_HINT}`);
  return { adapter: fromWgpu, backend: host, notice: softwareNotice(describe(fromWgpu), host) };
}

export async function createGpuContext(
  options: { backend?: BackendName } = {},
): Promise<GpuContext> {
  const { adapter, backend, notice } = await pickAdapter(options.backend ?? "auto");
  if (notice) console.warn(notice);
  const wanted: GPUFeatureName[] = ["shader-f16", "timestamp-query", "subgroups" as GPUFeatureName];
  const requiredFeatures = wanted.filter((f) => adapter.features.has(f));
  const a = adapter.limits;
  const device = await adapter.requestDevice({
    requiredFeatures,
    requiredLimits: {
      maxStorageBufferBindingSize: a.maxStorageBufferBindingSize,
      maxBufferSize: a.maxBufferSize,
      maxComputeWorkgroupStorageSize: a.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: a.maxStorageBuffersPerShaderStage,
      maxComputeInvocationsPerWorkgroup: a.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupSizeX: a.maxComputeWorkgroupSizeX,
    },
  });
  let firstError: string | null = null;
  device.addEventListener("uncapturederror", (event) => {
    const message = (event as GPUUncapturedErrorEvent).error.message;
    if (firstError === null) firstError = message;
    console.error(`mace: GPU error: ${message}`);
  });
  const d = device.limits;
  return {
    device,
    backend,
    adapterDescription: describe(adapter),
    isSoftware: isSoftwareAdapter(adapter),
    features: {
      shaderF16: device.features.has("shader-f16"),
      subgroups: device.features.has("subgroups" as GPUFeatureName),
      timestampQuery: device.features.has("timestamp-query"),
    },
    limits: {
      maxStorageBufferBindingSize: d.maxStorageBufferBindingSize,
      maxBufferSize: d.maxBufferSize,
      maxComputeWorkgroupStorageSize: d.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: d.maxStorageBuffersPerShaderStage,
      maxComputeWorkgroupsPerDimension: d.maxComputeWorkgroupsPerDimension,
      minUniformBufferOffsetAlignment: d.minUniformBufferOffsetAlignment,
      minStorageBufferOffsetAlignment: d.minStorageBufferOffsetAlignment,
    },
    throwIfFailed() {
      if (firstError !== null) throw new GpuError(firstError);
    },
    destroy() {
      device.destroy();
    },
  };
}
