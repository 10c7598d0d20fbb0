// matvec.wgsl: a linear layer for few rows (decode), streaming W once per block of R rows.
//   y[r, OUT_OFFSET + n] (= or +=) sum_k x[r, k] * W[n, k] (+ bias[n])   for r < rows, n < N
// Shapes: x [rows, K] f32; W [N, K] f32, or f16 packed two per u32 along K as
// [N, ceil(K/2)] u32 (WEIGHT_F16); bias [N] f32 (read only when HAS_BIAS); y [rows, OUT_STRIDE]
// f32. W is bound as u32 words in both cases (f32 weights are bitcast).
// A thread owns 4 consecutive columns and R rows (R = 1, 4 or 8), so each loaded
// weight pair serves R rows and each loaded x pair serves 4 columns: loads, not
// arithmetic, are what this kernel pays for. TK threads split K for each group of
// 4 columns (reading consecutive pairs of W's rows, coalesced) and reduce through
// workgroup memory; the wrapper picks TK from K and N (TK = 1 needs no reduction).
// Grid: x, y: column groups of 4 * WG / TK (2-D so N may exceed 65535 workgroups);
// z: blocks of R rows. Shares its bindings with matmul.wgsl (one bind group serves both).

override K: u32;
override N: u32;
override OUT_STRIDE: u32;
override OUT_OFFSET: u32;
override HAS_BIAS: bool;
override ACCUMULATE: bool;
override WEIGHT_F16: bool;
override R: u32; // rows per workgroup: 1, 4 or 8
override TK: u32; // threads per column group: a power of two <= WG

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
// partial[t * groups + g]: thread t's sums for one row of column group g. Kept to
// one row (rows are reduced in turn) because Dawn on SwiftShader compiles a
// shader in time proportional to its workgroup memory.
var<workgroup> partial: array<vec4f, WG>;

// W[n, 2p] and W[n, 2p + 1] (2p + 1 < K).
fn weightPair(n: u32, p: u32) -> vec2f {
  if (WEIGHT_F16) {
    return unpack2x16float(w[n * ((K + 1u) / 2u) + p]);
  }
  let i = n * K + 2u * p;
  return vec2f(bitcast<f32>(w[i]), bitcast<f32>(w[i + 1u]));
}

// W[n, K - 1] for odd K (its pair has no second element).
fn weightLast(n: u32) -> f32 {
  if (WEIGHT_F16) {
    return unpack2x16float(w[n * ((K + 1u) / 2u) + K / 2u]).x;
  }
  return bitcast<f32>(w[n * K + K - 1u]);
}

fn xPair(r: u32, p: u32) -> vec2f {
  let i = r * K + 2u * p;
  return vec2f(x[i], x[i + 1u]);
}

// Sum of the four columns' weights times x, one lane per column.
fn dot4(w0: vec2f, w1: vec2f, w2: vec2f, w3: vec2f, xv: vec2f) -> vec4f {
  return vec4f(dot(w0, xv), dot(w1, xv), dot(w2, xv), dot(w3, xv));
}

fn store(r: u32, n0: u32, sums: vec4f) {
  if (r >= params.rows) {
    return;
  }
  for (var j = 0u; j < 4u; j++) {
    let n = n0 + j;
    if (n < N) {
      var v = sums[j];
      if (HAS_BIAS) {
        v += bias[n];
      }
      let yi = r * OUT_STRIDE + OUT_OFFSET + n;
      if (ACCUMULATE) {
        v += y[yi];
      }
      y[yi] = v;
    }
  }
}

