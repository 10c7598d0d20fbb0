// token_logprobs.wgsl: log-softmax + gather of target tokens for a chunk of logits rows, and its
// backward. A sequence's logits are processed in chunks of rows through one small logits buffer;
// row t of the chunk is row ROW0 + t of the sequence (ROW0 = params.rowOffset).
//   forward:  lse[ROW0 + t] = log sum_v exp(logits[t, v])
//             logp[ROW0 + t] = logits[t, targets[ROW0 + t]] - lse[ROW0 + t]
//   backward (in place):
//             logits[t, v] <- g (1[v == targets[ROW0 + t]] - exp(logits[t, v] - lse[ROW0 + t]))
//             with g = grad[params.gIndex], one scalar (dL / d sum_t logp, written by the loss
//             kernel): the gradient of g logp[ROW0 + t] with respect to logits[t, :].
// Shapes: logits [rows, V] f32 (finite values); targets u32 [*] (each < V);
// lse, logp, grad f32 [*].
// The two entry points bind different variables at the same binding numbers (logits read-only or
// read-write, lse written or read, logp or grad at binding 4): each pipeline sees only its own.
// Grids: forward, one workgroup per row (2-D grid over x and y, flattened), threads stride over V
// keeping an online (max, sum of exp(l - max)) pair, then merge the pairs across the workgroup;
// backward, one thread per logit, (ceil(V / WG), rows spread over y and z).

override V: u32;

struct Params {
  rows: u32,
  rowOffset: u32,
  gIndex: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
// forward
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> logp: array<f32>;
// backward
@group(0) @binding(1) var<storage, read_write> dLogits: array<f32>;
@group(0) @binding(3) var<storage, read> lseIn: array<f32>;
@group(0) @binding(4) var<storage, read> grad: array<f32>;

const WG: u32 = 256u;
// The lowest finite f32: the running max of a thread with no logits yet. Finite, so merging two
// threads that saw no logits (V < WG) computes 0 * exp(0), not 0 * exp(-inf - -inf) = NaN.
const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> partialMax: array<f32, WG>;
var<workgroup> partialSum: array<f32, WG>;

@compute @workgroup_size(WG)
fn forward(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.y * grid.x + wg.x;
  if (t >= params.rows) {
    return;
  }
  let base = t * V;
  // Online softmax: one pass over the row; sum is relative to the running max m.
  var m = LOWEST;
  var sum = 0.0;
  for (var v = lid; v < V; v += WG) {
    let l = logits[base + v];
    if (l > m) {
      sum = sum * exp(m - l) + 1.0;
      m = l;
    } else {
      sum += exp(l - m);
    }
  }
  partialMax[lid] = m;
  partialSum[lid] = sum;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      let m1 = partialMax[lid];
      let m2 = partialMax[lid + stride];
      let merged = max(m1, m2);
      partialSum[lid] =
        partialSum[lid] * exp(m1 - merged) + partialSum[lid + stride] * exp(m2 - merged);
      partialMax[lid] = merged;
    }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let row = params.rowOffset + t;
    let total = partialMax[0] + log(partialSum[0]);
    lse[row] = total;
    logp[row] = logits[base + targets[row]] - total;
  }
}

@compute @workgroup_size(WG)
fn backward(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let t = wg.z * grid.y + wg.y;
  let v = wg.x * WG + lid;
  if (t >= params.rows || v >= V) {
    return;
  }
  let row = params.rowOffset + t;
  let index = t * V + v;
  let onehot = select(0.0, 1.0, v == targets[row]);
  dLogits[index] = grad[params.gIndex] * (onehot - exp(dLogits[index] - lseIn[row]));
}
