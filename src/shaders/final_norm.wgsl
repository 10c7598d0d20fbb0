// final_norm.wgsl: the model's final RMSNorm, applied only to the rows that need logits.
//   y[s, i] = x[r, i] / sqrt(mean_j(x[r, j]^2) + EPS) * weight[i],  r = rowIndex[s]
// Shapes: x [T, D] f32 (the step's hidden states, token-major), rowIndex [S] u32
// (each < T: usually the last token of each sequence), weight [D] f32, y [S, D] f32.
// Gathering here means the logits matmul that follows runs on S rows instead of T.
// One workgroup per output row; threads stride over D and reduce the sum of squares.

override D: u32;
override EPS: f32;

struct Params {
  rows: u32, // S
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> rowIndex: array<u32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let row = wg.x;
  if (row >= params.rows) {
    return;
  }
  let src = rowIndex[row] * D;
  let dst = row * D;
  var sum = 0.0;
  for (var i = lid; i < D; i += WG) {
    let v = x[src + i];
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
    y[dst + i] = x[src + i] * scale * weight[i];
  }
}
