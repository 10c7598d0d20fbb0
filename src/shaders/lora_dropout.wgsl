// lora_dropout.wgsl: inverted dropout on a LoRA path's input (PEFT lora_dropout), with a mask
// that is a pure function of (seed, stream, row, column), so the training forward, its
// recompute and the backward all drop the same elements without storing the mask.
//   keep(r, c) = uniform24(hash(hash(seed ^ hash(stream)) ^ (r * COLS + c))) >= P
//   out[r, OUT_OFFSET + c] (= or +=) keep(r, c) ? x[r, IN_OFFSET + c] / (1 - P) : 0
// Shapes: x f32 [rows, IN_STRIDE], out f32 [rows, OUT_STRIDE]; c < COLS. Forward: out = dropped
// input (ACCUMULATE off); backward: dx += dropped gradient (ACCUMULATE on), the same mask.
// One thread per element; grid (x, y) flattened, as workgroupGrid spreads it.

override COLS: u32;
override IN_STRIDE: u32;
override IN_OFFSET: u32;
override OUT_STRIDE: u32;
override OUT_OFFSET: u32;
override P: f32;
override ACCUMULATE: bool;

struct Params {
  rows: u32,
  seed: u32,
}

struct Stream {
  id: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<uniform> stream: Stream;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

// Chris Wellons' lowbias32 integer hash: every input bit affects every output bit.
fn hash(v: u32) -> u32 {
  var h = v;
  h ^= h >> 16u;
  h *= 0x7feb352du;
  h ^= h >> 15u;
  h *= 0x846ca68bu;
  h ^= h >> 16u;
  return h;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) groups: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let i = (wg.y * groups.x + wg.x) * WG + lid;
  if (i >= params.rows * COLS) {
    return;
  }
  let r = i / COLS;
  let c = i % COLS;
  let key = hash(params.seed ^ hash(stream.id));
  let u = f32(hash(key ^ i) >> 8u) * (1.0 / 16777216.0);
  var v = 0.0;
  if (u >= P) {
    v = x[r * IN_STRIDE + IN_OFFSET + c] / (1.0 - P);
  }
  let o = r * OUT_STRIDE + OUT_OFFSET + c;
  if (ACCUMULATE) {
    out[o] += v;
  } else {
    out[o] = v;
  }
}
