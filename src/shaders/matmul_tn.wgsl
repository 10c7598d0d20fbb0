// matmul_tn.wgsl: a product reduced over rows (tokens), for weight gradients dW = dY^T X.
//   c[m, n] (= or +=) ALPHA * sum_{t < rows} p[t, P_OFFSET + m] * q[t, Q_OFFSET + n]
//     for m < M, n < N
// Shapes: p [rows, P_STRIDE] f32; q [rows, Q_STRIDE] f32; c [M, N] f32 row-major.
// Built for thin outputs (LoRA: dB [out, r] with N = r ~ 8, dA [r, in] with M = r): c is
// small and the sum over rows is long. A thread owns a block of 8 x 8 outputs
// (rows m0 .. m0+7, columns n0 .. n0+7), so a step of t costs 16 loads for 64
// multiply-adds (on lavapipe 8 x 8 blocks beat 8 x 4 by up to 1.6x at the LoRA shapes).
// TT threads of a workgroup split the t sum of one block (t = tt, tt + TT, ...) and
// reduce through workgroup memory; the wrapper picks TT (1 on software GPUs: each
// thread sums all rows alone, no reduction; up to 64 on hardware GPUs, to fill them).
// Grid: x, y: workgroups of 64 / TT blocks (2-D so the count may exceed 65535),
// independent of rows; rows = 0 leaves c unchanged (ACCUMULATE) or zero.

override M: u32;
override N: u32;
override P_STRIDE: u32;
override P_OFFSET: u32;
override Q_STRIDE: u32;
override Q_OFFSET: u32;
override ACCUMULATE: bool;
override ALPHA: f32;
override TT: u32; // threads per output block: a power of two <= WG

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> p: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const WG: u32 = 64u;
// Two vec4s per thread (columns n0.. and n0+4..): the TT partial sums of one row
// of each block, reduced a row at a time.
var<workgroup> partial: array<vec4f, 128>;

fn store(m: u32, n0: u32, sums: vec4f) {
  if (m >= M) {
    return;
  }
  for (var j = 0u; j < 4u; j++) {
    let n = n0 + j;
    if (n < N) {
      var v = ALPHA * sums[j];
      if (ACCUMULATE) {
        v += c[m * N + n];
      }
      c[m * N + n] = v;
    }
  }
}

