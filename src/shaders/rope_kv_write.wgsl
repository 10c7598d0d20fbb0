// rope_kv_write.wgsl: rotary embedding (Hugging Face "rotate_half") of the query and key heads of
// the fused QKV projection, and the write of this step's keys and values into the paged KV pool.
//   qOut[t, h, :]               = rope(qkv[t, query head h], positions[t])     h < H
//   kCache[block, g, slot, :]   = rope(qkv[t, key head g], positions[t])       g < HKV
//   vCache[block, g, slot, :]   = qkv[t, value head g]                         (not rotated)
//   block = blockTables[seq.blockTableOffset + kvSlot / BS], offset kvSlot % BS, where
//   seq = seqs[tokenSeq[t]] and kvSlot = seq.contextLen - seq.numTokens + (t - seq.firstToken):
//   the token's index in its sequence's KV, which is its position unless the KV was pruned.
// rope(x, p)[i] = x[i] cos(p f_i) - x[i + HD/2] sin(p f_i),
// rope(x, p)[i + HD/2] = x[i + HD/2] cos(p f_i) + x[i] sin(p f_i),   i < HD/2, f = invFreq.
// Shapes (f32 unless noted): qkv [T, (H + 2 HKV) HD] (query heads, then key heads, then value
// heads); positions, tokenSeq u32 [T]; seqs SeqInfo [S]; blockTables u32 [*];
// invFreq [HD/2] in a uniform of vec4s (a uniform, not a storage buffer, to stay within 8 storage
// bindings); qOut [T, H HD]; kCache, vCache [numBlocks, HKV, BS, HD].
// Dispatch (ceil((H + 2 HKV) HD/2 / WG), T): one invocation per (token, head, rotation pair i).
//
// The angle p * f_i reaches thousands of radians; rounding it to f32 would cost ~1e-4 absolute
// at p ~ 2000. Instead it is split into four exactly representable products and each is reduced
// modulo 2π exactly (Cody-Waite), which keeps the angle within ~1e-6 of p * f_i for p < 2^17.
// sin and cos are polynomials rather than builtins: SwiftShader's builtins err by ~2e-4.

override H: u32;
override HKV: u32;
override HD: u32;
override BS: u32;
override HALF: u32 = HD / 2u;

const WG: u32 = 64u;

struct Params {
  tokens: u32,
}

struct SeqInfo {
  blockTableOffset: u32,
  contextLen: u32,
  firstToken: u32,
  numTokens: u32,
}

// HD / 2 <= 128 frequencies, four per vec4 (uniform arrays have a 16-byte stride).
struct InvFreq {
  v: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> tokenSeq: array<u32>;
@group(0) @binding(4) var<storage, read> seqs: array<SeqInfo>;
@group(0) @binding(5) var<storage, read> blockTables: array<u32>;
@group(0) @binding(6) var<uniform> invFreq: InvFreq;
@group(0) @binding(7) var<storage, read_write> qOut: array<f32>;
@group(0) @binding(8) var<storage, read_write> kCache: array<f32>;
@group(0) @binding(9) var<storage, read_write> vCache: array<f32>;

// reduceAngle, ropeAngle and sinCos come from rope_angle.wgsl, prepended by the wrapper.
/** Index of element 0 of (kvHead, position) in a KV pool, through the token's block table. */
fn cacheIndex(t: u32, kvHead: u32) -> u32 {
  let seq = seqs[tokenSeq[t]];
  let kvSlot = seq.contextLen - seq.numTokens + (t - seq.firstToken);
  let block = blockTables[seq.blockTableOffset + kvSlot / BS];
  return ((block * HKV + kvHead) * BS + kvSlot % BS) * HD;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let t = wg.y;
  let heads = H + 2u * HKV;
  let item = wg.x * WG + lid;
  if (t >= params.tokens || item >= heads * HALF) {
    return;
  }
  let head = item / HALF;
  let i = item % HALF;
  let src = (t * heads + head) * HD + i;
  let a = qkv[src];
  let b = qkv[src + HALF];
  let position = positions[t];

  if (head >= H + HKV) {
    let dst = cacheIndex(t, head - H - HKV) + i;
    vCache[dst] = a;
    vCache[dst + HALF] = b;
    return;
  }
  let sc = sinCos(ropeAngle(position, invFreq.v[i / 4u][i % 4u]));
  let s = sc.x;
  let c = sc.y;
  let rotatedA = a * c - b * s;
  let rotatedB = b * c + a * s;
  if (head < H) {
    let dst = (t * H + head) * HD + i;
    qOut[dst] = rotatedA;
    qOut[dst + HALF] = rotatedB;
  } else {
    let dst = cacheIndex(t, head - H) + i;
    kCache[dst] = rotatedA;
    kCache[dst + HALF] = rotatedB;
  }
}
