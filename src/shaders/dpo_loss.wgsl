// dpo_loss.wgsl: the DPO loss head of one preference pair, and its gradient.
//   πw = Σ logp[0 .. chosenCount),  πl = Σ logp[chosenCount .. chosenCount + rejectedCount)
//   z  = β·((πw − refSums[0]) − (πl − refSums[1]))
//   out = [ loss = −log σ(z) = softplus(−z),
//           gradScale · dL/dπw = −gradScale·β·σ(−z),
//           gradScale · dL/dπl = +gradScale·β·σ(−z),
//           πw, πl, β(πw − refSums[0]), β(πl − refSums[1]), margin z ]
// Shapes: logp [chosenCount + rejectedCount] f32 (per-token policy log-probs, chosen
// tokens then rejected tokens), refSums [2] f32 (reference model's summed log-probs),
// out [8] f32. Run on the reference model's log-probs with refSums = 0, out[3..4] are
// the reference sums.
// Grid: one workgroup; threads stride over the tokens and reduce both sums at once.

struct Params {
  chosenCount: u32,
  rejectedCount: u32,
  beta: f32,
  gradScale: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logp: array<f32>;
@group(0) @binding(2) var<storage, read> refSums: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
// (chosen, rejected) partial sums per thread.
var<workgroup> partial: array<vec2f, WG>;

// log(1 + x) for x in [0, 1], accurate also for tiny x where 1 + x rounds
// (Goldberg's trick: the rounding of u = 1 + x cancels in x / (u − 1)).
fn log1p(x: f32) -> f32 {
  let u = 1.0 + x;
  if (u == 1.0) {
    return x;
  }
  return log(u) * x / (u - 1.0);
}

// log(1 + e^x) without overflow for large |x|.
fn softplus(x: f32) -> f32 {
  return max(x, 0.0) + log1p(exp(-abs(x)));
}

// 1 / (1 + e^-x); exp only ever sees a non-positive argument.
fn sigmoid(x: f32) -> f32 {
  let e = exp(-abs(x));
  if (x >= 0.0) {
    return 1.0 / (1.0 + e);
  }
  return e / (1.0 + e);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
  let chosenCount = params.chosenCount;
  let total = chosenCount + params.rejectedCount;
  var sums = vec2f(0.0);
  for (var i = lid; i < total; i += WG) {
    let v = logp[i];
    if (i < chosenCount) {
      sums.x += v;
    } else {
      sums.y += v;
    }
  }
  partial[lid] = sums;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      partial[lid] += partial[lid + stride];
    }
    workgroupBarrier();
  }
  if (lid != 0u) {
    return;
  }
  let policy = partial[0];
  let beta = params.beta;
  let chosenReward = beta * (policy.x - refSums[0]);
  let rejectedReward = beta * (policy.y - refSums[1]);
  let z = chosenReward - rejectedReward;
  // dL/dz = −σ(−z); dz/dπw = β, dz/dπl = −β.
  let g = params.gradScale * beta * sigmoid(-z);
  out[0] = softplus(-z);
  out[1] = -g;
  out[2] = g;
  out[3] = policy.x;
  out[4] = policy.y;
  out[5] = chosenReward;
  out[6] = rejectedReward;
  out[7] = z;
}
