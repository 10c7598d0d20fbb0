// matmul.wgsl: a linear layer for many rows (prefill), tiled in workgroup memory.
//   y[r, OUT_OFFSET + n] (= or +=) sum_k x[r, k] * W[n, k] (+ bias[n])   for r < rows, n < N
// Shapes: x [rows, K] f32; W [N, K] f32, or f16 packed two per u32 along K as
// [N, ceil(K/2)] u32 (WEIGHT_F16); bias [N] f32 (read only when HAS_BIAS); y [rows, OUT_STRIDE]
// f32. W is bound as u32 words in both cases (f32 weights are bitcast).
// A workgroup of 8 x 8 threads computes a 64 x 64 tile of y. Per step of BK
// along K it stages x[64, BK] and W[64, BK] in workgroup memory, k-major
// (loads coalesced along K, zero-filled past the edges); then each thread
// accumulates an 8 x 8 block in registers: rows 8*ty .. 8*ty+7, columns
// 4*tx .. 4*tx+3 and 32+4*tx .. 32+4*tx+3. A k step thus costs 16 loads for 64
// multiply-adds (software GPUs pay per load, per lane), and neighbouring
// threads read neighbouring vec4s of the W tile.
// Grid: x = ceil(N / 64) column tiles, y = ceil(rows / 64) row tiles.
// Shares its bindings with matvec.wgsl, so one bind group serves both.

override K: u32;
override N: u32;
override OUT_STRIDE: u32;
override OUT_OFFSET: u32;
override HAS_BIAS: bool;
override ACCUMULATE: bool;
override WEIGHT_F16: bool;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const TILE: u32 = 64u; // rows and columns of y per workgroup
// K step: even (f16 words hold pairs along K) and small, because Dawn on
// SwiftShader compiles a shader in time proportional to its workgroup memory.
const BK: u32 = 8u;
const THREADS: u32 = 64u;
const VEC_PER_K: u32 = 16u; // TILE / 4

// [BK][TILE] as vec4s: element (kk, m) is tile[kk * VEC_PER_K + m / 4][m % 4].
var<workgroup> xTile: array<vec4f, 128>;
var<workgroup> wTile: array<vec4f, 128>;

fn stageX(row0: u32, k0: u32, lid: u32) {
  let rows = params.rows;
  for (var i = lid; i < TILE * BK; i += THREADS) {
    let m = i / BK;
    let kk = i % BK;
    let r = row0 + m;
    let k = k0 + kk;
    var v = 0.0;
    if (r < rows && k < K) {
      v = x[r * K + k];
    }
    xTile[kk * VEC_PER_K + m / 4u][m % 4u] = v;
  }
}

fn stageW(col0: u32, k0: u32, lid: u32) {
  if (WEIGHT_F16) {
    // A row's padding half (odd K) is staged too, but the k loop below stops at K.
    let words = (K + 1u) / 2u;
    for (var i = lid; i < TILE * BK / 2u; i += THREADS) {
      let m = i / (BK / 2u);
      let pp = i % (BK / 2u);
      let n = col0 + m;
      let p = k0 / 2u + pp;
      var v = vec2f(0.0);
      if (n < N && p < words) {
        v = unpack2x16float(w[n * words + p]);
      }
      wTile[2u * pp * VEC_PER_K + m / 4u][m % 4u] = v.x;
      wTile[(2u * pp + 1u) * VEC_PER_K + m / 4u][m % 4u] = v.y;
    }
  } else {
    for (var i = lid; i < TILE * BK; i += THREADS) {
      let m = i / BK;
      let kk = i % BK;
      let n = col0 + m;
      let k = k0 + kk;
      var v = 0.0;
      if (n < N && k < K) {
        v = bitcast<f32>(w[n * K + k]);
      }
      wTile[kk * VEC_PER_K + m / 4u][m % 4u] = v;
    }
  }
}

// Writes row r of the thread's block: columns n0.. (left) and n0 + 32.. (right).
fn storeRow(r: u32, n0: u32, left: vec4f, right: vec4f) {
  if (r >= params.rows) {
    return;
  }
  for (var j = 0u; j < 8u; j++) {
    let n = n0 + j % 4u + 32u * (j / 4u);
    if (n < N) {
      var v = select(left[j % 4u], right[j % 4u], j >= 4u);
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

@compute @workgroup_size(8, 8)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(local_invocation_id) local: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let col0 = wg.x * TILE;
  let row0 = wg.y * TILE;
  if (row0 >= params.rows) {
    return;
  }
  // acc{i}l, acc{i}r: row 8*ty + i, columns 4*tx.. and 32 + 4*tx.. Named variables,
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
  for (var k0 = 0u; k0 < K; k0 += BK) {
    stageX(row0, k0, lid);
    stageW(col0, k0, lid);
    workgroupBarrier();
    for (var kk = 0u; kk < min(BK, K - k0); kk++) {
      let xa = xTile[kk * VEC_PER_K + 2u * local.y]; // rows 8*ty .. 8*ty+3
      let xb = xTile[kk * VEC_PER_K + 2u * local.y + 1u]; // rows 8*ty+4 .. 8*ty+7
      let wl = wTile[kk * VEC_PER_K + local.x];
      let wr = wTile[kk * VEC_PER_K + 8u + local.x];
      acc0l += xa.x * wl;
      acc0r += xa.x * wr;
      acc1l += xa.y * wl;
      acc1r += xa.y * wr;
      acc2l += xa.z * wl;
      acc2r += xa.z * wr;
      acc3l += xa.w * wl;
      acc3r += xa.w * wr;
      acc4l += xb.x * wl;
      acc4r += xb.x * wr;
      acc5l += xb.y * wl;
      acc5r += xb.y * wr;
      acc6l += xb.z * wl;
      acc6r += xb.z * wr;
      acc7l += xb.w * wl;
      acc7r += xb.w * wr;
    }
    workgroupBarrier();
  }
  let r0 = row0 + 8u * local.y;
  let n0 = col0 + 4u * local.x;
  storeRow(r0 + 0u, n0, acc0l, acc0r);
  storeRow(r0 + 1u, n0, acc1l, acc1r);
  storeRow(r0 + 2u, n0, acc2l, acc2r);
  storeRow(r0 + 3u, n0, acc3l, acc3r);
  storeRow(r0 + 4u, n0, acc4l, acc4r);
  storeRow(r0 + 5u, n0, acc5l, acc5r);
  storeRow(r0 + 6u, n0, acc6l, acc6r);
  storeRow(r0 + 7u, n0, acc7l, acc7r);
}
