// attention_train_backward.wgsl: gradient of attention_train_forward.wgsl with respect to its
// input qkv, given dOut = dLoss/dout. Per query head h with kv head g = h / (H / HKV):
//   P[t, j] = exp(q[t, h] . k[j, g] * SCALE - lse[h, t]) for j <= t, else 0
//   D[t] = dOut[t, h, :] . out[t, h, :];  dP[t, j] = dOut[t, h, :] . v[j, g, :]
//   dS[t, j] = P[t, j] (dP[t, j] - D[t])
//   dq[t, h] = SCALE sum_j dS[t, j] k[j, g]
//   dk[j, g] = SCALE sum_{h in g} sum_t dS[t, j] q[t, h]
//   dv[j, g] = sum_{h in g} sum_t P[t, j] dOut[t, h]
// Shapes (f32; rows read as vec4s: HD % 4 == 0, HD <= 128): qkv, dQkv [T, (H + 2 HKV) HD] (q
// heads, then k heads, then v heads per row); out, dOut [T, H HD]; lse, delta [H, LSE_STRIDE]
// (LSE_STRIDE = the wrapper's maxTokens >= T). T = params.tokens. Every column of rows < T of
// dQkv is overwritten: dq by `dq`, dk and dv by `dkdv`.
// Two entry points, dispatched in this order in one pass (dkdv reads the delta dq writes):
//  - dq, grid (H, ceil(T / TILE)): a workgroup per (head, tile of TILE queries); thread i owns
//    ROWS queries (q, dOut, dq accumulators in registers), computes their D (stored to delta),
//    and walks keys 0..(its last query) in tiles of TILE_K keys and values staged in workgroup
//    memory.
//  - dkdv, grid (HKV, ceil(T / TILE)): a workgroup per (kv head, tile of TILE keys); thread i owns
//    ROWS keys (k, v, dk, dv in registers) and, for each query head of the group, walks queries
//    (tile's first key)..T-1 in tiles of TILE_K queries whose q, dOut, lse and delta are staged in
//    workgroup memory. Summing over the group's heads in the thread needs no atomics.
// Both work as attention_train_forward.wgsl does: each staged row serves all threads of the
// workgroup, each row a thread loads serves its ROWS rows. The wrapper picks ROWS so that
// ROWS * HD / 4 <= MAX_STATE and TILE_K so that TILE_K * HD / 4 <= STAGE.

override H: u32;
override HKV: u32;
override HD: u32;
override SCALE: f32;
override ROWS: u32;
override TILE_K: u32;
override LSE_STRIDE: u32;
override D4: u32 = HD / 4u;
override WG: u32 = TILE / ROWS;
override GROUP: u32 = H / HKV;
// vec4s per qkv (and dQkv) row, and per out (and dOut) row.
override ROW4: u32 = (H + 2u * HKV) * D4;
override OUT4: u32 = H * D4;

const TILE: u32 = 32u;
// vec4s staged per tensor and tile: 4 KiB each, small because Dawn zero-fills workgroup memory
// in generated code that SwiftShader compiles slowly.
const STAGE: u32 = 256u;
const MAX_STATE: u32 = 32u;
const MAX_ROWS: u32 = 4u;
const MAX_TILE_K: u32 = 32u;

