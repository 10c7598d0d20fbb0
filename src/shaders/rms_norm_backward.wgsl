// rms_norm_backward.wgsl: gradient of RMSNorm (rms_norm.wgsl) with respect to its input; the
// weight is frozen, so it gets no gradient.
//   y[t, i] = x[t, i] r w[i],   r = 1 / sqrt(mean_j x[t, j]^2 + EPS)
//   dx[t, i] (= or +=, ACCUMULATE) r w[i] dy[t, i] - x[t, i] r^3 (sum_j w[j] dy[t, j] x[t, j]) / D
// Shapes: x, dy, dx [rows, D] f32, weight [D] f32; dx may not alias x or dy. ACCUMULATE adds into
// dx, which then holds the residual stream's gradient.
// Grid: one workgroup per row (a 2-D grid, flattened, so rows may exceed 65535); threads stride
// over D and reduce the sum of squares and the weighted dot product together.

override D: u32;
override EPS: f32;
override ACCUMULATE: bool;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

const WG: u32 = 64u;
// (sum of x^2, sum of w dy x) partials.
var<workgroup> partial: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let row = wg.y * grid.x + wg.x;
  if (row >= params.rows) {
    return;
  }
  let base = row * D;
  var sums = vec2<f32>(0.0);
  for (var i = lid; i < D; i += WG) {
    let v = x[base + i];
    sums += vec2<f32>(v * v, weight[i] * dy[base + i] * v);
  }
  partial[lid] = sums;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  let r = inverseSqrt(partial[0].x / f32(D) + EPS);
  let c = r * r * r * partial[0].y / f32(D);
  for (var i = lid; i < D; i += WG) {
    let g = r * weight[i] * dy[base + i] - x[base + i] * c;
    if (ACCUMULATE) {
      dx[base + i] += g;
    } else {
      dx[base + i] = g;
    }
  }
}
