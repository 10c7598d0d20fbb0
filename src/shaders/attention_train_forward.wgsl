// attention_train_forward.wgsl: causal self-attention of one whole training sequence (positions
// 0..T-1, contiguous activations), keeping each query's log-sum-exp for the backward.
//   s[t, j] = q[t, h, :] . k[j, g, :] * SCALE          for j <= t, g = h / (H / HKV)
//   out[t, h HD + i] = sum_{j<=t} softmax_j(s[t, j]) v[j, g HD + i]
//   lse[h LSE_STRIDE + t] = log sum_{j<=t} exp(s[t, j])
// Shapes (f32; rows read as vec4s: HD % 4 == 0, HD <= 128): qkv [T, (H + 2 HKV) HD] holding per
// row the rotated q heads, then the rotated k heads, then the v heads; out [T, H HD];
// lse [H, LSE_STRIDE] with LSE_STRIDE (the wrapper's maxTokens) >= T. T = params.tokens.
// Dispatch (H, ceil(T / TILE_Q)): one workgroup of TILE_Q / ROWS threads per (head, tile of
// TILE_Q consecutive queries). Thread i owns queries i ROWS .. i ROWS + ROWS - 1 of the tile
// (q, output accumulators and softmax state in registers) and runs the same online softmax as
// attention_prefill.wgsl (one exp per query and key). The keys 0..(tile's last query) are walked
// in tiles of TILE_K keys that the workgroup stages in workgroup memory, so each key and value is
// read from global memory once per workgroup instead of once per thread; the wrapper picks
// ROWS so that ROWS * HD / 4 <= MAX_STATE and TILE_K so that TILE_K * HD / 4 <= STAGE.

override H: u32;
override HKV: u32;
override HD: u32;
override SCALE: f32;
override ROWS: u32;
override TILE_K: u32;
override LSE_STRIDE: u32;
override D4: u32 = HD / 4u;
override WG: u32 = TILE_Q / ROWS;
// vec4s per qkv row.
override ROW4: u32 = (H + 2u * HKV) * D4;

const TILE_Q: u32 = 32u;
// vec4s of K (and of V) staged per key tile: 4 KiB each, small because Dawn zero-fills
// workgroup memory in generated code that SwiftShader compiles slowly.
const STAGE: u32 = 256u;
const MAX_STATE: u32 = 32u;
const MAX_ROWS: u32 = 4u;
// Running max before the first key: exp(MASKED - score) is exactly 0.
const MASKED: f32 = -1e30;

struct Params {
  tokens: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;

var<workgroup> kTile: array<vec4<f32>, STAGE>;
var<workgroup> vTile: array<vec4<f32>, STAGE>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let firstQuery = wg.y * TILE_Q;
  let tokens = params.tokens;
  if (firstQuery >= tokens) {
    return;
  }
  let kvHead = h / (H / HKV);
  let kCol = (H + kvHead) * D4;
  let vCol = (H + HKV + kvHead) * D4;

  // Rows past T repeat the last query (computed, never written).
  var query: array<vec4<f32>, MAX_STATE>;
  var acc: array<vec4<f32>, MAX_STATE>;
  var rowMax: array<f32, MAX_ROWS>;
  var rowSum: array<f32, MAX_ROWS>;
  var rowToken: array<u32, MAX_ROWS>;
  for (var r = 0u; r < ROWS; r++) {
    let t = min(firstQuery + lid * ROWS + r, tokens - 1u);
    rowToken[r] = t;
    rowMax[r] = MASKED;
    rowSum[r] = 0.0;
    for (var d = 0u; d < D4; d++) {
      query[r * D4 + d] = qkv[t * ROW4 + h * D4 + d] * SCALE;
      acc[r * D4 + d] = vec4<f32>(0.0);
    }
  }
  // One past the last key this thread's queries see.
  let myKeyEnd = rowToken[ROWS - 1u] + 1u;

  let keyEnd = min(firstQuery + TILE_Q, tokens);
  for (var tileStart = 0u; tileStart < keyEnd; tileStart += TILE_K) {
    let count = min(TILE_K, keyEnd - tileStart);
    for (var i = lid; i < count * D4; i += WG) {
      let src = (tileStart + i / D4) * ROW4 + i % D4;
      kTile[i] = qkv[src + kCol];
      vTile[i] = qkv[src + vCol];
    }
    workgroupBarrier();

    let end = min(tileStart + count, myKeyEnd);
    for (var key = tileStart; key < end; key++) {
      let base = (key - tileStart) * D4;
      // Zeroed explicitly: a declaration inside a loop is not re-zeroed on every backend.
      var dots: array<vec4<f32>, MAX_ROWS>;
      for (var r = 0u; r < ROWS; r++) {
        dots[r] = vec4<f32>(0.0);
      }
      for (var d = 0u; d < D4; d++) {
        let k = kTile[base + d];
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
        let visible = key <= rowToken[r];
        keep[r] = select(1.0, select(1.0, e, grew), visible);
        weight[r] = select(0.0, select(e, 1.0, grew), visible);
        rowMax[r] = select(rowMax[r], newMax, visible);
        rowSum[r] = rowSum[r] * keep[r] + weight[r];
      }
      for (var d = 0u; d < D4; d++) {
        let v = vTile[base + d];
        for (var r = 0u; r < ROWS; r++) {
          acc[r * D4 + d] = acc[r * D4 + d] * keep[r] + weight[r] * v;
        }
      }
    }
    // The next tile overwrites kTile and vTile.
    workgroupBarrier();
  }

  for (var r = 0u; r < ROWS; r++) {
    let t = firstQuery + lid * ROWS + r;
    if (t < tokens) {
      let norm = 1.0 / rowSum[r];
      for (var d = 0u; d < D4; d++) {
        out[(t * H + h) * D4 + d] = acc[r * D4 + d] * norm;
      }
      lse[h * LSE_STRIDE + t] = rowMax[r] + log(rowSum[r]);
    }
  }
}
