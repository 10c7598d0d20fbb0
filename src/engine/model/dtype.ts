/**
 * Conversions between float32 and the 16-bit float formats of weight files.
 *
 * F16 is IEEE binary16; BF16 is the top half of a float32. Narrowing rounds to
 * nearest, ties to even (what PyTorch's `.half()` / `.bfloat16()` do), so a
 * value written as F16/BF16 and read back equals the rounded value exactly.
 * Array versions are the fast paths the loaders use (tables, typed-array views);
 * they assume a little-endian host, as every WebGPU target is.
 */

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** binary16 bits -> number (exact). */
export function f16ToF32(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >>> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** bfloat16 bits -> number (exact). */
export function bf16ToF32(bits: number): number {
  u32Scratch[0] = (bits & 0xffff) << 16;
  return f32Scratch[0];
}

/** number -> binary16 bits; float32 first, then round to nearest even; overflow gives ±Inf. */
export function f32ToF16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0];
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  const mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Result is subnormal (or zero): value = m * 2^-24 with m = full significand >> shift.
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e; // 14..24
    let r = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (r & 1))) r++;
    return sign | r; // r may carry into 0x400, the smallest normal: still the right encoding
  }
  let r = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  // A carry into the exponent is correct, up to Inf.
  if (rem > 0x1000 || (rem === 0x1000 && (r & 1))) r++;
  return sign | r;
}

/** number -> bfloat16 bits; float32 first, then round to nearest even; NaN stays NaN. */
export function f32ToBf16Bits(x: number): number {
  f32Scratch[0] = x;
  const b = u32Scratch[0];
  if ((b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff)) return (b >>> 16) | 0x40;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

let f16Table: Float32Array | null = null;

/** F16 bits -> Float32Array, through a 64K-entry table. */
export function f16ToF32Array(src: Uint16Array): Float32Array {
  if (!f16Table) {
    f16Table = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) f16Table[i] = f16ToF32(i);
  }
  const table = f16Table;
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = table[src[i]];
  return out;
}

/** BF16 bits -> Float32Array (a shift per element). */
export function bf16ToF32Array(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
  return out;
}

/** Float32Array -> F16 bits, round to nearest even. */
export function f32ToF16Array(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = f32ToF16Bits(src[i]);
  return out;
}

/** Float32Array -> BF16 bits, round to nearest even. */
export function f32ToBf16Array(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  for (let i = 0; i < src.length; i++) {
    const b = bits[i];
    out[i] = (b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff)
      ? (b >>> 16) | 0x40
      : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** The weight dtypes mace reads and writes, with their sizes in bytes. */
export type WeightDtype = "F32" | "F16" | "BF16";
export const DTYPE_BYTES: Record<WeightDtype, number> = { F32: 4, F16: 2, BF16: 2 };

export function isWeightDtype(d: unknown): d is WeightDtype {
  return d === "F32" || d === "F16" || d === "BF16";
}

/** Raw little-endian bytes of one dtype -> Float32Array (copies; any alignment). */
export function decodeToF32(bytes: Uint8Array, dtype: WeightDtype): Float32Array {
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  if (dtype === "F32") {
    const view = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
    // A read of exactly this tensor owns its buffer: hand it over without copying.
    return aligned.byteOffset === 0 && aligned.buffer.byteLength === aligned.byteLength &&
        aligned.buffer instanceof ArrayBuffer
      ? view
      : view.slice();
  }
  const u16 = new Uint16Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 2);
  return dtype === "F16" ? f16ToF32Array(u16) : bf16ToF32Array(u16);
}

/** Float32Array -> little-endian bytes of one dtype. */
export function encodeFromF32(data: Float32Array, dtype: WeightDtype): Uint8Array {
  if (dtype === "F32") return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const u16 = dtype === "F16" ? f32ToF16Array(data) : f32ToBf16Array(data);
  return new Uint8Array(u16.buffer);
}
