/**
 * Random-access byte sources for model files, and the small file-system surface
 * the loaders need. Every Deno API the model loaders use lives in this file, so
 * the browser can supply fetch/File-backed versions of the same interfaces.
 */
import { ModelFormatError } from "../errors.ts";

/** A file (or blob) read by ranges; nothing keeps a whole-file copy. */
export interface ByteSource {
  /** Shown in error messages: a path or URL. */
  name: string;
  /** Size in bytes. */
  size: number;
  /**
   * Exactly `length` bytes at `offset`, in a fresh buffer the caller may keep; throws on a short
   * read.
   */
  read(offset: number, length: number): Promise<Uint8Array>;
}

function checkRange(name: string, size: number, offset: number, length: number) {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeError(`${name}: bad read range offset=${offset} length=${length}`);
  }
  if (offset + length > size) {
    throw new ModelFormatError(
      name,
      `unexpected end of file: needed bytes ${offset}..${
        offset + length
      } but the file has ${size} bytes (truncated download?)`,
    );
  }
}

/** A local file read with open + seek + read per request (no handle stays open). */
export async function fileByteSource(path: string): Promise<ByteSource> {
  let size: number;
  try {
    const info = await Deno.stat(path);
    if (!info.isFile) throw new ModelFormatError(path, "is not a file");
    size = info.size;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new ModelFormatError(path, "file not found");
    throw e;
  }
  return {
    name: path,
    size,
    async read(offset, length) {
      checkRange(path, size, offset, length);
      const out = new Uint8Array(length);
      using file = await Deno.open(path, { read: true });
      await file.seek(offset, Deno.SeekMode.Start);
      let filled = 0;
      while (filled < length) {
        const n = await file.read(out.subarray(filled));
        if (n === null) {
          throw new ModelFormatError(
            path,
            `unexpected end of file at byte ${offset + filled} (expected ${
              offset + length
            }); the file changed or is truncated`,
          );
        }
        filled += n;
      }
      return out;
    },
  };
}

/** Bytes already in memory (tests, uploads). */
export function bytesByteSource(name: string, bytes: Uint8Array): ByteSource {
  return {
    name,
    size: bytes.byteLength,
    read(offset, length) {
      checkRange(name, bytes.byteLength, offset, length);
      return Promise.resolve(bytes.slice(offset, offset + length));
    },
  };
}

/**
 * The files of one model folder, by name relative to it. The HF loader only
 * talks to this, so a browser can back it with fetch() or a FileList.
 */
export interface ModelFiles {
  /** The folder, for messages. */
  root: string;
  /** Path of a member, for messages and for handing to other loaders. */
  path(name: string): string;
  exists(name: string): Promise<boolean>;
  /** Whole text of a small file, or null when absent. */
  readText(name: string): Promise<string | null>;
  /** A byte source, or null when absent. */
  open(name: string): Promise<ByteSource | null>;
}

export function joinPath(dir: string, name: string): string {
  if (dir === "" || dir === ".") return name;
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

export function dirName(path: string): string {
  const i = path.replace(/\/+$/, "").lastIndexOf("/");
  if (i < 0) return ".";
  return i === 0 ? "/" : path.slice(0, i);
}

export function baseName(path: string): string {
  const trimmed = path.replace(/\/+$/, "");
  return trimmed.slice(trimmed.lastIndexOf("/") + 1);
}

/** A local folder. */
export function dirModelFiles(dir: string): ModelFiles {
  const path = (name: string) => joinPath(dir, name);
  return {
    root: dir,
    path,
    async exists(name) {
      return (await pathKind(path(name))) === "file";
    },
    async readText(name) {
      try {
        return await Deno.readTextFile(path(name));
      } catch (e) {
        if (e instanceof Deno.errors.NotFound) return null;
        throw e;
      }
    },
    async open(name) {
      if ((await pathKind(path(name))) !== "file") return null;
      return await fileByteSource(path(name));
    },
  };
}

/** "file", "dir" or null when nothing is there. */
export async function pathKind(path: string): Promise<"file" | "dir" | null> {
  try {
    const info = await Deno.stat(path);
    return info.isDirectory ? "dir" : info.isFile ? "file" : null;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotADirectory) return null;
    throw e;
  }
}

/** Sequential writer for one output file. */
export interface ByteSink {
  write(bytes: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** Creates (or truncates) a local file. */
export async function fileByteSink(path: string): Promise<ByteSink> {
  const file = await Deno.open(path, { write: true, create: true, truncate: true });
  return {
    async write(bytes) {
      let done = 0;
      while (done < bytes.byteLength) done += await file.write(bytes.subarray(done));
    },
    close() {
      file.close();
      return Promise.resolve();
    },
  };
}

/** Collects bytes in memory; `bytes()` concatenates them. */
export function memoryByteSink(): ByteSink & { bytes(): Uint8Array } {
  const parts: Uint8Array[] = [];
  return {
    write(bytes) {
      parts.push(bytes.slice());
      return Promise.resolve();
    },
    close: () => Promise.resolve(),
    bytes() {
      const total = parts.reduce((n, p) => n + p.byteLength, 0);
      const out = new Uint8Array(total);
      let at = 0;
      for (const p of parts) {
        out.set(p, at);
        at += p.byteLength;
      }
      return out;
    },
  };
}

export async function writeTextFile(path: string, text: string): Promise<void> {
  await Deno.writeTextFile(path, text);
}

export async function makeDir(path: string): Promise<void> {
  await Deno.mkdir(path, { recursive: true });
}

export async function readFileBytes(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new ModelFormatError(path, "file not found");
    throw e;
  }
}
