// matmul_nn.wgsl: x times a row-major W, for backpropagation through y = x W^T (dX = dY · W)
// and LoRA (G = dY · B, dX += scale · G · A).
//   y[r, Y_OFFSET + k] (= or +=) ALPHA * sum_{n < N} x[r, X_OFFSET + n] * W[n, k]
//     for r < rows, k < K
// Shapes: x [rows, X_STRIDE] f32; W [N, K] f32, or f16 packed two per u32 along K as
// [N, ceil(K/2)] u32 (WEIGHT_F16); y [rows, Y_STRIDE] f32 (may not alias x).
// W is bound as u32 words in both cases (f32 weights are bitcast).
// Two entry points behind one bind-group layout (the wrapper picks per call):
//  - main: many rows at K > 32 on hardware GPUs (dX = dY · W of a frozen weight).
//    A workgroup of 8 x 8 threads computes a 64 x 64 tile of y; per step of BN
//    along n it stages x[64, BN] and W[BN, 64] in workgroup memory, n-major (loads
//    coalesced along n for x and along k for W, zero-filled past the edges); each
//    thread then accumulates an 8 x 8 block in registers: rows 8*ty .. 8*ty+7,
//    columns 4*tx .. 4*tx+3 and 32+4*tx .. 32+4*tx+3 (16 loads per 64 multiply-adds).
//    Grid: x = ceil(K / 64) column tiles, y = ceil(rows / 64) row tiles.
//  - thin: K <= 32 (G = dY · B, K = LoRA rank) or few rows, where 64 x 64 tiles
//    would be mostly padding, and every shape on software GPUs (faster there).
//    A thread owns an 8 x 8 block of y (rows r0 .. r0+7, columns k0 .. k0+7),
//    16 loads per 64 multiply-adds straight from storage; TT threads of a
//    workgroup split the n sum of one block and reduce through workgroup memory
//    (the wrapper picks TT per call: the fewest that fill the device).
//    Grid: x, y: workgroups of 64 / TT blocks (2-D so the count may exceed 65535).

override N: u32;
override K: u32;
override X_STRIDE: u32;
override X_OFFSET: u32;
override Y_STRIDE: u32;
override Y_OFFSET: u32;
override WEIGHT_F16: bool;
override ACCUMULATE: bool;
override ALPHA: f32;
override TT: u32 = 1u; // thin: threads per block, a power of two <= THREADS

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const THREADS: u32 = 64u;
const TILE: u32 = 64u; // main: rows and columns of y per workgroup
// main: n step, small because Dawn on SwiftShader compiles a shader in time
// proportional to its workgroup memory.
const BN: u32 = 8u;
const VEC_PER_N: u32 = 16u; // TILE / 4

// main: [BN][TILE] as vec4s: element (nn, m) is tile[nn * VEC_PER_N + m / 4][m % 4].
var<workgroup> xTile: array<vec4f, 128>;
var<workgroup> wTile: array<vec4f, 128>;
// thin: two vec4s per thread (columns k0.. and k0+4..) for the TT-way reduction.
var<workgroup> partial: array<vec4f, 128>;

// u32 words per row of W.
fn wordsPerRow() -> u32 {
  if (WEIGHT_F16) {
    return (K + 1u) / 2u;
  }
  return K;
}

// y[r, Y_OFFSET + k0 + j] (= or +=) ALPHA * sums[j] for the columns j < 4 inside K.
fn store(r: u32, k0: u32, sums: vec4f) {
  if (r >= params.rows) {
    return;
  }
  for (var j = 0u; j < 4u; j++) {
    let k = k0 + j;
    if (k < K) {
      let yi = r * Y_STRIDE + Y_OFFSET + k;
      var v = ALPHA * sums[j];
      if (ACCUMULATE) {
        v += y[yi];
      }
      y[yi] = v;
    }
  }
}

fn stageX(row0: u32, n0: u32, lid: u32) {
  let rows = params.rows;
  for (var i = lid; i < TILE * BN; i += THREADS) {
    let m = i / BN;
    let nn = i % BN;
    let r = row0 + m;
    let n = n0 + nn;
    var v = 0.0;
    if (r < rows && n < N) {
      v = x[r * X_STRIDE + X_OFFSET + n];
    }
    xTile[nn * VEC_PER_N + m / 4u][m % 4u] = v;
  }
}

