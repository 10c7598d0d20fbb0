// lora_shrink.wgsl: the first (down-projecting) half of a batched multi-adapter LoRA.
//   u[t, j] = sum_k x[t, X_OFFSET + k] * A[slot_t, j, k]   for t < rows, j < R, slot_t = slots[t]
//   u[t, :] = 0 where slot_t = 0xFFFFFFFF (the token runs on no adapter)
// Shapes: x [rows, X_STRIDE] f32 (the projection's input in columns X_OFFSET .. X_OFFSET+K);
// slots [rows] u32; A [numSlots, R, K] f32 (an adapter pool: PEFT lora_A of each resident
// adapter, rows past the adapter's own rank zero); u [rows, R] f32.
// A workgroup computes a block of RB = 4 rows x JB = 8 outputs j. Its WG threads split K
// (coalesced reads of x and of A's rows), each keeping the block's 32 partial sums, then
// reduce them through workgroup memory. When the block's rows share one adapter (a prefill
// chunk, or a decode batch on one adapter) each loaded A value serves all four rows; rows on
// different adapters load their own. Grid: ceil(rows / RB) * ceil(R / JB) workgroups,
// flattened over x and y.

override K: u32;
override R: u32;
override X_STRIDE: u32;
override X_OFFSET: u32;

struct Params {
  rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> slots: array<u32>;
@group(0) @binding(3) var<storage, read> a: array<f32>;
@group(0) @binding(4) var<storage, read_write> u: array<f32>;

const WG: u32 = 64u;
const RB: u32 = 4u; // rows per workgroup
const JB: u32 = 8u; // outputs per workgroup: two vec4 accumulators per row
const NO_ADAPTER: u32 = 0xFFFFFFFFu;

// partial[i * WG + lid]: thread lid's sums of row i / 2, outputs 4 * (i % 2) .. +3 of the block.
var<workgroup> partial: array<vec4f, 512>; // 2 * RB * WG

// The slot of row t; rows past the batch run on no adapter.
fn rowSlot(t: u32) -> u32 {
  if (t < params.rows) {
    return slots[t];
  }
  return NO_ADAPTER;
}

// x[t, X_OFFSET + k], or 0 for a row on no adapter (so it adds nothing).
fn xAt(slot: u32, t: u32, k: u32) -> f32 {
  if (slot == NO_ADAPTER) {
    return 0.0;
  }
  return x[t * X_STRIDE + X_OFFSET + k];
}

// A[slot, j .. j+3, k] (base = slot * R * K), 0 for j past the pool's rank.
fn a4(base: u32, j: u32, k: u32) -> vec4f {
  var w = vec4f(0.0);
  for (var i = 0u; i < 4u; i++) {
    if (j + i < R) {
      w[i] = a[base + (j + i) * K + k];
    }
  }
  return w;
}

// The two vec4 terms x[t, k] * A[slot, j0 .. j0+7, k] of one row on its own adapter.
fn rowTerm(slot: u32, t: u32, j0: u32, k: u32) -> array<vec4f, 2> {
  if (slot == NO_ADAPTER) {
    return array<vec4f, 2>(vec4f(0.0), vec4f(0.0));
  }
  let xv = x[t * X_STRIDE + X_OFFSET + k];
  let base = slot * R * K;
  return array<vec4f, 2>(xv * a4(base, j0, k), xv * a4(base, j0 + 4u, k));
}

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let blocks = (R + JB - 1u) / JB;
  let index = wg.y * grid.x + wg.x;
  if (index >= ((params.rows + RB - 1u) / RB) * blocks) {
    return;
  }
  let t0 = (index / blocks) * RB;
  let j0 = (index % blocks) * JB;
  let s0 = rowSlot(t0);
  let s1 = rowSlot(t0 + 1u);
  let s2 = rowSlot(t0 + 2u);
  let s3 = rowSlot(t0 + 3u);
  // The block's adapter: the first row's that has one; shared if no row has another.
  let from2 = select(s2, s3, s2 == NO_ADAPTER);
  let blockSlot = select(s0, select(s1, from2, s1 == NO_ADAPTER), s0 == NO_ADAPTER);
  let same = (s0 == blockSlot || s0 == NO_ADAPTER) && (s1 == blockSlot || s1 == NO_ADAPTER) &&
    (s2 == blockSlot || s2 == NO_ADAPTER) && (s3 == blockSlot || s3 == NO_ADAPTER);
  // acc{r}l / acc{r}r: row t0 + r, outputs j0 .. j0+3 / j0+4 .. j0+7.
  var acc0l = vec4f(0.0);
  var acc0r = vec4f(0.0);
  var acc1l = vec4f(0.0);
  var acc1r = vec4f(0.0);
  var acc2l = vec4f(0.0);
  var acc2r = vec4f(0.0);
  var acc3l = vec4f(0.0);
  var acc3r = vec4f(0.0);
  if (same && blockSlot != NO_ADAPTER) {
    let base = blockSlot * R * K;
    for (var k = lid; k < K; k += WG) {
      let wl = a4(base, j0, k);
      let wr = a4(base, j0 + 4u, k);
      let x0 = xAt(s0, t0, k);
      let x1 = xAt(s1, t0 + 1u, k);
      let x2 = xAt(s2, t0 + 2u, k);
      let x3 = xAt(s3, t0 + 3u, k);
      acc0l += x0 * wl;
      acc0r += x0 * wr;
      acc1l += x1 * wl;
      acc1r += x1 * wr;
      acc2l += x2 * wl;
      acc2r += x2 * wr;
      acc3l += x3 * wl;
      acc3r += x3 * wr;
    }
  } else if (!same) {
    for (var k = lid; k < K; k += WG) {
      let r0 = rowTerm(s0, t0, j0, k);
      let r1 = rowTerm(s1, t0 + 1u, j0, k);
      let r2 = rowTerm(s2, t0 + 2u, j0, k);
      let r3 = rowTerm(s3, t0 + 3u, j0, k);
      acc0l += r0[0];
      acc0r += r0[1];
      acc1l += r1[0];
      acc1r += r1[1];
      acc2l += r2[0];
      acc2r += r2[1];
      acc3l += r3[0];
      acc3r += r3[1];
    }
  }
  partial[lid] = acc0l;
  partial[WG + lid] = acc0r;
  partial[2u * WG + lid] = acc1l;
  partial[3u * WG + lid] = acc1r;
  partial[4u * WG + lid] = acc2l;
  partial[5u * WG + lid] = acc2r;
  partial[6u * WG + lid] = acc3l;
  partial[7u * WG + lid] = acc3r;
  workgroupBarrier();
  for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      for (var i = 0u; i < 2u * RB; i++) {
        partial[i * WG + lid] += partial[i * WG + lid + stride];
      }
    }
    workgroupBarrier();
  }
  // Thread lid < RB * JB writes row t0 + lid / JB, output j0 + lid % JB (zeros without adapter).
  if (lid < RB * JB) {
    let t = t0 + lid / JB;
    let jj = lid % JB;
    if (t < params.rows && j0 + jj < R) {
      u[t * R + j0 + jj] = partial[((lid / JB) * 2u + jj / 4u) * WG][jj % 4u];
    }
  }
}
