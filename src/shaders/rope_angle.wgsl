// rope_angle.wgsl: helpers shared by the rotary kernels (rope_kv_write.wgsl, rope.wgsl), which
// the wrappers prepend to their code: the angle p * f reduced exactly modulo 2π, and sin/cos by
// polynomials (SwiftShader's builtins err by ~2e-4). No bindings, no entry point.

// 2π = TWO_PI_1 + TWO_PI_2 + TWO_PI_3. The first two have 9 significant bits, so k * TWO_PI_1 and
// k * TWO_PI_2 are exact for |k| < 2^15 and the first two subtractions are exact.
const TWO_PI_1: f32 = 6.28125;
const TWO_PI_2: f32 = 0.001934051513671875;
const TWO_PI_3: f32 = 1.2556659146019e-6;
const INV_TWO_PI: f32 = 0.15915494309189535;

/** x - 2πk for the k that brings an exact x (|x| < 2^17) into about [-π, π]. */
fn reduceAngle(x: f32) -> f32 {
  let k = round(x * INV_TWO_PI);
  return ((x - k * TWO_PI_1) - k * TWO_PI_2) - k * TWO_PI_3;
}

/** p * f reduced to about [-π, π]. p and f are split into 12-bit halves so each partial product
 *  is exact in f32 (positions < 2^24; the reduction bounds the product p * f < 2^17). */
fn ropeAngle(p: u32, f: f32) -> f32 {
  let fHigh = bitcast<f32>(bitcast<u32>(f) & 0xfffff000u);
  let fLow = f - fHigh;
  let pHigh = f32(p & 0xfffff000u);
  let pLow = f32(p & 0xfffu);
  let sum = (reduceAngle(pHigh * fHigh) + reduceAngle(pHigh * fLow)) +
    (reduceAngle(pLow * fHigh) + reduceAngle(pLow * fLow));
  return reduceAngle(sum);
}

// π/2 = HALF_PI_1 + HALF_PI_2; n * HALF_PI_1 is exact for the quadrant counts |n| <= 2 used here.
const HALF_PI_1: f32 = 1.5703125;
const HALF_PI_2: f32 = 4.8382679489661923e-4;
const TWO_OVER_PI: f32 = 0.6366197723675814;

/** (sin x, cos x) for |x| <= about π: x = y + n π/2 with |y| <= π/4, then minimax polynomials
 *  in y (Cephes sinf/cosf coefficients, about 1 ulp) and a quadrant swap. */
fn sinCos(x: f32) -> vec2<f32> {
  let n = round(x * TWO_OVER_PI);
  let y = (x - n * HALF_PI_1) - n * HALF_PI_2;
  let z = y * y;
  let s = y + y * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
  let c = 1.0 - 0.5 * z +
    z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
  switch (i32(n) & 3) {
    case 0: { return vec2<f32>(s, c); }
    case 1: { return vec2<f32>(c, -s); }
    case 2: { return vec2<f32>(-s, -c); }
    default: { return vec2<f32>(-c, s); }
  }
}
