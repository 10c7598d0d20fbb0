// attention_decode.wgsl: causal attention of single query tokens over the paged KV cache
// (flash-decoding style), for the tokens listed in decodeTokens.
//   out[t, h, :] = sum_j softmax_j(q[t, h, :] . K[j, g, :] * SCALE) V[j, g, :]
//   for j = 0..slots[t] (the token's index in its sequence's KV: its position unless the KV
//   was pruned), g = h / (H / HKV), and
//   K[j, g, :] = kCache[blockTables[seqs[s].blockTableOffset + j / BS], g, j % BS, :].
// Shapes (f32 unless noted; q, K, V, out read as vec4s: HD % 4 == 0, HD <= 128): q [T, H HD];
// slots u32 [T]; seqs SeqInfo [S]; blockTables u32 [*];
// kCache, vCache [numBlocks, HKV, BS, HD];
// decodeTokens vec2<u32> [count] = (token t, its sequence s) (the pair saves a tokenSeq binding);
// out [T, H HD] (only the listed tokens' rows are written).
// Dispatch (H / PACK, count): one workgroup per (group of PACK query heads that share a kv head,
// listed token). Thread i takes keys i, i + WG, ...: it loads each key and value once for the PACK
// heads (memory accesses are the cost that matters on CPU-emulated GPUs), keeps a running max, sum
// and output accumulator per head in registers (one exp per head and key); the WG partial
// softmaxes are then merged through workgroup memory. The wrapper picks PACK so that
// PACK * HD/4 <= MAX_STATE vec4s.

override H: u32;
override HKV: u32;
override HD: u32;
override BS: u32;
override SCALE: f32;
override PACK: u32;
// Threads per workgroup: the wrapper picks 8 (one SIMD group) on CPU-emulated adapters, where
// merging partial softmaxes across groups costs more than it saves.
override WG: u32;
override D4: u32 = HD / 4u;

// vec4s of q (and of accumulators) per thread: PACK * D4 <= MAX_STATE.
const MAX_STATE: u32 = 32u;
const MAX_PACK: u32 = 8u;
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
@group(0) @binding(7) var<storage, read> decodeTokens: array<vec2<u32>>;
@group(0) @binding(8) var<storage, read_write> out: array<vec4<f32>>;

// One thread's partial softmax (max and sum [PACK], accumulators [PACK, D4]) being merged, and
// the merged accumulators.
var<workgroup> stagedMax: array<f32, MAX_PACK>;
var<workgroup> stagedSum: array<f32, MAX_PACK>;
var<workgroup> stagedAcc: array<vec4<f32>, MAX_STATE>;
var<workgroup> merged: array<vec4<f32>, MAX_STATE>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  if (wg.y >= params.count) {
    return;
  }
  let firstHead = wg.x * PACK;
  let kvHead = firstHead / (H / HKV);
  let entry = decodeTokens[wg.y];
  let t = entry.x;
  let tableOffset = seqs[entry.y].blockTableOffset;
  let contextLen = slots[t] + 1u;

  var query: array<vec4<f32>, MAX_STATE>;
  var acc: array<vec4<f32>, MAX_STATE>;
  var runMax: array<f32, MAX_PACK>;
  var runSum: array<f32, MAX_PACK>;
  for (var g = 0u; g < PACK; g++) {
    runMax[g] = MASKED;
    for (var d = 0u; d < D4; d++) {
      query[g * D4 + d] = q[(t * H + firstHead + g) * D4 + d] * SCALE;
    }
  }

  for (var key = lid; key < contextLen; key += WG) {
    let block = blockTables[tableOffset + key / BS];
    let base = ((block * HKV + kvHead) * BS + key % BS) * D4;
    // Zeroed explicitly: a declaration inside a loop is not re-zeroed on every backend.
    var dots: array<vec4<f32>, MAX_PACK>;
    for (var g = 0u; g < PACK; g++) {
      dots[g] = vec4<f32>(0.0);
    }
    for (var d = 0u; d < D4; d++) {
      let k = kCache[base + d];
      for (var g = 0u; g < PACK; g++) {
        dots[g] += query[g * D4 + d] * k;
      }
    }
    // Online softmax with one exp: e = exp(-|score - max|) either rescales the old terms (the
    // score is a new max; the key gets weight 1) or is the key's weight.
    var keep: array<f32, MAX_PACK>;
    var weight: array<f32, MAX_PACK>;
    for (var g = 0u; g < PACK; g++) {
      let score = dots[g].x + dots[g].y + dots[g].z + dots[g].w;
      let newMax = max(runMax[g], score);
      let e = exp(min(runMax[g], score) - newMax);
      let grew = score > runMax[g];
      keep[g] = select(1.0, e, grew);
      weight[g] = select(e, 1.0, grew);
      runMax[g] = newMax;
      runSum[g] = runSum[g] * keep[g] + weight[g];
    }
    for (var d = 0u; d < D4; d++) {
      let v = vCache[base + d];
      for (var g = 0u; g < PACK; g++) {
        acc[g * D4 + d] = acc[g * D4 + d] * keep[g] + weight[g] * v;
      }
    }
  }

  // Merge the WG partial softmaxes into `merged`, one thread's per round: it stages its state,
  // then all threads fold the staged vec4s in. Every thread tracks the merged max and sum itself.
  // A thread without keys has max MASKED and sum 0, and folds in as nothing. (Workgroup memory
  // stays small: Dawn zero-fills it in generated code that SwiftShader compiles slowly.)
  var mergedMax: array<f32, MAX_PACK>;
  var mergedSum: array<f32, MAX_PACK>;
  for (var g = 0u; g < PACK; g++) {
    mergedMax[g] = MASKED;
  }
  for (var round = 0u; round < WG; round++) {
    if (lid == round) {
      for (var g = 0u; g < PACK; g++) {
        stagedMax[g] = runMax[g];
        stagedSum[g] = runSum[g];
      }
      for (var i = 0u; i < PACK * D4; i++) {
        stagedAcc[i] = acc[i];
      }
    }
    workgroupBarrier();
    for (var i = lid; i < PACK * D4; i += WG) {
      let g = i / D4;
      let newMax = max(mergedMax[g], stagedMax[g]);
      merged[i] = merged[i] * exp(mergedMax[g] - newMax) +
        stagedAcc[i] * exp(stagedMax[g] - newMax);
    }
    for (var g = 0u; g < PACK; g++) {
      let newMax = max(mergedMax[g], stagedMax[g]);
      mergedSum[g] = mergedSum[g] * exp(mergedMax[g] - newMax) +
        stagedSum[g] * exp(stagedMax[g] - newMax);
      mergedMax[g] = newMax;
    }
    workgroupBarrier();
  }

  for (var i = lid; i < PACK * D4; i += WG) {
    out[(t * H + firstHead + i / D4) * D4 + i % D4] = merged[i] / mergedSum[i / D4];
  }
}
