// swiglu.wgsl: the gated activation of a Llama MLP.
//   h[r, i] = silu(g) * u = g / (1 + exp(-g)) * u,   g = gu[r, i], u = gu[r, I + i]
// Shapes: gu [rows, 2I] f32 (the fused gate/up projection: gate in columns [0, I),
// up in [I, 2I)); h [rows, I] f32. One thread per element of h; the workgroups
// form a 2-D grid (flattened) so rows * I may exceed 65535 workgroups.

override I: u32;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> h: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let index = (wg.y * grid.x + wg.x) * WG + lid;
  if (index >= params.rows * I) {
    return;
  }
  let r = index / I;
  let i = index - r * I;
  let g = gu[2u * I * r + i];
  let u = gu[2u * I * r + I + i];
  // For g << 0, exp(-g) overflows to +inf and the quotient is -0, the right limit.
  h[index] = g / (1.0 + exp(-g)) * u;
}
