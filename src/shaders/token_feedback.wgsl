// token_feedback.wgsl: feeds tokens sampled on the GPU by the previous step into this step's input
// token ids, so a decode step can be submitted before the CPU has read the previous step's
// sample (pipelined decoding; only the sampled ids ever travel to the CPU, and never on the
// critical path).
//   tokenIds[pairs[i].y] = sampled[pairs[i].x]   for i < count
// Shapes (u32): pairs vec2<u32> [count] = (sample row of the previous step, token index of this
// step); sampled [maxSeqs]; tokenIds [T].
// Dispatch (ceil(count / WG)): one thread per fed-back token.

struct Params {
  count: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> pairs: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> sampled: array<u32>;
@group(0) @binding(3) var<storage, read_write> tokenIds: array<u32>;

const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) id: vec3u) {
  if (id.x < params.count) {
    let pair = pairs[id.x];
    tokenIds[pair.y] = sampled[pair.x];
  }
}