struct Params {
  tokens: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> dOut: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dQkv: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> delta: array<f32>;

// dq stages keys in stageA and values in stageB; dkdv stages scaled queries in stageA, dOut
// rows in stageB, and their lse and delta in lseTile and deltaTile.
var<workgroup> stageA: array<vec4<f32>, STAGE>;
var<workgroup> stageB: array<vec4<f32>, STAGE>;
var<workgroup> lseTile: array<f32, MAX_TILE_K>;
var<workgroup> deltaTile: array<f32, MAX_TILE_K>;

@compute @workgroup_size(WG)
fn dq(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let firstQuery = wg.y * TILE;
  let tokens = params.tokens;
  if (firstQuery >= tokens) {
    return;
  }
  let kvHead = h / GROUP;
  let kCol = (H + kvHead) * D4;
  let vCol = (H + HKV + kvHead) * D4;

  // Rows past T repeat the last query (computed, never written).
  var query: array<vec4<f32>, MAX_STATE>; // q * SCALE
  var grad: array<vec4<f32>, MAX_STATE>; // dOut
  var acc: array<vec4<f32>, MAX_STATE>; // dq / SCALE
  var rowLse: array<f32, MAX_ROWS>;
  var rowDelta: array<f32, MAX_ROWS>;
  var rowToken: array<u32, MAX_ROWS>;
  for (var r = 0u; r < ROWS; r++) {
    let row = firstQuery + lid * ROWS + r;
    let t = min(row, tokens - 1u);
    rowToken[r] = t;
    rowLse[r] = lse[h * LSE_STRIDE + t];
    var dot = vec4<f32>(0.0);
    for (var d = 0u; d < D4; d++) {
      query[r * D4 + d] = qkv[t * ROW4 + h * D4 + d] * SCALE;
      let g = dOut[t * OUT4 + h * D4 + d];
      grad[r * D4 + d] = g;
      dot += g * out[t * OUT4 + h * D4 + d];
      acc[r * D4 + d] = vec4<f32>(0.0);
    }
    rowDelta[r] = dot.x + dot.y + dot.z + dot.w;
    if (row < tokens) {
      delta[h * LSE_STRIDE + t] = rowDelta[r];
    }
  }
  // One past the last key this thread's queries see.
  let myKeyEnd = rowToken[ROWS - 1u] + 1u;

  let keyEnd = min(firstQuery + TILE, tokens);
  for (var tileStart = 0u; tileStart < keyEnd; tileStart += TILE_K) {
    let count = min(TILE_K, keyEnd - tileStart);
    for (var i = lid; i < count * D4; i += WG) {
      let src = (tileStart + i / D4) * ROW4 + i % D4;
      stageA[i] = qkv[src + kCol];
      stageB[i] = qkv[src + vCol];
    }
    workgroupBarrier();

    let end = min(tileStart + count, myKeyEnd);
    for (var key = tileStart; key < end; key++) {
      let base = (key - tileStart) * D4;
      // Zeroed explicitly: a declaration inside a loop is not re-zeroed on every backend.
      var scores: array<vec4<f32>, MAX_ROWS>;
      var dps: array<vec4<f32>, MAX_ROWS>;
      for (var r = 0u; r < ROWS; r++) {
        scores[r] = vec4<f32>(0.0);
        dps[r] = vec4<f32>(0.0);
      }
      for (var d = 0u; d < D4; d++) {
        let k = stageA[base + d];
        let v = stageB[base + d];
        for (var r = 0u; r < ROWS; r++) {
          scores[r] += query[r * D4 + d] * k;
          dps[r] += grad[r * D4 + d] * v;
        }
      }
      var ds: array<f32, MAX_ROWS>;
      for (var r = 0u; r < ROWS; r++) {
        let s = scores[r].x + scores[r].y + scores[r].z + scores[r].w;
        let dp = dps[r].x + dps[r].y + dps[r].z + dps[r].w;
        let p = select(0.0, exp(s - rowLse[r]), key <= rowToken[r]);
        ds[r] = p * (dp - rowDelta[r]);
      }
      for (var d = 0u; d < D4; d++) {
        let k = stageA[base + d];
        for (var r = 0u; r < ROWS; r++) {
          acc[r * D4 + d] += ds[r] * k;
        }
      }
    }
    // The next tile overwrites the staged keys and values.
    workgroupBarrier();
  }

  for (var r = 0u; r < ROWS; r++) {
    let t = firstQuery + lid * ROWS + r;
    if (t < tokens) {
      for (var d = 0u; d < D4; d++) {
        dQkv[t * ROW4 + h * D4 + d] = acc[r * D4 + d] * SCALE;
      }
    }
  }
}

@compute @workgroup_size(WG)
fn dkdv(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let kvHead = wg.x;
  let firstKey = wg.y * TILE;
  let tokens = params.tokens;
  if (firstKey >= tokens) {
    return;
  }
  let kCol = (H + kvHead) * D4;
  let vCol = (H + HKV + kvHead) * D4;

  // Rows past T repeat the last key (computed, never written).
  var keys: array<vec4<f32>, MAX_STATE>;
  var values: array<vec4<f32>, MAX_STATE>;
  var dk: array<vec4<f32>, MAX_STATE>; // dk, as q is staged pre-scaled
  var dv: array<vec4<f32>, MAX_STATE>;
  var rowKey: array<u32, MAX_ROWS>;
  for (var r = 0u; r < ROWS; r++) {
    let j = min(firstKey + lid * ROWS + r, tokens - 1u);
    rowKey[r] = j;
    for (var d = 0u; d < D4; d++) {
      keys[r * D4 + d] = qkv[j * ROW4 + kCol + d];
      values[r * D4 + d] = qkv[j * ROW4 + vCol + d];
      dk[r * D4 + d] = vec4<f32>(0.0);
      dv[r * D4 + d] = vec4<f32>(0.0);
    }
  }
  // Queries before this thread's first key see none of its keys.
  let myQueryStart = rowKey[0];

  for (var head = kvHead * GROUP; head < (kvHead + 1u) * GROUP; head++) {
    for (var tileStart = firstKey; tileStart < tokens; tileStart += TILE_K) {
      let count = min(TILE_K, tokens - tileStart);
      for (var i = lid; i < count * D4; i += WG) {
        let t = tileStart + i / D4;
        stageA[i] = qkv[t * ROW4 + head * D4 + i % D4] * SCALE;
        stageB[i] = dOut[t * OUT4 + head * D4 + i % D4];
      }
      for (var i = lid; i < count; i += WG) {
        lseTile[i] = lse[head * LSE_STRIDE + tileStart + i];
        deltaTile[i] = delta[head * LSE_STRIDE + tileStart + i];
      }
      workgroupBarrier();

      for (var t = max(tileStart, myQueryStart); t < tileStart + count; t++) {
        let base = (t - tileStart) * D4;
        // Zeroed explicitly: a declaration inside a loop is not re-zeroed on every backend.
        var scores: array<vec4<f32>, MAX_ROWS>;
        var dps: array<vec4<f32>, MAX_ROWS>;
        for (var r = 0u; r < ROWS; r++) {
          scores[r] = vec4<f32>(0.0);
          dps[r] = vec4<f32>(0.0);
        }
        for (var d = 0u; d < D4; d++) {
          let q = stageA[base + d];
          let g = stageB[base + d];
          for (var r = 0u; r < ROWS; r++) {
            scores[r] += q * keys[r * D4 + d];
            dps[r] += g * values[r * D4 + d];
          }
        }
        var p: array<f32, MAX_ROWS>;
        var ds: array<f32, MAX_ROWS>;
        for (var r = 0u; r < ROWS; r++) {
          let s = scores[r].x + scores[r].y + scores[r].z + scores[r].w;
          let dp = dps[r].x + dps[r].y + dps[r].z + dps[r].w;
          p[r] = select(0.0, exp(s - lseTile[t - tileStart]), rowKey[r] <= t);
          ds[r] = p[r] * (dp - deltaTile[t - tileStart]);
        }
        for (var d = 0u; d < D4; d++) {
          let q = stageA[base + d];
          let g = stageB[base + d];
          for (var r = 0u; r < ROWS; r++) {
            dk[r * D4 + d] += ds[r] * q;
            dv[r * D4 + d] += p[r] * g;
          }
        }
      }
      // The next tile overwrites the staged rows.
      workgroupBarrier();
    }
  }

  for (var r = 0u; r < ROWS; r++) {
    let j = firstKey + lid * ROWS + r;
    if (j < tokens) {
      for (var d = 0u; d < D4; d++) {
        dQkv[j * ROW4 + kCol + d] = dk[r * D4 + d];
        dQkv[j * ROW4 + vCol + d] = dv[r * D4 + d];
      }
    }
  }
}
