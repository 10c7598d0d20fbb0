/**
 * safetensors reader and writer.
 *
 * Layout: 8-byte little-endian u64 N, N bytes of JSON header
 * ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}),
 * then the data; offsets are relative to the byte after the header.
 * The reader checks everything it can before any tensor is read, and reports
 * each problem as a ModelFormatError naming the file and tensor.
 */
import { ModelFormatError } from "../errors.ts";
import { type ByteSink, type ByteSource, fileByteSink, memoryByteSink } from "./byte_source.ts";
import {
  decodeToF32,
  DTYPE_BYTES,
  encodeFromF32,
  isWeightDtype,
  type WeightDtype,
} from "./dtype.ts";

/** One tensor's entry in a parsed header; offsets are absolute in the file. */
export interface TensorInfo {
  name: string;
  dtype: WeightDtype;
  shape: number[];
  /** Absolute byte offset of the first byte. */
  offset: number;
  byteLength: number;
  source: ByteSource;
}

export interface SafetensorsHeader {
  source: ByteSource;
  /** Byte offset of the data section (8 + header length). */
  dataStart: number;
  metadata: Record<string, string>;
  /** In file order (ascending offset). */
  tensors: TensorInfo[];
  byName: Map<string, TensorInfo>;
}

/** Larger headers are refused (the reference implementation's limit is 100 MB). */
const MAX_HEADER_BYTES = 100_000_000;

