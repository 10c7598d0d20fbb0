/**
 * Published LoRA adapter versions ("name@N") resident in a ModelRunner: a request resolves a name
 * to its newest version when it is submitted and keeps that version to its end; an old version
 * is freed (runner slot and its prefix-cache blocks) once no request uses it.
 */
import type { ModelRunner } from "../engine/runner/model_runner.ts";
import type { LoraWeights } from "../engine/lora/lora.ts";
import { InvalidRequestError, UnknownAdapterError } from "../engine/errors.ts";
import type { BlockManager } from "../scheduler/block_manager.ts";

export interface AdapterVersion {
  id: string;
  name: string;
  version: number;
  /** Requests submitted on it and not settled yet. */
  users: number;
}

export class AdapterVersions {
  /** Adapter name -> its newest version number. */
  private readonly newestVersion = new Map<string, number>();
  /** Resident versioned ids. */
  private readonly versions = new Map<string, AdapterVersion>();

  constructor(private readonly runner: ModelRunner, private readonly blockManager: BlockManager) {}

  /**
   * Publishes a new version of `name` and returns its id ("name@N", N = 1, 2, ...). Older versions
   * no request uses are freed now, the others when their last request ends. LoraAdapterError
   * without an adapter pool or for an adapter that does not fit it; AdapterPoolFullError when
   * every slot holds a version in use.
   */
  publish(name: string, weights: LoraWeights): string {
    if (typeof name !== "string" || name.length === 0 || name.includes("@")) {
      throw new InvalidRequestError(`adapter name "${name}" must be non-empty and without "@"`);
    }
    // Validate before freeing anything, so a rejected adapter leaves the published ones in place.
    this.runner.adapterPool?.validate(weights);
    for (const [id, v] of this.versions) if (v.name === name && v.users === 0) this.unload(id);
    const version = (this.newestVersion.get(name) ?? 0) + 1;
    const id = `${name}@${version}`;
    this.runner.loadAdapter(id, weights);
    this.newestVersion.set(name, version);
    this.versions.set(id, { id, name, version, users: 0 });
    return id;
  }

  /** Every resident version: the newest of each name plus older ones still in use. */
  list(): (AdapterVersion & { newest: boolean })[] {
    return [...this.versions.values()].map((v) => ({
      ...v,
      newest: this.newestVersion.get(v.name) === v.version,
    }));
  }

  /** The newest version id of `name`, or null if none was published. */
  newest(name: string): string | null {
    const v = this.newestVersion.get(name);
    return v === undefined ? null : `${name}@${v}`;
  }

  /**
   * The versioned id `adapter` (a name or a resident versioned id) means now;
   * UnknownAdapterError if none.
   */
  resolve(adapter: string): string {
    if (this.versions.has(adapter)) return adapter;
    const newest = this.newest(adapter);
    if (newest !== null) return newest;
    throw new UnknownAdapterError(adapter, [...this.newestVersion.keys(), ...this.versions.keys()]);
  }

  /** A request starts using version `id` (resolved). */
  acquire(id: string): void {
    this.versions.get(id)!.users++;
  }

  /** A request on version `id` ended: a superseded version nobody uses is freed. */
  release(id: string): void {
    const v = this.versions.get(id)!;
    v.users--;
    if (v.users === 0 && id !== this.newest(v.name)) this.unload(id);
  }

  /** Frees a version's adapter slot and the prefix-cache blocks computed with it. */
  private unload(id: string): void {
    this.runner.unloadAdapter(id);
    this.blockManager.dropAdapter(id);
    this.versions.delete(id);
  }
}
