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
// The angle and sin/cos come from rope_angle.wgsl, shared with rope_kv_write.wgsl, so the forward
// rotation equals the serving path's bit for bit; rope_kv_write.wgsl's header explains the exact
// angle reduction and the polynomials.

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

// reduceAngle, ropeAngle and sinCos come from rope_angle.wgsl, prepended by the wrapper.
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
