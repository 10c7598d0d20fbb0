// rope.wgsl: Hugging Face "rotate_half" rotary embedding, in place, of HEADS heads stored
// contiguously in each row of a [rows, STRIDE] activation (training: one sequence, no paged KV).
//   For head h and pair i < HD/2, with j = OFFSET + h HD + i and p = startPosition + t:
//   (x[t, j], x[t, j + HD/2]) <- (a cos(p f_i) - b sin(p f_i), b cos(p f_i) + a sin(p f_i))
//   where (a, b) = (x[t, j], x[t, j + HD/2]) and f = invFreq. INVERSE rotates by -p f_i instead:
//   the backward of the rotation, applied to gradients.
// Shapes: x [rows, STRIDE] f32 (heads at columns [OFFSET, OFFSET + HEADS HD), other columns left
// alone); invFreq [HD/2] f32 in a uniform of 32 vec4s (rope_kv_write.ts createInvFreqUniform).
// Grid (ceil(HEADS HD/2 / WG), rows spread over y and z): one invocation per (row, head, pair).
//
// The angle and sin/cos are computed exactly as in rope_kv_write.wgsl (the functions below are
// copies of its reduceAngle, ropeAngle and sinCos), so the forward rotation equals the serving
// path's bit for bit; its header explains the exact angle reduction and the polynomials.

override HEADS: u32;
override HD: u32;
override STRIDE: u32;
override OFFSET: u32;
override INVERSE: bool;
override HALF: u32 = HD / 2u;

const WG: u32 = 64u;

struct Params {
  rows: u32,
  startPosition: u32,
}

// HD / 2 <= 128 frequencies, four per vec4 (uniform arrays have a 16-byte stride).
struct InvFreq {
  v: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<uniform> invFreq: InvFreq;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;

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

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.z * grid.y + wg.y;
  let item = wg.x * WG + lid;
  if (t >= params.rows || item >= HEADS * HALF) {
    return;
  }
  let head = item / HALF;
  let i = item % HALF;
  let index = t * STRIDE + OFFSET + head * HD + i;
  let a = x[index];
  let b = x[index + HALF];
  let sc = sinCos(ropeAngle(params.startPosition + t, invFreq.v[i / 4u][i % 4u]));
  // sin(-angle) = -sin(angle) exactly, so the inverse reuses the forward's angle and polynomials.
  let s = select(sc.x, -sc.x, INVERSE);
  let c = sc.y;
  x[index] = a * c - b * s;
  x[index + HALF] = b * c + a * s;
}
