// grad_norm.wgsl: the sum of squares of one gradient tensor, one entry of the
// global gradient norm.
//   partials[params.index] = Σ_{i < params.count} grad[i]²
// Shapes: grad [count] f32 (one LoRA parameter's accumulated gradient), partials
// [numTensors] f32. WGSL has no float atomics, so each tensor gets its own
// dispatch and slot; the optimizer (optimizer.wgsl) sums the slots:
// norm = sqrt(Σ partials).
// Grid: one workgroup; threads stride over grad and reduce in workgroup memory.

struct Params {
  count: u32,
  index: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
  var sum = 0.0;
  for (var i = lid; i < params.count; i += WG) {
    let g = grad[i];
    sum += g * g;
  }
  partial[lid] = sum;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    partials[params.index] = partial[0];
  }
}
