// embedding.wgsl: token embedding gather from one row chunk of the table.
//   out[t, :] = E[ids[t] - rowStart, :]
//     for t < tokens with rowStart <= ids[t] < rowStart + chunkRows
// Other tokens' rows are left untouched, so a vocabulary split into chunks (each
// chunk one binding) is gathered by one dispatch per chunk, and ids past the
// vocabulary are never read.
// Shapes: ids [tokens] u32; E [chunkRows, D] f32, or f16 packed two per u32 along D
// as [chunkRows, ceil(D/2)] u32 (WEIGHT_F16) — bound as u32 words in both cases;
// out [tokens, D] f32. One thread per pair of elements of out; the workgroups
// form a 2-D grid (flattened) so tokens * D / 2 may exceed 65535 workgroups.

override D: u32;
override WEIGHT_F16: bool;

struct Params {
  tokens: u32,
  rowStart: u32,
  chunkRows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let pairs = (D + 1u) / 2u;
  let index = (wg.y * grid.x + wg.x) * WG + lid;
  if (index >= params.tokens * pairs) {
    return;
  }
  let t = index / pairs;
  let p = index - t * pairs;
  // Unsigned: ids below rowStart wrap to large values and fail the test too.
  let row = ids[t] - params.rowStart;
  if (row >= params.chunkRows) {
    return;
  }
  let hasSecond = 2u * p + 1u < D;
  let o = t * D + 2u * p;
  if (WEIGHT_F16) {
    let v = unpack2x16float(table[row * pairs + p]);
    out[o] = v.x;
    if (hasSecond) {
      out[o + 1u] = v.y;
    }
  } else {
    let i = row * D + 2u * p;
    out[o] = bitcast<f32>(table[i]);
    if (hasSecond) {
      out[o + 1u] = bitcast<f32>(table[i + 1u]);
    }
  }
}
