import assert from "node:assert/strict";
import {
  bf16ToF32,
  bf16ToF32Array,
  f16ToF32,
  f16ToF32Array,
  f32ToBf16Array,
  f32ToBf16Bits,
  f32ToF16Array,
  f32ToF16Bits,
} from "../../src/engine/model/dtype.ts";

Deno.test("f16: every non-NaN bit pattern survives f16 -> f32 -> f16", () => {
  for (let b = 0; b < 65536; b++) {
    const v = f16ToF32(b);
    if (Number.isNaN(v)) {
      assert.ok(Number.isNaN(f16ToF32(f32ToF16Bits(v))), `NaN ${b.toString(16)}`);
      continue;
    }
    assert.equal(f32ToF16Bits(v), b, `bits ${b.toString(16)} value ${v}`);
  }
});

Deno.test("bf16: every non-NaN bit pattern survives bf16 -> f32 -> bf16", () => {
  for (let b = 0; b < 65536; b++) {
    const v = bf16ToF32(b);
    if (Number.isNaN(v)) {
      assert.ok(Number.isNaN(bf16ToF32(f32ToBf16Bits(v))));
      continue;
    }
    assert.equal(f32ToBf16Bits(v), b, `bits ${b.toString(16)} value ${v}`);
  }
});

Deno.test("f16: known values, round to nearest even, overflow, subnormals", () => {
  assert.equal(f32ToF16Bits(1), 0x3c00);
  assert.equal(f32ToF16Bits(-2), 0xc000);
  assert.equal(f32ToF16Bits(65504), 0x7bff);
  assert.equal(f32ToF16Bits(65520), 0x7c00); // halfway to the next step rounds up to Inf
  assert.equal(f32ToF16Bits(65519), 0x7bff);
  assert.equal(f32ToF16Bits(1e9), 0x7c00);
  assert.equal(f32ToF16Bits(-Infinity), 0xfc00);
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1).
  assert.equal(f32ToF16Bits(1 + 2 ** -11), 0x3c00);
  // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even): goes up.
  assert.equal(f32ToF16Bits(1 + 3 * 2 ** -11), 0x3c02);
  assert.equal(f32ToF16Bits(1 + 2 ** -11 + 2 ** -20), 0x3c01);
  // Subnormals: smallest 2^-24; half of it ties to even (0); a bit more rounds up.
  assert.equal(f32ToF16Bits(2 ** -24), 0x0001);
  assert.equal(f32ToF16Bits(2 ** -25), 0x0000);
  assert.equal(f32ToF16Bits(2 ** -25 * 1.0001), 0x0001);
  assert.equal(f32ToF16Bits(3 * 2 ** -25), 0x0002);
  assert.equal(f32ToF16Bits(-0), 0x8000);
  // Largest subnormal rounding up into the smallest normal.
  assert.equal(f32ToF16Bits(2 ** -14 - 2 ** -26), 0x0400);
  assert.equal(f16ToF32(0x0400), 2 ** -14);
  assert.equal(f16ToF32(0x7bff), 65504);
});

Deno.test("bf16: round to nearest even", () => {
  assert.equal(f32ToBf16Bits(1), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even.
  assert.equal(f32ToBf16Bits(1 + 2 ** -8), 0x3f80);
  assert.equal(f32ToBf16Bits(1 + 3 * 2 ** -8), 0x3f82);
  assert.equal(f32ToBf16Bits(1 + 2 ** -8 + 2 ** -16), 0x3f81);
  assert.equal(f32ToBf16Bits(3.4e38), 0x7f80); // rounds past the largest finite value
  assert.ok(Number.isNaN(bf16ToF32(f32ToBf16Bits(NaN))));
});

Deno.test("array conversions agree with the scalar ones", () => {
  const xs = new Float32Array(10007);
  for (let i = 0; i < xs.length; i++) xs[i] = Math.sin(i * 12.9898) * 10 ** ((i % 13) - 6);
  const h = f32ToF16Array(xs);
  const b = f32ToBf16Array(xs);
  const hBack = f16ToF32Array(h);
  const bBack = bf16ToF32Array(b);
  for (let i = 0; i < xs.length; i++) {
    assert.equal(h[i], f32ToF16Bits(xs[i]));
    assert.equal(b[i], f32ToBf16Bits(xs[i]));
    assert.equal(hBack[i], f16ToF32(h[i]));
    assert.equal(bBack[i], bf16ToF32(b[i]));
  }
});
