/**
 * Where cost profiles live and how they are named and read. Pure TypeScript (no WebGPU), so the
 * simulator, the live engine and `mace profile` all agree on one naming scheme:
 *
 *   profiles/<device-slug>--<model>.json     e.g. profiles/lavapipe--stories260K.json
 *
 * The repository ships the profiles measured on its own machines; DEFAULT_PROFILE is the one for
 * the bundled model on Mesa's lavapipe (Deno's WebGPU on the software Vulkan driver).
 */
import { ProfileFormatError } from "../engine/errors.ts";
import { type CostProfile, validateProfile } from "./cost_model.ts";

/**
 * The folder of shipped profiles, resolved from this module so it works from any cwd: a file path
 * under Deno, a URL in a browser bundle (no node:url here, so the module bundles for the page).
 */
const PROFILES_URL = new URL("../../profiles/", import.meta.url);
export const PROFILES_DIR = PROFILES_URL.protocol === "file:"
  ? decodeURIComponent(PROFILES_URL.pathname)
  : PROFILES_URL.href;

/**
 * The bundled model's name (models/stories260K) and the device its shipped profile was measured on.
 */
export const BUNDLED_MODEL_NAME = "stories260K";
export const DEFAULT_DEVICE_SLUG = "lavapipe";

/** Path of the profile of `model` (a name, see modelName) measured on the device `deviceSlug`. */
export function profilePath(deviceSlug: string, model: string): string {
  return `${PROFILES_DIR}${deviceSlug}--${model}.json`;
}

/** The shipped profile of the bundled model (the simulator's and the live engine's default). */
export const DEFAULT_PROFILE = profilePath(DEFAULT_DEVICE_SLUG, BUNDLED_MODEL_NAME);

/**
 * A model's name from its path: the folder's or the file's basename without its extension
 * ("models/stories260K/" -> "stories260K", "ckpt/stories15M.bin" -> "stories15M").
 */
export function modelName(modelPath: string): string {
  const base = modelPath.replace(/[\\/]+$/, "").split(/[\\/]/).pop() ?? "";
  const name = base.replace(/\.(bin|safetensors|gguf|json)$/i, "");
  return slugPart(name) || "model";
}

/**
 * A short lowercase slug of a GPU adapter description: the software drivers get their familiar
 * names (Mesa's llvmpipe is the lavapipe Vulkan driver), any other adapter its first words.
 *   "llvmpipe (LLVM 15.0.6, 256 bits) / 65541 / 0"          -> "lavapipe"
 *   "SwiftShader driver 5.0.0 / google / swiftshader / ..."  -> "swiftshader"
 *   "NVIDIA GeForce RTX 4090 / nvidia / ..."                 -> "nvidia-geforce-rtx-4090"
 */
export function deviceSlug(adapterDescription: string): string {
  if (/llvmpipe|lavapipe/i.test(adapterDescription)) return "lavapipe";
  if (/swiftshader/i.test(adapterDescription)) return "swiftshader";
  const first = adapterDescription.split(" / ")[0].replace(/\(.*?\)/g, " ");
  return slugPart(first.toLowerCase()).slice(0, 40).replace(/-+$/, "") || "unknown-device";
}

/** Keeps letters, digits, dots and underscores; every other run of characters becomes "-". */
function slugPart(text: string): string {
  return text.replace(/[^A-Za-z0-9._]+/g, "-").replace(/^-+|-+$/g, "");
}

/**
 * No profile at the path: measure one on this device, or name an existing one. A kind of
 * ProfileFormatError (registered for the worker boundary), so it crosses it as one.
 */
export class ProfileNotFoundError extends ProfileFormatError {
  constructor(path: string) {
    super(
      path,
      `no cost profile here; measure one for this device and model with \`deno task mace profile ` +
        `--out ${path}\` (with the --model and --backend you serve with), or pass --profile FILE ` +
        `naming an existing one (the shipped ones are in ${PROFILES_DIR})`,
    );
  }
}

/**
 * Reads and validates a profile; ProfileNotFoundError when missing, ProfileFormatError when
 * malformed.
 */
export async function loadProfile(path: string): Promise<CostProfile> {
  const text = await readText(path);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ProfileFormatError(
      path,
      `not JSON (${
        (e as Error).message
      }); re-run \`deno task mace profile\` to write a valid profile`,
    );
  }
  return validateProfile(value, path);
}

/** Deno reads the file; a browser (no Deno) fetches the path as a URL relative to the page. */
async function readText(path: string): Promise<string> {
  if (typeof (globalThis as { Deno?: unknown }).Deno === "undefined") {
    const response = await fetch(path).catch(() => null);
    if (response?.status === 404) throw new ProfileNotFoundError(path);
    if (!response?.ok) {
      throw new ProfileFormatError(
        path,
        `cannot fetch it (${response?.status ?? "network error"})`,
      );
    }
    return await response.text();
  }
  try {
    return await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new ProfileNotFoundError(path);
    throw new ProfileFormatError(path, `cannot read it (${(e as Error).message})`);
  }
}
