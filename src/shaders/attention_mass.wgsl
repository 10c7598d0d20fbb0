// attention_mass.wgsl: accumulated attention mass per cached key, for H2O-style KV pruning
// (heavy hitters are the keys that received the most attention probability).
// For each listed chunk c = (firstToken, numTokens, blockTableOffset, numKeys0), one sequence's
// consecutive query tokens of this step, each of its tokens i < numTokens (row t = firstToken + i
// of q, attending causally to the numKeys0 + i keys j = 0..numKeys0 + i - 1) and query head h:
//   p_j = softmax_j(q[t, h, :] . K[j, g, :] * SCALE),   g = h / (H / HKV),
//   mass[slot(j)] += params.weight * p_j,
//   K[j, g, :] = kCache[blockTables[blockTableOffset + j / BS], g, j % BS, :],
//   slot(j)    = blockTables[blockTableOffset + j / BS] * BS + j % BS   (the physical slot).
// Shapes (f32 unless noted; q and K read as vec4s: HD % 4 == 0, HD <= 128): q [T, H HD] (rotated
// queries); blockTables u32 [*]; kCache [numBlocks, HKV, BS, HD];
// chunks vec4<u32> [count]; mass [numBlocks * BS], read and written (accumulated across
// dispatches, one per layer).
// Dispatch: one workgroup per chunk on a 2-D grid (workgroupGrid(count)); workgroups with a
// flattened index >= params.count return. Chunks must be different sequences' (disjoint slots),
// and within a workgroup thread lid owns keys lid, lid + WG, ..., so no two invocations ever add
// to the same mass entry at once.
// Per token and group of PACK query heads that share a kv head: pass A, each thread runs an
// online softmax (max, sum) over its keys, loading each key once for the PACK heads; the WG
// partial (max, sum) pairs are merged through workgroup memory; pass B, each thread recomputes
// its scores and adds weight * sum over the PACK heads of exp(score - max) / sum to its slots.

override H: u32;
override HKV: u32;
override HD: u32;
override BS: u32;
override SCALE: f32;
// Query heads handled together (a divisor of H / HKV, PACK * D4 <= MAX_STATE, PACK <= MAX_PACK).
override PACK: u32;
// Threads per workgroup (WG * PACK <= STAGE).
override WG: u32;
override D4: u32 = HD / 4u;
override GROUP: u32 = H / HKV;

const MAX_STATE: u32 = 32u;
const MAX_PACK: u32 = 8u;
// Staged partial softmaxes: [PACK, WG] pairs. Small, because Dawn zero-fills workgroup memory in
// generated code that SwiftShader compiles slowly.
const STAGE: u32 = 128u;
// Running max before the first key: exp(MASKED - score) is exactly 0.
const MASKED: f32 = -1e30;

struct Params {
  count: u32,
  weight: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> blockTables: array<u32>;
@group(0) @binding(3) var<storage, read> kCache: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> chunks: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> mass: array<f32>;

var<workgroup> stagedMax: array<f32, STAGE>;
var<workgroup> stagedSum: array<f32, STAGE>;

@compute @workgroup_size(WG)
fn main(
  @builtin(workgroup_id) wg: vec3u,
  @builtin(num_workgroups) grid: vec3u,
  @builtin(local_invocation_index) lid: u32,
) {
  let c = wg.y * grid.x + wg.x;
  if (c >= params.count) {
    return;
  }
  let chunk = chunks[c];
  let firstToken = chunk.x;
  let numTokens = chunk.y;
  let tableOffset = chunk.z;
  let numKeys0 = chunk.w;
  let weight = params.weight;

  for (var i = 0u; i < numTokens; i++) {
    let t = firstToken + i;
    let numKeys = numKeys0 + i;
    for (var firstHead = 0u; firstHead < H; firstHead += PACK) {
      let kvHead = firstHead / GROUP;
      // Every `var` below is assigned before use: a declaration inside a loop is not re-zeroed
      // on every backend.
      var query: array<vec4<f32>, MAX_STATE>;
      var runMax: array<f32, MAX_PACK>;
      var runSum: array<f32, MAX_PACK>;
      for (var p = 0u; p < PACK; p++) {
        runMax[p] = MASKED;
        runSum[p] = 0.0;
        for (var d = 0u; d < D4; d++) {
          query[p * D4 + d] = q[(t * H + firstHead + p) * D4 + d] * SCALE;
        }
      }

      // Pass A: this thread's online softmax over keys lid, lid + WG, ...
      for (var key = lid; key < numKeys; key += WG) {
        let block = blockTables[tableOffset + key / BS];
        let base = ((block * HKV + kvHead) * BS + key % BS) * D4;
        var dots: array<vec4<f32>, MAX_PACK>;
        for (var p = 0u; p < PACK; p++) {
          dots[p] = vec4<f32>(0.0);
        }
        for (var d = 0u; d < D4; d++) {
          let k = kCache[base + d];
          for (var p = 0u; p < PACK; p++) {
            dots[p] += query[p * D4 + d] * k;
          }
        }
        // One exp per key: e = exp(-|score - max|) rescales the old sum (new max) or is the
        // key's term.
        for (var p = 0u; p < PACK; p++) {
          let score = dots[p].x + dots[p].y + dots[p].z + dots[p].w;
          let newMax = max(runMax[p], score);
          let e = exp(min(runMax[p], score) - newMax);
          let grew = score > runMax[p];
          runSum[p] = runSum[p] * select(1.0, e, grew) + select(e, 1.0, grew);
          runMax[p] = newMax;
        }
      }

      // Merge: every thread folds all WG staged pairs itself (a thread without keys has max
      // MASKED and sum 0 and adds nothing).
      for (var p = 0u; p < PACK; p++) {
        stagedMax[p * WG + lid] = runMax[p];
        stagedSum[p * WG + lid] = runSum[p];
      }
      workgroupBarrier();
      var totalMax: array<f32, MAX_PACK>;
      var invSum: array<f32, MAX_PACK>;
      for (var p = 0u; p < PACK; p++) {
        var m = MASKED;
        for (var l = 0u; l < WG; l++) {
          m = max(m, stagedMax[p * WG + l]);
        }
        var s = 0.0;
        for (var l = 0u; l < WG; l++) {
          s += stagedSum[p * WG + l] * exp(stagedMax[p * WG + l] - m);
        }
        totalMax[p] = m;
        invSum[p] = select(0.0, 1.0 / s, s > 0.0);
      }
      // The next round restages only after everyone has read.
      workgroupBarrier();

      // Pass B: add this group of heads' probabilities to this thread's slots.
      for (var key = lid; key < numKeys; key += WG) {
        let block = blockTables[tableOffset + key / BS];
        let offset = key % BS;
        let base = ((block * HKV + kvHead) * BS + offset) * D4;
        var dots: array<vec4<f32>, MAX_PACK>;
        for (var p = 0u; p < PACK; p++) {
          dots[p] = vec4<f32>(0.0);
        }
        for (var d = 0u; d < D4; d++) {
          let k = kCache[base + d];
          for (var p = 0u; p < PACK; p++) {
            dots[p] += query[p * D4 + d] * k;
          }
        }
        var prob = 0.0;
        for (var p = 0u; p < PACK; p++) {
          let score = dots[p].x + dots[p].y + dots[p].z + dots[p].w;
          prob += exp(score - totalMax[p]) * invSum[p];
        }
        let slot = block * BS + offset;
        mass[slot] = mass[slot] + weight * prob;
      }
    }
  }
}