// Sums the TT partial sums of output row m of each block (a tree over the block's
// TT consecutive threads) and stores them from the block's first thread.
// Called in uniform control flow (it has barriers).
fn reduceRow(lid: u32, m: u32, n0: u32, left: vec4f, right: vec4f) {
  let tt = lid % TT;
  partial[2u * lid] = left;
  partial[2u * lid + 1u] = right;
  workgroupBarrier();
  for (var s = TT / 2u; s > 0u; s /= 2u) {
    if (tt < s) {
      partial[2u * lid] += partial[2u * (lid + s)];
      partial[2u * lid + 1u] += partial[2u * (lid + s) + 1u];
    }
    workgroupBarrier();
  }
  if (tt == 0u) {
    store(m, n0, partial[2u * lid]);
    store(m, n0 + 4u, partial[2u * lid + 1u]);
  }
  workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let blocksPerGroup = WG / TT;
  let nBlocks = (N + 7u) / 8u;
  let firstBlock = (wg.y * grid.x + wg.x) * blocksPerGroup;
  if (firstBlock >= nBlocks * ((M + 7u) / 8u)) {
    return; // the whole workgroup is past the last block (2-D grid padding)
  }
  // The t slice varies fastest across threads, so neighbours read neighbouring rows of p, q.
  let block = firstBlock + lid / TT;
  let tt = lid % TT;
  let m0 = (block / nBlocks) * 8u;
  let n0 = (block % nBlocks) * 8u;
  // Out-of-range rows and columns (edge blocks, and blocks past the last) read the
  // last valid one; their sums are never stored.
  let pm0 = P_OFFSET + min(m0, M - 1u);
  let pm1 = P_OFFSET + min(m0 + 1u, M - 1u);
  let pm2 = P_OFFSET + min(m0 + 2u, M - 1u);
  let pm3 = P_OFFSET + min(m0 + 3u, M - 1u);
  let pm4 = P_OFFSET + min(m0 + 4u, M - 1u);
  let pm5 = P_OFFSET + min(m0 + 5u, M - 1u);
  let pm6 = P_OFFSET + min(m0 + 6u, M - 1u);
  let pm7 = P_OFFSET + min(m0 + 7u, M - 1u);
  let qn0 = Q_OFFSET + min(n0, N - 1u);
  let qn1 = Q_OFFSET + min(n0 + 1u, N - 1u);
  let qn2 = Q_OFFSET + min(n0 + 2u, N - 1u);
  let qn3 = Q_OFFSET + min(n0 + 3u, N - 1u);
  let qn4 = Q_OFFSET + min(n0 + 4u, N - 1u);
  let qn5 = Q_OFFSET + min(n0 + 5u, N - 1u);
  let qn6 = Q_OFFSET + min(n0 + 6u, N - 1u);
  let qn7 = Q_OFFSET + min(n0 + 7u, N - 1u);
  // acc{i}l, acc{i}r: output row m0 + i, columns n0.. and n0+4... Named variables,
  // not an array: a dynamically indexed array would live in memory, not registers.
  var acc0l = vec4f(0.0);
  var acc0r = vec4f(0.0);
  var acc1l = vec4f(0.0);
  var acc1r = vec4f(0.0);
  var acc2l = vec4f(0.0);
  var acc2r = vec4f(0.0);
  var acc3l = vec4f(0.0);
  var acc3r = vec4f(0.0);
  var acc4l = vec4f(0.0);
  var acc4r = vec4f(0.0);
  var acc5l = vec4f(0.0);
  var acc5r = vec4f(0.0);
  var acc6l = vec4f(0.0);
  var acc6r = vec4f(0.0);
  var acc7l = vec4f(0.0);
  var acc7r = vec4f(0.0);
  for (var t = tt; t < params.rows; t += TT) {
    let pt = t * P_STRIDE;
    let qt = t * Q_STRIDE;
    let ql = vec4f(q[qt + qn0], q[qt + qn1], q[qt + qn2], q[qt + qn3]);
    let qr = vec4f(q[qt + qn4], q[qt + qn5], q[qt + qn6], q[qt + qn7]);
    let p0 = p[pt + pm0];
    let p1 = p[pt + pm1];
    let p2 = p[pt + pm2];
    let p3 = p[pt + pm3];
    let p4 = p[pt + pm4];
    let p5 = p[pt + pm5];
    let p6 = p[pt + pm6];
    let p7 = p[pt + pm7];
    acc0l += p0 * ql;
    acc0r += p0 * qr;
    acc1l += p1 * ql;
    acc1r += p1 * qr;
    acc2l += p2 * ql;
    acc2r += p2 * qr;
    acc3l += p3 * ql;
    acc3r += p3 * qr;
    acc4l += p4 * ql;
    acc4r += p4 * qr;
    acc5l += p5 * ql;
    acc5r += p5 * qr;
    acc6l += p6 * ql;
    acc6r += p6 * qr;
    acc7l += p7 * ql;
    acc7r += p7 * qr;
  }
  // Reduced a row at a time from local arrays (indexed dynamically, so in memory,
  // but read only here): one copy of the reduction keeps the shader quick to compile.
  let left = array<vec4f, 8>(acc0l, acc1l, acc2l, acc3l, acc4l, acc5l, acc6l, acc7l);
  let right = array<vec4f, 8>(acc0r, acc1r, acc2r, acc3r, acc4r, acc5r, acc6r, acc7r);
  for (var i = 0u; i < 8u; i++) {
    if (TT == 1u) {
      store(m0 + i, n0, left[i]);
      store(m0 + i, n0 + 4u, right[i]);
    } else {
      reduceRow(lid, m0 + i, n0, left[i], right[i]);
    }
  }
}
