// lora_expand.wgsl: the second (up-projecting) half of a batched multi-adapter LoRA, added
// into the base projection's output.
//   y[t, Y_OFFSET + n] += scales[slot_t] * sum_j u[t, j] * B[slot_t, n, j]
//     for t < rows, n < N, slot_t = slots[t]; rows with slot_t = 0xFFFFFFFF are left untouched.
// Shapes: u [rows, R] f32 (lora_shrink's output); slots [rows] u32; B [numSlots, N, R] f32 (an
// adapter pool: PEFT lora_B of each resident adapter, columns past its own rank zero);
// scales [numSlots] f32 (alpha / rank); y [rows, Y_STRIDE] f32 (columns Y_OFFSET .. Y_OFFSET+N).
// A workgroup covers a block of RB = 4 rows and WG * NB = 256 consecutive columns; a thread
// owns NB = 4 columns WG apart (coalesced writes of y) in each row. When the block's rows share
// one adapter, each loaded B value serves all four rows; rows on different adapters load their
// own. Grid: ceil(rows / RB) * ceil(N / 256) workgroups, flattened over x and y.

override N: u32;
override R: u32;
override Y_STRIDE: u32;
override Y_OFFSET: u32;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> u: array<f32>;
@group(0) @binding(2) var<storage, read> slots: array<u32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> scales: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
const RB: u32 = 4u; // rows per workgroup
const NB: u32 = 4u; // columns per thread
const NO_ADAPTER: u32 = 0xFFFFFFFFu;

// The slot of row t; rows past the batch run on no adapter.
fn rowSlot(t: u32) -> u32 {
  if (t < params.rows) {
    return slots[t];
  }
  return NO_ADAPTER;
}

// u[t, j], or 0 for a row on no adapter.
fn uAt(slot: u32, t: u32, j: u32) -> f32 {
  if (slot == NO_ADAPTER) {
    return 0.0;
  }
  return u[t * R + j];
}

// B[slot, n + WG * i, j] for i = 0..3 (base = slot * N * R), 0 for columns past N.
fn b4(base: u32, n: u32, j: u32) -> vec4f {
  var w = vec4f(0.0);
  for (var i = 0u; i < NB; i++) {
    if (n + WG * i < N) {
      w[i] = b[base + (n + WG * i) * R + j];
    }
  }
  return w;
}

// u[t, j] * B[slot, columns, j] of one row on its own adapter.
fn rowTerm(slot: u32, t: u32, n: u32, j: u32) -> vec4f {
  if (slot == NO_ADAPTER) {
    return vec4f(0.0);
  }
  return u[t * R + j] * b4(slot * N * R, n, j);
}

// y[t, columns n + WG * i] += scales[slot] * acc[i] for a row on an adapter.
fn addRow(slot: u32, t: u32, n: u32, acc: vec4f) {
  if (slot == NO_ADAPTER) {
    return;
  }
  let v = acc * scales[slot];
  for (var i = 0u; i < NB; i++) {
    if (n + WG * i < N) {
      let yi = t * Y_STRIDE + Y_OFFSET + n + WG * i;
      y[yi] = y[yi] + v[i];
    }
  }
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let blocks = (N + WG * NB - 1u) / (WG * NB);
  let index = wg.y * grid.x + wg.x;
  if (index >= ((params.rows + RB - 1u) / RB) * blocks) {
    return;
  }
  let t0 = (index / blocks) * RB;
  let n = (index % blocks) * WG * NB + lid;
  let s0 = rowSlot(t0);
  let s1 = rowSlot(t0 + 1u);
  let s2 = rowSlot(t0 + 2u);
  let s3 = rowSlot(t0 + 3u);
  // The block's adapter: the first row's that has one; shared if no row has another.
  let from2 = select(s2, s3, s2 == NO_ADAPTER);
  let blockSlot = select(s0, select(s1, from2, s1 == NO_ADAPTER), s0 == NO_ADAPTER);
  if (blockSlot == NO_ADAPTER) {
    return;
  }
  let same = (s0 == blockSlot || s0 == NO_ADAPTER) && (s1 == blockSlot || s1 == NO_ADAPTER) &&
    (s2 == blockSlot || s2 == NO_ADAPTER) && (s3 == blockSlot || s3 == NO_ADAPTER);
  var acc0 = vec4f(0.0);
  var acc1 = vec4f(0.0);
  var acc2 = vec4f(0.0);
  var acc3 = vec4f(0.0);
  if (same) {
    let base = blockSlot * N * R;
    for (var j = 0u; j < R; j++) {
      let w = b4(base, n, j);
      acc0 += uAt(s0, t0, j) * w;
      acc1 += uAt(s1, t0 + 1u, j) * w;
      acc2 += uAt(s2, t0 + 2u, j) * w;
      acc3 += uAt(s3, t0 + 3u, j) * w;
    }
  } else {
    for (var j = 0u; j < R; j++) {
      acc0 += rowTerm(s0, t0, n, j);
      acc1 += rowTerm(s1, t0 + 1u, n, j);
      acc2 += rowTerm(s2, t0 + 2u, n, j);
      acc3 += rowTerm(s3, t0 + 3u, n, j);
    }
  }
  addRow(s0, t0, n, acc0);
  addRow(s1, t0 + 1u, n, acc1);
  addRow(s2, t0 + 2u, n, acc2);
  addRow(s3, t0 + 3u, n, acc3);
}
