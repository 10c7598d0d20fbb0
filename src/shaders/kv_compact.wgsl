// kv_compact.wgsl: moves KV entries (and, separately, their attention mass) between physical
// slots of the paged pool, for KV pruning (compacting a sequence's kept slots).
// For each move i < params.count, (src, dst) = moves[i] (physical slots, slot = block * BS +
// offset; destinations distinct):
//   kCache[dst's block, g, dst's offset, :] = old kCache[src's block, g, src's offset, :]  g < HKV
//   vCache[...] likewise;   mass[dst] = old mass[src]   (mass entry points)
// Every move reads the contents from before the call, so chains (a -> b, b -> c) and swaps work:
// `gather` copies all sources to scratch, then a second dispatch `scatter` writes the
// destinations (dispatches in one pass are ordered). gatherMass/scatterMass do the same for mass.
// Shapes (f32 unless noted; caches and scratch read as vec4s: HD % 4 == 0):
// moves vec2<u32> [count]; kCache, vCache [numBlocks, HKV, BS, HD]; mass [numBlocks * BS];
// scratch [maxMoves, 2 (K, V), HKV, HD]; massScratch [maxMoves].
// Dispatch (1-D index flattened from a 2-D grid, workgroupGrid): gather and scatter one invocation
// per (move, K/V, kv head, vec4), count * 2 * HKV * HD/4 in all; gatherMass and scatterMass one
// per move. All four entry points share one bind-group layout; each uses only its bindings.

override HKV: u32;
override HD: u32;
override BS: u32;
override D4: u32 = HD / 4u;

const WG: u32 = 64u;

struct Params {
  count: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> moves: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> kCache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> vCache: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> mass: array<f32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> massScratch: array<f32>;

/** vec4 index of (physical slot, kv head g, vec4 0) in a pool [numBlocks, HKV, BS, HD]. */
fn slotBase(slot: u32, g: u32) -> u32 {
  return ((slot / BS * HKV + g) * BS + slot % BS) * D4;
}

struct Item {
  valid: bool,
  moveIndex: u32,
  isV: bool,
  head: u32,
  d: u32,
  // Index in scratch: ((moveIndex * 2 + isV) * HKV + head) * D4 + d.
  staged: u32,
}

fn itemOf(wg: vec3u, grid: vec3u, lid: u32) -> Item {
  let e = (wg.y * grid.x + wg.x) * WG + lid;
  let perMove = 2u * HKV * D4;
  let r = e % perMove;
  // Named first: `e < a, ..., r >= b` inside one call would parse as a template list.
  let valid = e < params.count * perMove;
  let isV = r >= HKV * D4;
  return Item(valid, e / perMove, isV, (r / D4) % HKV, r % D4, e);
}

@compute @workgroup_size(WG)
fn gather(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let item = itemOf(wg, grid, lid);
  if (!item.valid) {
    return;
  }
  let src = slotBase(moves[item.moveIndex].x, item.head) + item.d;
  if (item.isV) {
    scratch[item.staged] = vCache[src];
  } else {
    scratch[item.staged] = kCache[src];
  }
}

@compute @workgroup_size(WG)
fn scatter(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let item = itemOf(wg, grid, lid);
  if (!item.valid) {
    return;
  }
  let dst = slotBase(moves[item.moveIndex].y, item.head) + item.d;
  if (item.isV) {
    vCache[dst] = scratch[item.staged];
  } else {
    kCache[dst] = scratch[item.staged];
  }
}

@compute @workgroup_size(WG)
fn gatherMass(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = (wg.y * grid.x + wg.x) * WG + lid;
  if (i >= params.count) {
    return;
  }
  massScratch[i] = mass[moves[i].x];
}

@compute @workgroup_size(WG)
fn scatterMass(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let i = (wg.y * grid.x + wg.x) * WG + lid;
  if (i >= params.count) {
    return;
  }
  mass[moves[i].y] = massScratch[i];
}
