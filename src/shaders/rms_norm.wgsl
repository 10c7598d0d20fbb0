// rms_norm.wgsl: RMSNorm of each row, scaled by a learned weight.
//   y[t, i] = x[t, i] / sqrt(mean_j(x[t, j]^2) + EPS) * weight[i]
// Shapes: x [rows, D] f32, weight [D] f32, y [rows, D] f32 (y may not alias x).
// One workgroup per row; threads stride over D and reduce the sum of squares.

override D: u32;
override EPS: f32;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let row = wg.x;
  if (row >= params.rows) {
    return;
  }
  let base = row * D;
  var sum = 0.0;
  for (var i = lid; i < D; i += WG) {
    let v = x[base + i];
    sum += v * v;
  }
  partial[lid] = sum;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  let scale = inverseSqrt(partial[0] / f32(D) + EPS);
  for (var i = lid; i < D; i += WG) {
    y[base + i] = x[base + i] * scale * weight[i];
  }
}
