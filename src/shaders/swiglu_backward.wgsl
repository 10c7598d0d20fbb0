// swiglu_backward.wgsl: gradient of the gated activation act = silu(g) * u (swiglu.wgsl).
//   s = sigmoid(g),  dgate = dAct u s (1 + g (1 - s)),  dup = dAct g s
//   g = gateUp[r, i], u = gateUp[r, I + i];  dGateUp[r, i] = dgate, dGateUp[r, I + i] = dup
// Shapes: gateUp [rows, 2I] f32 (gate in columns [0, I), up in [I, 2I)), dAct [rows, I] f32,
// dGateUp [rows, 2I] f32 (may not alias gateUp).
// Grid: one thread per element of dAct; the workgroups form a 2-D grid (flattened) so rows * I
// may exceed 65535 workgroups.

override I: u32;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gateUp: array<f32>;
@group(0) @binding(2) var<storage, read> dAct: array<f32>;
@group(0) @binding(3) var<storage, read_write> dGateUp: array<f32>;

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
  let gate = 2u * I * r + i;
  let g = gateUp[gate];
  let u = gateUp[gate + I];
  let d = dAct[index];
  // For g << 0, exp(-g) overflows to +inf and s = 0: both gradients vanish, their limits.
  let s = 1.0 / (1.0 + exp(-g));
  dGateUp[gate] = d * u * s * (1.0 + g * (1.0 - s));
  dGateUp[gate + I] = d * g * s;
}
