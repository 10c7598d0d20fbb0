// residual_add.wgsl: adds a residual branch into the hidden state in place.
//   y[i] += x[i]   for i < n
// Shapes: x [n] f32, y [n] f32 (any [rows, D] tensor, flattened; y may not alias x).
// One thread per element; the workgroups form a 2-D grid (flattened) so n may
// exceed 65535 workgroups.

struct Params {
  n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = (wg.y * grid.x + wg.x) * WG + lid;
  if (i < params.n) {
    y[i] += x[i];
  }
}
