// attention_prefill.wgsl: causal attention of tiles of consecutive query tokens of one sequence
// over the paged KV cache (which already holds this step's keys and values).
//   tile = (seq s, firstToken f, numQueries n <= TILE_Q, unused): queries f..f+n-1 at KV slots
//   p0..p0+n-1 (p0 = slots[f]; a token's slot is its index in its sequence's KV, which is its
//   position unless the KV was pruned); the query at slot p sees keys 0..p of s, earlier chunks
//   and shared prefix blocks included.
//   out[t, h, :] = sum_j softmax_j(q[t, h, :] . K[j, g, :] * SCALE) V[j, g, :]
//   for g = h / (H / HKV) and K[j, g, :] = kCache[blockTables[seqs[s].blockTableOffset + j / BS],
//   g, j % BS, :].
// Shapes (f32 unless noted; q, K, V, out read as vec4s: HD % 4 == 0, HD <= 128): q [T, H HD];
// slots u32 [T]; seqs SeqInfo [S]; blockTables u32 [*];
// kCache, vCache [numBlocks, HKV, BS, HD]; tiles vec4<u32> [count];
// out [T, H HD] (only the tiles' rows are written).
// Dispatch (H, count): one workgroup of TILE_Q / ROWS threads per (head, tile). Thread i owns
// ROWS consecutive queries of the tile, their q and output accumulators in registers, and walks
// keys 0..(its last slot) with an online softmax (one exp per query and key). Each key and
// value it loads serves its ROWS queries (memory accesses are the cost that matters on
// CPU-emulated GPUs); the wrapper picks ROWS so that ROWS * HD/4 <= MAX_STATE vec4s. Keys are
// read straight through the block table (no workgroup memory, no barriers): the threads of a
// tile read the same key at about the same time.

override H: u32;
override HKV: u32;
override HD: u32;
override BS: u32;
override SCALE: f32;
override ROWS: u32;
override D4: u32 = HD / 4u;
override WG: u32 = TILE_Q / ROWS;

const TILE_Q: u32 = 32u;
// vec4s of q (and of accumulators) per thread: ROWS * D4 <= MAX_STATE.
const MAX_STATE: u32 = 32u;
const MAX_ROWS: u32 = 4u;
// Running max before the first key: exp(MASKED - score) is exactly 0.
const MASKED: f32 = -1e30;

struct Params {
  count: u32,
}

struct SeqInfo {
  blockTableOffset: u32,
  contextLen: u32,
  firstToken: u32,
  numTokens: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> slots: array<u32>;
@group(0) @binding(3) var<storage, read> seqs: array<SeqInfo>;
@group(0) @binding(4) var<storage, read> blockTables: array<u32>;
@group(0) @binding(5) var<storage, read> kCache: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> vCache: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> tiles: array<vec4<u32>>;
@group(0) @binding(8) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  if (wg.y >= params.count) {
    return;
  }
  let tile = tiles[wg.y];
  let tableOffset = seqs[tile.x].blockTableOffset;
  let firstToken = tile.y;
  let numQueries = tile.z;
  let kvHead = h / (H / HKV);
  let firstSlot = slots[firstToken];

  // Rows past the tile repeat its last query (computed, never written).
  var query: array<vec4<f32>, MAX_STATE>;
  var acc: array<vec4<f32>, MAX_STATE>;
  var rowMax: array<f32, MAX_ROWS>;
  var rowSum: array<f32, MAX_ROWS>;
  var rowSlot: array<u32, MAX_ROWS>;
  for (var r = 0u; r < ROWS; r++) {
    let row = min(lid * ROWS + r, numQueries - 1u);
    rowSlot[r] = firstSlot + row;
    rowMax[r] = MASKED;
    for (var d = 0u; d < D4; d++) {
      query[r * D4 + d] = q[((firstToken + row) * H + h) * D4 + d] * SCALE;
    }
  }

  let keyEnd = rowSlot[ROWS - 1u] + 1u;
  for (var key = 0u; key < keyEnd; key++) {
    let block = blockTables[tableOffset + key / BS];
    let base = ((block * HKV + kvHead) * BS + key % BS) * D4;
    // Zeroed explicitly: a declaration inside a loop is not re-zeroed on every backend.
    var dots: array<vec4<f32>, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
      dots[r] = vec4<f32>(0.0);
    }
    for (var d = 0u; d < D4; d++) {
      let k = kCache[base + d];
      for (var r = 0u; r < ROWS; r++) {
        dots[r] += query[r * D4 + d] * k;
      }
    }
    // Online softmax with one exp: e = exp(-|score - max|) either rescales the old terms (the
    // score is a new max; the key gets weight 1) or is the key's weight.
    var keep: array<f32, MAX_ROWS>;
    var weight: array<f32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
      let score = dots[r].x + dots[r].y + dots[r].z + dots[r].w;
      let newMax = max(rowMax[r], score);
      let e = exp(min(rowMax[r], score) - newMax);
      let grew = score > rowMax[r];
      let visible = key <= rowSlot[r];
      keep[r] = select(1.0, select(1.0, e, grew), visible);
      weight[r] = select(0.0, select(e, 1.0, grew), visible);
      rowMax[r] = select(rowMax[r], newMax, visible);
      rowSum[r] = rowSum[r] * keep[r] + weight[r];
    }
    for (var d = 0u; d < D4; d++) {
      let v = vCache[base + d];
      for (var r = 0u; r < ROWS; r++) {
        acc[r * D4 + d] = acc[r * D4 + d] * keep[r] + weight[r] * v;
      }
    }
  }

  for (var r = 0u; r < ROWS; r++) {
    let row = lid * ROWS + r;
    if (row < numQueries) {
      let norm = 1.0 / rowSum[r];
      for (var d = 0u; d < D4; d++) {
        out[((firstToken + row) * H + h) * D4 + d] = acc[r * D4 + d] * norm;
      }
    }
  }
}