fn stageW(col0: u32, n0: u32, lid: u32) {
  let words = wordsPerRow();
  if (WEIGHT_F16) {
    // A word holds columns 2p, 2p + 1; an odd K's padding half is staged but never stored.
    for (var i = lid; i < BN * TILE / 2u; i += THREADS) {
      let nn = i / (TILE / 2u);
      let c = 2u * (i % (TILE / 2u));
      let n = n0 + nn;
      let word = (col0 + c) / 2u;
      var v = vec2f(0.0);
      if (n < N && word < words) {
        v = unpack2x16float(w[n * words + word]);
      }
      wTile[nn * VEC_PER_N + c / 4u][c % 4u] = v.x;
      wTile[nn * VEC_PER_N + c / 4u][c % 4u + 1u] = v.y;
    }
  } else {
    for (var i = lid; i < BN * TILE; i += THREADS) {
      let nn = i / TILE;
      let c = i % TILE;
      let n = n0 + nn;
      let k = col0 + c;
      var v = 0.0;
      if (n < N && k < K) {
        v = bitcast<f32>(w[n * words + k]);
      }
      wTile[nn * VEC_PER_N + c / 4u][c % 4u] = v;
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
  for (var n0 = 0u; n0 < N; n0 += BN) {
    stageX(row0, n0, lid);
    stageW(col0, n0, lid);
    workgroupBarrier();
    for (var nn = 0u; nn < min(BN, N - n0); nn++) {
      let xa = xTile[nn * VEC_PER_N + 2u * local.y]; // rows 8*ty .. 8*ty+3
      let xb = xTile[nn * VEC_PER_N + 2u * local.y + 1u]; // rows 8*ty+4 .. 8*ty+7
      let wl = wTile[nn * VEC_PER_N + local.x];
      let wr = wTile[nn * VEC_PER_N + 8u + local.x];
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
  let kl = col0 + 4u * local.x;
  let kr = kl + 32u;
  store(r0, kl, acc0l);
  store(r0, kr, acc0r);
  store(r0 + 1u, kl, acc1l);
  store(r0 + 1u, kr, acc1r);
  store(r0 + 2u, kl, acc2l);
  store(r0 + 2u, kr, acc2r);
  store(r0 + 3u, kl, acc3l);
  store(r0 + 3u, kr, acc3r);
  store(r0 + 4u, kl, acc4l);
  store(r0 + 4u, kr, acc4r);
  store(r0 + 5u, kl, acc5l);
  store(r0 + 5u, kr, acc5r);
  store(r0 + 6u, kl, acc6l);
  store(r0 + 6u, kr, acc6r);
  store(r0 + 7u, kl, acc7l);
  store(r0 + 7u, kr, acc7r);
}

// W[n, k0 .. k0+7] as two vec4s; columns past K (edge blocks) read clamped
// words or columns, whose sums are never stored.
fn weight8(n: u32, k0: u32) -> array<vec4f, 2> {
  let words = wordsPerRow();
  let row = n * words;
  if (WEIGHT_F16) {
    let p = k0 / 2u;
    let last = words - 1u;
    return array<vec4f, 2>(
      vec4f(unpack2x16float(w[row + p]), unpack2x16float(w[row + min(p + 1u, last)])),
      vec4f(
        unpack2x16float(w[row + min(p + 2u, last)]),
        unpack2x16float(w[row + min(p + 3u, last)]),
      ),
    );
  }
  let last = K - 1u;
  return array<vec4f, 2>(
    vec4f(
      bitcast<f32>(w[row + k0]),
      bitcast<f32>(w[row + min(k0 + 1u, last)]),
      bitcast<f32>(w[row + min(k0 + 2u, last)]),
      bitcast<f32>(w[row + min(k0 + 3u, last)]),
    ),
    vec4f(
      bitcast<f32>(w[row + min(k0 + 4u, last)]),
      bitcast<f32>(w[row + min(k0 + 5u, last)]),
      bitcast<f32>(w[row + min(k0 + 6u, last)]),
      bitcast<f32>(w[row + min(k0 + 7u, last)]),
    ),
  );
}

// Sums the TT partial sums of row r of each block (a tree over the block's TT
// consecutive threads) and stores them from the block's first thread.
// Called in uniform control flow (it has barriers).
fn reduceRow(lid: u32, r: u32, k0: u32, left: vec4f, right: vec4f) {
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
    store(r, k0, partial[2u * lid]);
    store(r, k0 + 4u, partial[2u * lid + 1u]);
  }
  workgroupBarrier();
}

@compute @workgroup_size(THREADS)
fn thin(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let rows = params.rows;
  let kBlocks = (K + 7u) / 8u;
  let firstBlock = (wg.y * grid.x + wg.x) * (THREADS / TT);
  if (firstBlock >= kBlocks * ((rows + 7u) / 8u)) {
    return; // the whole workgroup is past the last block (2-D grid padding)
  }
  // The n slice varies fastest across threads, so neighbours read neighbouring rows of W.
  let block = firstBlock + lid / TT;
  let tt = lid % TT;
  let r0 = (block / kBlocks) * 8u;
  let k0 = (block % kBlocks) * 8u;
  // Rows past the last (edge blocks, and blocks past the last) read the last row;
  // their sums are never stored.
  let x0 = min(r0, rows - 1u) * X_STRIDE + X_OFFSET;
  let x1 = min(r0 + 1u, rows - 1u) * X_STRIDE + X_OFFSET;
  let x2 = min(r0 + 2u, rows - 1u) * X_STRIDE + X_OFFSET;
  let x3 = min(r0 + 3u, rows - 1u) * X_STRIDE + X_OFFSET;
  let x4 = min(r0 + 4u, rows - 1u) * X_STRIDE + X_OFFSET;
  let x5 = min(r0 + 5u, rows - 1u) * X_STRIDE + X_OFFSET;
  let x6 = min(r0 + 6u, rows - 1u) * X_STRIDE + X_OFFSET;
  let x7 = min(r0 + 7u, rows - 1u) * X_STRIDE + X_OFFSET;
  // acc{i}l, acc{i}r: row r0 + i, columns k0.. and k0+4.. (registers, as in main).
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
  for (var n = tt; n < N; n += TT) {
    let wv = weight8(n, k0);
    let wl = wv[0];
    let wr = wv[1];
    let v0 = x[x0 + n];
    let v1 = x[x1 + n];
    let v2 = x[x2 + n];
    let v3 = x[x3 + n];
    let v4 = x[x4 + n];
    let v5 = x[x5 + n];
    let v6 = x[x6 + n];
    let v7 = x[x7 + n];
    acc0l += v0 * wl;
    acc0r += v0 * wr;
    acc1l += v1 * wl;
    acc1r += v1 * wr;
    acc2l += v2 * wl;
    acc2r += v2 * wr;
    acc3l += v3 * wl;
    acc3r += v3 * wr;
    acc4l += v4 * wl;
    acc4r += v4 * wr;
    acc5l += v5 * wl;
    acc5r += v5 * wr;
    acc6l += v6 * wl;
    acc6r += v6 * wr;
    acc7l += v7 * wl;
    acc7r += v7 * wr;
  }
  // Stored a row at a time from local arrays (indexed dynamically, so in memory,
  // but read only here): one copy of the reduction keeps the shader quick to compile.
  let left = array<vec4f, 8>(acc0l, acc1l, acc2l, acc3l, acc4l, acc5l, acc6l, acc7l);
  let right = array<vec4f, 8>(acc0r, acc1r, acc2r, acc3r, acc4r, acc5r, acc6r, acc7r);
  for (var i = 0u; i < 8u; i++) {
    if (TT == 1u) {
      store(r0 + i, k0, left[i]);
      store(r0 + i, k0 + 4u, right[i]);
    } else {
      reduceRow(lid, r0 + i, k0, left[i], right[i]);
    }
  }
}