// Sums the TK partial sums of each of the workgroup's column groups for row r
// and stores them. Called in uniform control flow (it has barriers).
fn reduceRow(lid: u32, colBase: u32, r: u32, acc: vec4f) {
  let groups = WG / TK;
  partial[(lid % TK) * groups + lid / TK] = acc;
  workgroupBarrier();
  if (lid < groups) {
    var sum = vec4f(0.0);
    for (var j = 0u; j < TK; j++) {
      sum += partial[j * groups + lid];
    }
    store(r, colBase + 4u * lid, sum);
  }
  workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let groups = WG / TK;
  let colBase = (wg.y * grid.x + wg.x) * groups * 4u;
  let rows = params.rows;
  let row0 = wg.z * R;
  if (colBase >= N || row0 >= rows) {
    return;
  }
  let g = lid / TK;
  let t = lid % TK;
  let n0 = colBase + 4u * g;
  // Out-of-range columns and rows read the last valid one; their sums are never stored.
  let c0 = min(n0, N - 1u);
  let c1 = min(n0 + 1u, N - 1u);
  let c2 = min(n0 + 2u, N - 1u);
  let c3 = min(n0 + 3u, N - 1u);
  let r0 = row0;
  let r1 = min(row0 + 1u, rows - 1u);
  let r2 = min(row0 + 2u, rows - 1u);
  let r3 = min(row0 + 3u, rows - 1u);
  let r4 = min(row0 + 4u, rows - 1u);
  let r5 = min(row0 + 5u, rows - 1u);
  let r6 = min(row0 + 6u, rows - 1u);
  let r7 = min(row0 + 7u, rows - 1u);
  var acc0 = vec4f(0.0);
  var acc1 = vec4f(0.0);
  var acc2 = vec4f(0.0);
  var acc3 = vec4f(0.0);
  var acc4 = vec4f(0.0);
  var acc5 = vec4f(0.0);
  var acc6 = vec4f(0.0);
  var acc7 = vec4f(0.0);
  for (var p = t; p < K / 2u; p += TK) {
    let w0 = weightPair(c0, p);
    let w1 = weightPair(c1, p);
    let w2 = weightPair(c2, p);
    let w3 = weightPair(c3, p);
    acc0 += dot4(w0, w1, w2, w3, xPair(r0, p));
    if (R > 1u) {
      acc1 += dot4(w0, w1, w2, w3, xPair(r1, p));
      acc2 += dot4(w0, w1, w2, w3, xPair(r2, p));
      acc3 += dot4(w0, w1, w2, w3, xPair(r3, p));
    }
    if (R > 4u) {
      acc4 += dot4(w0, w1, w2, w3, xPair(r4, p));
      acc5 += dot4(w0, w1, w2, w3, xPair(r5, p));
      acc6 += dot4(w0, w1, w2, w3, xPair(r6, p));
      acc7 += dot4(w0, w1, w2, w3, xPair(r7, p));
    }
  }
  if (K % 2u == 1u && t == 0u) {
    let wl = vec4f(weightLast(c0), weightLast(c1), weightLast(c2), weightLast(c3));
    acc0 += wl * x[r0 * K + K - 1u];
    if (R > 1u) {
      acc1 += wl * x[r1 * K + K - 1u];
      acc2 += wl * x[r2 * K + K - 1u];
      acc3 += wl * x[r3 * K + K - 1u];
    }
    if (R > 4u) {
      acc4 += wl * x[r4 * K + K - 1u];
      acc5 += wl * x[r5 * K + K - 1u];
      acc6 += wl * x[r6 * K + K - 1u];
      acc7 += wl * x[r7 * K + K - 1u];
    }
  }
  if (TK == 1u) {
    store(row0, n0, acc0);
    if (R > 1u) {
      store(row0 + 1u, n0, acc1);
      store(row0 + 2u, n0, acc2);
      store(row0 + 3u, n0, acc3);
    }
    if (R > 4u) {
      store(row0 + 4u, n0, acc4);
      store(row0 + 5u, n0, acc5);
      store(row0 + 6u, n0, acc6);
      store(row0 + 7u, n0, acc7);
    }
    return;
  }
  reduceRow(lid, colBase, row0, acc0);
  if (R > 1u) {
    reduceRow(lid, colBase, row0 + 1u, acc1);
    reduceRow(lid, colBase, row0 + 2u, acc2);
    reduceRow(lid, colBase, row0 + 3u, acc3);
  }
  if (R > 4u) {
    reduceRow(lid, colBase, row0 + 4u, acc4);
    reduceRow(lid, colBase, row0 + 5u, acc5);
    reduceRow(lid, colBase, row0 + 6u, acc6);
    reduceRow(lid, colBase, row0 + 7u, acc7);
  }
}