/** Reads and validates the header of a safetensors file. */
export async function readSafetensorsHeader(source: ByteSource): Promise<SafetensorsHeader> {
  const file = source.name;
  const fail = (detail: string, tensor?: string): never => {
    throw new ModelFormatError(file, detail, tensor);
  };
  if (source.size < 8) {
    fail(`file is ${source.size} bytes, too short for a safetensors header (truncated?)`);
  }
  const lenBytes = await source.read(0, 8);
  const headerLen64 = new DataView(lenBytes.buffer, lenBytes.byteOffset, 8).getBigUint64(0, true);
  if (headerLen64 > BigInt(source.size - 8)) {
    fail(
      `header length ${headerLen64} exceeds the file size ${source.size} bytes (truncated, or ` +
        `not a safetensors file)`,
    );
  }
  const headerLen = Number(headerLen64);
  if (headerLen > MAX_HEADER_BYTES) {
    fail(`header length ${headerLen} is larger than ${MAX_HEADER_BYTES} bytes`);
  }
  if (headerLen < 2) fail(`header length ${headerLen} is too small for a JSON object`);
  const dataStart = 8 + headerLen;
  const dataSize = source.size - dataStart;

  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(await source.read(8, headerLen));
  } catch (e) {
    if (e instanceof ModelFormatError) throw e;
    return fail("header is not valid UTF-8 (not a safetensors file?)");
  }
  let json: unknown;
  try {
    // Writers may pad the header with spaces (allowed) or NULs (tolerated).
    json = JSON.parse(text.replace(/\0+$/, ""));
  } catch (e) {
    return fail(`header is not valid JSON (${(e as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    fail("header must be a JSON object");
  }

  const metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(json as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof entry !== "object" || entry === null || Array.isArray(entry)) {
        fail("__metadata__ must be an object of strings");
      }
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== "string") fail(`__metadata__.${k} must be a string`);
        metadata[k] = v as string;
      }
      continue;
    }
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) {
      fail("header entry must be an object with dtype, shape, data_offsets", name);
    }
    const { dtype, shape, data_offsets: offsets } = entry as Record<string, unknown>;
    if (typeof dtype !== "string") fail("missing dtype", name);
    if (!isWeightDtype(dtype)) {
      fail(
        `unsupported dtype ${
          String(dtype)
        }; supported: F32, F16, BF16 (convert the weights, e.g. to F16)`,
        name,
      );
    }
    if (!Array.isArray(shape) || !shape.every((s) => Number.isSafeInteger(s) && s >= 0)) {
      fail(`shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`, name);
    }
    if (
      !Array.isArray(offsets) || offsets.length !== 2 ||
      !offsets.every((o) => Number.isSafeInteger(o) && o >= 0) || offsets[0] > offsets[1]
    ) {
      fail(
        `data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offsets)}`,
        name,
      );
    }
    const [begin, end] = offsets as [number, number];
    const dims = shape as number[];
    const expectedBytes = dims.reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype as WeightDtype];
    if (end - begin !== expectedBytes) {
      fail(
        `data_offsets [${begin}, ${end}] span ${
          end - begin
        } bytes but shape [${dims}] of ${dtype} needs ${expectedBytes}`,
        name,
      );
    }
    if (end > dataSize) {
      fail(
        `data_offsets [${begin}, ${end}] run past the end of the data (${dataSize} bytes after ` +
          `the header); ` +
          "the file is truncated or corrupt",
        name,
      );
    }
    tensors.push({
      name,
      dtype: dtype as WeightDtype,
      shape: dims,
      offset: dataStart + begin,
      byteLength: expectedBytes,
      source,
    });
  }
  tensors.sort((a, b) => a.offset - b.offset || a.byteLength - b.byteLength);
  for (let i = 1; i < tensors.length; i++) {
    const prev = tensors[i - 1];
    const cur = tensors[i];
    if (cur.offset < prev.offset + prev.byteLength && cur.byteLength > 0 && prev.byteLength > 0) {
      fail(
        `data_offsets overlap tensor ${prev.name} (bytes ${prev.offset - dataStart}..${
          prev.offset - dataStart + prev.byteLength
        })`,
        cur.name,
      );
    }
  }
  return { source, dataStart, metadata, tensors, byName: new Map(tensors.map((t) => [t.name, t])) };
}

/** Reads one tensor as float32 (F16/BF16 widened exactly). */
export async function readTensor(info: TensorInfo): Promise<Float32Array> {
  let bytes: Uint8Array;
  try {
    bytes = await info.source.read(info.offset, info.byteLength);
  } catch (e) {
    if (e instanceof ModelFormatError && !e.tensor) {
      throw new ModelFormatError(e.file, e.detail, info.name);
    }
    throw e;
  }
  return decodeToF32(bytes, info.dtype);
}

/**
 * A tensor to write: data as float32, stored as `dtype`; `data` may be produced lazily (one at a
 * time).
 */
export interface TensorToWrite {
  name: string;
  shape: number[];
  dtype: WeightDtype;
  data: Float32Array | (() => Float32Array | Promise<Float32Array>);
}

/**
 * Header bytes (length prefix + JSON padded with spaces to a multiple of 8) for tensors in the
 * given order.
 */
export function encodeSafetensorsHeader(
  tensors: { name: string; shape: number[]; dtype: WeightDtype }[],
  metadata?: Record<string, string>,
): { header: Uint8Array; dataSize: number } {
  const obj: Record<string, unknown> = {};
  let at = 0;
  for (const t of tensors) {
    if (t.name === "__metadata__" || t.name in obj) {
      throw new Error(`duplicate or reserved tensor name ${t.name}`);
    }
    const bytes = t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[t.dtype];
    obj[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [at, at + bytes] };
    at += bytes;
  }
  if (metadata) obj.__metadata__ = metadata; // last, as in the bundled stories260K file
  let json = new TextEncoder().encode(JSON.stringify(obj));
  const padded = Math.ceil(json.byteLength / 8) * 8;
  if (padded !== json.byteLength) {
    const p = new Uint8Array(padded).fill(0x20);
    p.set(json);
    json = p;
  }
  const header = new Uint8Array(8 + json.byteLength);
  new DataView(header.buffer).setBigUint64(0, BigInt(json.byteLength), true);
  header.set(json, 8);
  return { header, dataSize: at };
}

async function writeTo(
  sink: ByteSink,
  tensors: TensorToWrite[],
  metadata?: Record<string, string>,
) {
  try {
    const { header } = encodeSafetensorsHeader(tensors, metadata);
    await sink.write(header);
    for (const t of tensors) {
      const data = typeof t.data === "function" ? await t.data() : t.data;
      const n = t.shape.reduce((a, b) => a * b, 1);
      if (data.length !== n) {
        throw new Error(`tensor ${t.name}: ${data.length} values for shape [${t.shape}]`);
      }
      await sink.write(encodeFromF32(data, t.dtype));
    }
  } finally {
    await sink.close();
  }
}

/**
 * Writes a safetensors file, tensors in the given order (lazy data is produced and dropped one at a
 * time).
 */
export async function writeSafetensors(
  path: string,
  tensors: TensorToWrite[],
  metadata: Record<string, string> = { format: "pt" },
): Promise<void> {
  await writeTo(await fileByteSink(path), tensors, metadata);
}

/** The bytes of a safetensors file. */
export async function encodeSafetensors(
  tensors: TensorToWrite[],
  metadata: Record<string, string> = { format: "pt" },
): Promise<Uint8Array> {
  const sink = memoryByteSink();
  await writeTo(sink, tensors, metadata);
  return sink.bytes();
}
