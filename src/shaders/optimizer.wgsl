// optimizer.wgsl: in-place parameter updates from an accumulated gradient, with
// global-norm gradient clipping (torch.nn.utils.clip_grad_norm_ semantics).
//   norm = gradScale · sqrt(Σ_{j < numPartials} partials[j])   (L2 norm of the scaled gradient)
//   clip = (maxGradNorm > 0 && norm > maxGradNorm) ? maxGradNorm / (norm + 1e-6) : 1
//   gs   = g[i] · gradScale · clip
// Entry points, for i < count:
//   sgd:   p[i] −= lr · gs                               (no momentum, no weight decay)
//   adamw: torch.optim.AdamW at step t ≥ 1:
//          p[i] *= 1 − lr · weightDecay
//          m[i] = β1 m[i] + (1 − β1) gs;   v[i] = β2 v[i] + (1 − β2) gs²
//          p[i] −= lr · (m[i] / (1 − β1^t)) / (sqrt(v[i] / (1 − β2^t)) + eps)
// Shapes: partials [numPartials] f32 (Σ g² of every tensor, from grad_norm.wgsl);
// g, p, m, v [count] f32 (one parameter tensor and its AdamW moments).
// Grid: WG threads per workgroup, one element each, workgroups flattened from a 2-D
// grid (kernels/grid.ts). Each workgroup first reduces partials (a few hundred
// floats at most) in workgroup memory, so no extra dispatch is needed for the norm.

struct AdamWParams {
  count: u32,
  step: u32, // t, 1-based
  numPartials: u32,
  lr: f32,
  beta1: f32,
  beta2: f32,
  eps: f32,
  weightDecay: f32,
  gradScale: f32,
  maxGradNorm: f32, // <= 0: no clipping
}

struct SgdParams {
  count: u32,
  numPartials: u32,
  lr: f32,
  gradScale: f32,
  maxGradNorm: f32, // <= 0: no clipping
}

// Each entry point uses only one of the two uniforms, so they may share binding 0.
@group(0) @binding(0) var<uniform> adamwParams: AdamWParams;
@group(0) @binding(0) var<uniform> sgdParams: SgdParams;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> p: array<f32>;
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;
// (1 − β1^t, 1 − β2^t), computed once per workgroup.
var<workgroup> biasCorrection: vec2f;

// gradScale · clip, the factor applied to every gradient element. Must be called
// in uniform control flow (it has barriers); every workgroup sums partials in the
// same order, so all agree on the factor.
fn gradFactor(lid: u32, numPartials: u32, gradScale: f32, maxGradNorm: f32) -> f32 {
  var sum = 0.0;
  for (var j = lid; j < numPartials; j += WG) {
    sum += partials[j];
  }
  partial[lid] = sum;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  let norm = gradScale * sqrt(partial[0]);
  var clip = 1.0;
  if (maxGradNorm > 0.0 && norm > maxGradNorm) {
    clip = maxGradNorm / (norm + 1e-6);
  }
  return gradScale * clip;
}

// 1 − β^t to a few ulps. pow(β, t) is exp2(t·log2 β) with an absolute error bound
// on log2 near 1, which leaves 1 − β^t (e.g. 0.001 for β = 0.999, t = 1) with
// errors ~1e-4 relative on some GPUs. Instead binary exponentiation on a = 1 − β^k:
//   k → 2k:  a ← a · (2 − a)        k → k + 1:  a ← (1 − β) + β · a
// (1 − β is exact for β ≥ 0.5), which loses at most a few ulps per step: O(log t).
fn oneMinusPow(beta: f32, t: u32) -> f32 {
  let delta = 1.0 - beta;
  var a = 0.0;
  for (var k = i32(firstLeadingBit(t)); k >= 0; k--) {
    a = a * (2.0 - a);
    if (((t >> u32(k)) & 1u) == 1u) {
      a = delta + beta * a;
    }
  }
  return a;
}

fn elementIndex(wg: vec3u, groups: vec3u, lid: u32) -> u32 {
  return (wg.y * groups.x + wg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn adamw(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) groups: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let params = adamwParams;
  let factor = gradFactor(lid, params.numPartials, params.gradScale, params.maxGradNorm);
  let beta1 = params.beta1;
  let beta2 = params.beta2;
  if (lid == 0u) {
    biasCorrection = vec2f(oneMinusPow(beta1, params.step), oneMinusPow(beta2, params.step));
  }
  workgroupBarrier();
  let i = elementIndex(wg, groups, lid);
  if (i >= params.count) {
    return;
  }
  let lr = params.lr;
  let gs = g[i] * factor;
  let mi = beta1 * m[i] + (1.0 - beta1) * gs;
  let vi = beta2 * v[i] + (1.0 - beta2) * gs * gs;
  m[i] = mi;
  v[i] = vi;
  let c = biasCorrection;
  let decayed = p[i] * (1.0 - lr * params.weightDecay);
  p[i] = decayed - lr * (mi / c.x) / (sqrt(vi / c.y) + params.eps);
}

@compute @workgroup_size(WG)
fn sgd(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) groups: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let params = sgdParams;
  let factor = gradFactor(lid, params.numPartials, params.gradScale, params.maxGradNorm);
  let i = elementIndex(wg, groups, lid);
  if (i >= params.count) {
    return;
  }
  p[i] -= params.lr * g[i] * factor;
}
