// sample.wgsl: draws one token id per row of logits: greedy, temperature, top-k, top-p.
// Shapes: logits [rows, V] f32 (finite values), sampling [rows] SamplingParams,
// tokens [rows] u32. Rules (the CPU reference, tests/reference/sampling.ts,
// spells them out): tokens are ordered by (logit desc, index asc); temperature <= 0
// or topK == 1 takes the first; otherwise weights exp((logit - max) / temperature),
// keep the first topK, then the shortest prefix reaching topP of their mass, and
// draw u = uniform(seed, counter) over the kept weights in index order.
//
// One workgroup per row, no sorting. Each thread owns a contiguous slice of the
// vocabulary. A keep set is always a prefix of the order, so it is a cut
// (key, end): keep token i iff key_i > key, or key_i == key and i < end, where
// key_i is the logit's bits mapped to an unsigned order. The cut's key is found by
// a radix-16 select over those 32 bits: each round is one pass over the row into
// private per-thread bucket counts and masses, summed across the workgroup, and
// picks the bucket holding the cut. At most 8 rounds; leading digits shared by
// the range's bounds are skipped, and the search stops once the bucket holds a
// single token (typically after 3-5 rounds). The cut's end comes from counting
// tied keys in index order. The draw sums kept weights per slice, scans the slice
// sums, and the slice holding u * total scans its tokens. Float sums run in a
// fixed order, so a row's token depends only on its logits and parameters, not
// on its batch or on other rows.

override V: u32;
// Threads per row: small on CPU-emulated GPUs (one SIMD group, where barriers and
// per-thread bookkeeping are costly), large on real GPUs. At most MAX_WG.
override WG: u32 = 128u;

struct Params {
  rows: u32,
}

struct SamplingParams {
  temperature: f32,
  topK: u32,
  topP: f32,
  seed: u32,
  counter: u32,
  _pad0: u32,
  _pad1: u32,
  _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> sampling: array<SamplingParams>;
@group(0) @binding(3) var<storage, read_write> tokens: array<u32>;

const MAX_WG: u32 = 128u;
const BUCKETS: u32 = 16u; // radix 16: 4 key bits per round
const ROUNDS: u32 = 8u; // 32 key bits
const NONE: u32 = 0xffffffffu;
// Threads fold their private bucket masses into FOLD shared slots, FOLD threads at
// a time (thread t into slot t % FOLD, in thread order, so the float sums are
// deterministic). Keeps the shared partials small, [BUCKETS][FOLD]: compilers
// (SwiftShader) slow down badly on loops over large workgroup arrays.
const FOLD: u32 = 16u;

// Max/argmax/min partials of each thread's slice.
var<workgroup> partialKey: array<u32, MAX_WG>;
var<workgroup> partialIndex: array<u32, MAX_WG>;
var<workgroup> partialMinKey: array<u32, MAX_WG>;
var<workgroup> rowMaxKey: u32;
var<workgroup> rowArgmax: u32;
var<workgroup> rowMinKey: u32;
// Radix select: folded bucket masses [BUCKETS][FOLD] and their totals; bucket
// counts (integers, so atomics keep them deterministic), double-buffered: a round
// adds into [countBuffer] and clears the other buffer for the next round.
var<workgroup> partialMass: array<f32, BUCKETS * FOLD>;
var<workgroup> bucketMass: array<f32, BUCKETS>;
var<workgroup> bucketCount: array<array<atomic<u32>, BUCKETS>, 2>;
var<workgroup> searchStart: u32;
var<workgroup> searchDone: u32;
var<workgroup> foundKey: u32;
// Tie resolution.
var<workgroup> needTieScan: u32;
var<workgroup> sliceTies: array<u32, MAX_WG>;
var<workgroup> tieOwner: u32;
var<workgroup> tieRank: u32;
var<workgroup> tieEnd: u32;
// The draw: kept mass of each slice and their exclusive prefix sums [WG + 1].
var<workgroup> sliceMass: array<f32, MAX_WG>;
var<workgroup> sliceOffset: array<f32, MAX_WG + 1u>;
var<workgroup> drawPoint: f32;

// Per-invocation row state, set once in main.
var<private> rowBase: u32;
var<private> sliceStart: u32;
var<private> sliceEnd: u32;
var<private> maxKey: u32;
var<private> minKey: u32;
var<private> maxLogit: f32;
var<private> invTemperature: f32;
var<private> countBuffer: u32; // runs on across searches, which may stop early

// Keep token i iff key_i > key || (key_i == key && i < end).
struct Cut {
  key: u32,
  end: u32,
}

// Unsigned order of an f32's value: flip negatives, set the sign bit of
// positives; -0 maps to +0's key so that equal logits tie.
fn orderKey(x: f32) -> u32 {
  let bits = bitcast<u32>(x);
  if (bits == 0x80000000u) {
    return 0x80000000u;
  }
  return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

fn keyLogit(key: u32) -> f32 {
  return bitcast<f32>(select(~key, key & 0x7fffffffu, (key & 0x80000000u) != 0u));
}

// Unnormalised probability; exactly 1 for the maximum (safe for tiny temperatures).
fn weight(key: u32, x: f32) -> f32 {
  if (key == maxKey) {
    return 1.0;
  }
  return exp((x - maxLogit) * invTemperature);
}

// The top `count` bits of key, the others zero (count <= 32).
fn highBits(key: u32, count: u32) -> u32 {
  if (count == 0u) {
    return 0u;
  }
  return key & (0xffffffffu << (32u - count));
}

fn isKept(cut: Cut, key: u32, i: u32) -> bool {
  return key > cut.key || (key == cut.key && i < cut.end);
}

// xxHash32-style mix of the 8 bytes (seed, counter); its top 24 bits give u in [0, 1).
fn mixWord(h: u32, word: u32) -> u32 {
  let sum = h + word * 0xc2b2ae3du;
  return ((sum << 17u) | (sum >> 15u)) * 0x27d4eb2fu;
}

fn drawUniform(seed: u32, counter: u32) -> f32 {
  var h = mixWord(mixWord(0x165667b1u + 8u, seed), counter);
  h = (h ^ (h >> 15u)) * 0x85ebca77u;
  h = (h ^ (h >> 13u)) * 0xc2b2ae3du;
  h = h ^ (h >> 16u);
  return f32(h >> 8u) * (1.0 / 16777216.0);
}

// Sets maxKey, maxLogit, minKey and returns the argmax (ties: lowest index).
fn findMax(lid: u32) -> u32 {
  var bestKey = 0u;
  var bestIndex = NONE;
  var lowKey = 0xffffffffu;
  for (var i = sliceStart; i < sliceEnd; i++) {
    let key = orderKey(logits[rowBase + i]);
    if (bestIndex == NONE || key > bestKey) {
      bestKey = key;
      bestIndex = i;
    }
    lowKey = min(lowKey, key);
  }
  partialKey[lid] = bestKey;
  partialIndex[lid] = bestIndex;
  partialMinKey[lid] = lowKey;
  workgroupBarrier();
  if (lid == 0u) {
    // Slices ascend with the thread id, so a strict > keeps the lowest index.
    for (var t = 1u; t < WG; t++) {
      if (partialIndex[t] != NONE && partialKey[t] > bestKey) {
        bestKey = partialKey[t];
        bestIndex = partialIndex[t];
      }
      lowKey = min(lowKey, partialMinKey[t]);
    }
    rowMaxKey = bestKey;
    rowArgmax = bestIndex;
    rowMinKey = lowKey;
  }
  workgroupBarrier();
  maxKey = rowMaxKey;
  minKey = rowMinKey;
  maxLogit = logits[rowBase + rowArgmax];
  return rowArgmax;
}

// The index just past the n-th token (in index order) with key `key` that `prev` keeps.
fn findTieEnd(lid: u32, key: u32, prev: Cut, n: u32) -> u32 {
  var own = 0u;
  for (var i = sliceStart; i < sliceEnd; i++) {
    let k = orderKey(logits[rowBase + i]);
    if (k == key && isKept(prev, k, i)) {
      own += 1u;
    }
  }
  sliceTies[lid] = own;
  workgroupBarrier();
  if (lid == 0u) {
    var before = 0u;
    for (var t = 0u; t < WG; t++) {
      if (before + sliceTies[t] >= n) {
        tieOwner = t;
        tieRank = n - before;
        break;
      }
      before += sliceTies[t];
    }
  }
  workgroupBarrier();
  if (lid == tieOwner) {
    var seen = 0u;
    for (var i = sliceStart; i < sliceEnd; i++) {
      let k = orderKey(logits[rowBase + i]);
      if (k == key && isKept(prev, k, i)) {
        seen += 1u;
        if (seen == tieRank) {
          tieEnd = i + 1u;
          break;
        }
      }
    }
  }
  workgroupBarrier();
  return tieEnd;
}

// Narrows `prev` to its shortest prefix whose measure reaches the goal: a token
// count (byMass false: goal = count) or a share of the kept mass (byMass true:
// goal = share * mass of prev).
fn searchCut(lid: u32, prev: Cut, byMass: bool, goalArg: f32) -> Cut {
  // Kept keys lie in [max(prev.key, minKey), maxKey]: the leading digits those
  // bounds share are the cut's too, so the rounds for them are skipped.
  if (lid == 0u) {
    let differ = max(prev.key, minKey) ^ maxKey;
    searchStart = min(countLeadingZeros(differ) / 4u, ROUNDS - 1u);
  }
  let start = workgroupUniformLoad(&searchStart);
  var shift = 32u - 4u * start; // key bits below `shift` are not chosen yet
  var base = highBits(maxKey, 4u * start); // key bits chosen so far
  var goal = goalArg;
  var above = 0.0; // measure of kept tokens whose key is above the current bucket range
  var tieCount = 0u;
  for (var round = start; round < ROUNDS; round++) {
    shift -= 4u;
    // Explicit initialisers: without one, naga (gfx-rs/wgpu#9489), and Dawn here
    // too, zero a loop-body `var` only on the first iteration.
    var counts = array<u32, BUCKETS>();
    var masses = array<f32, BUCKETS>();
    for (var i = sliceStart; i < sliceEnd; i++) {
      let x = logits[rowBase + i];
      let key = orderKey(x);
      let inRange = round == start || (key >> (shift + 4u)) == (base >> (shift + 4u));
      if (inRange && isKept(prev, key, i)) {
        let digit = (key >> shift) & (BUCKETS - 1u);
        counts[digit] += 1u;
        if (byMass) {
          masses[digit] += weight(key, x);
        }
      }
    }
    let parity = countBuffer;
    countBuffer = 1u - countBuffer;
    for (var b = 0u; b < BUCKETS; b++) {
      if (counts[b] != 0u) {
        atomicAdd(&bucketCount[parity][b], counts[b]);
      }
    }
    if (byMass) {
      for (var first = 0u; first < WG; first += FOLD) {
        if (lid >= first && lid < first + FOLD) {
          for (var b = 0u; b < BUCKETS; b++) {
            let at = b * FOLD + lid - first;
            partialMass[at] = select(partialMass[at], 0.0, first == 0u) + masses[b];
          }
        }
        workgroupBarrier();
      }
    } else {
      workgroupBarrier();
    }
    for (var b = lid; b < BUCKETS; b += WG) {
      if (byMass) {
        var mass = 0.0;
        for (var slot = 0u; slot < min(WG, FOLD); slot++) {
          mass += partialMass[b * FOLD + slot];
        }
        bucketMass[b] = mass;
      }
      atomicStore(&bucketCount[1u - parity][b], 0u);
    }
    workgroupBarrier();
    // Every thread picks the same digit: the first bucket from the top where the
    // cumulative measure reaches the goal. Float sums of a bucket can differ by
    // rounding between rounds, so if none reaches it the lowest non-empty bucket
    // (all of the range) is taken.
    if (byMass && round == start) {
      var total = 0.0;
      for (var b = BUCKETS; b > 0u; b--) {
        total += bucketMass[b - 1u];
      }
      goal *= total;
    }
    var cumulative = above;
    var digit = 0u;
    var aboveDigit = above;
    for (var b = BUCKETS; b > 0u; b--) {
      let d = b - 1u;
      let count = atomicLoad(&bucketCount[parity][d]);
      let measure = select(f32(count), bucketMass[d], byMass);
      if (count != 0u) {
        digit = d;
        aboveDigit = cumulative;
        tieCount = count;
        if (cumulative + measure >= goal) {
          break;
        }
      }
      cumulative += measure;
    }
    base |= digit << shift;
    above = aboveDigit;
    // A bucket holding one kept token pins the cut to that token: stop early.
    if (lid == 0u) {
      searchDone = select(0u, 1u, tieCount == 1u);
    }
    if (workgroupUniformLoad(&searchDone) != 0u) {
      break;
    }
  }
  if (shift > 0u) {
    // Stopped early: read the lone token's full key.
    for (var i = sliceStart; i < sliceEnd; i++) {
      let key = orderKey(logits[rowBase + i]);
      if ((key >> shift) == (base >> shift) && isKept(prev, key, i)) {
        foundKey = key;
      }
    }
    workgroupBarrier();
    base = foundKey;
  }
  // `base` is now a key present in the row; `tieCount` kept tokens share it, and
  // the first n of them (index order) complete the prefix.
  var n = tieCount;
  if (byMass) {
    let tieWeight = weight(base, keyLogit(base));
    if (tieWeight > 0.0) {
      n = u32(clamp(ceil((goal - above) / tieWeight), 1.0, f32(tieCount)));
    }
  } else {
    n = u32(goal - above);
  }
  var end = select(V, prev.end, base == prev.key);
  if (lid == 0u) {
    needTieScan = select(0u, 1u, n < tieCount);
  }
  if (workgroupUniformLoad(&needTieScan) != 0u) {
    end = findTieEnd(lid, base, prev, n);
  }
  return Cut(base, end);
}

// Draws from the kept weights with u: the slice holding u * total is found from
// per-slice sums (an exclusive scan in thread order), then its owner scans it.
fn drawToken(lid: u32, row: u32, cut: Cut, u: f32) {
  var own = 0.0;
  for (var i = sliceStart; i < sliceEnd; i++) {
    let x = logits[rowBase + i];
    let key = orderKey(x);
    if (isKept(cut, key, i)) {
      own += weight(key, x);
    }
  }
  sliceMass[lid] = own;
  workgroupBarrier();
  if (lid == 0u) {
    var offset = 0.0;
    for (var t = 0u; t < WG; t++) {
      sliceOffset[t] = offset;
      offset += sliceMass[t];
    }
    sliceOffset[WG] = offset;
    drawPoint = u * offset; // < offset: u <= 1 - 2^-24
  }
  workgroupBarrier();
  let point = drawPoint;
  // Exactly one slice satisfies this (empty slices have equal bounds).
  if (sliceOffset[lid] <= point && point < sliceOffset[lid + 1u]) {
    var cumulative = sliceOffset[lid];
    var token = NONE;
    var lastKept = NONE;
    for (var i = sliceStart; i < sliceEnd; i++) {
      let x = logits[rowBase + i];
      let key = orderKey(x);
      if (isKept(cut, key, i)) {
        let w = weight(key, x);
        if (w > 0.0) {
          lastKept = i;
        }
        cumulative += w;
        if (cumulative > point) {
          token = i;
          break;
        }
      }
    }
    // Rounding can leave the running sum just short of the point: take the
    // slice's last kept token then.
    tokens[row] = select(token, lastKept, token == NONE);
  }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let row = wg.x;
  if (row >= params.rows) {
    return;
  }
  let options = sampling[row];
  rowBase = row * V;
  let chunk = (V + WG - 1u) / WG;
  sliceStart = min(lid * chunk, V);
  sliceEnd = min(sliceStart + chunk, V);

  let argmax = findMax(lid);
  if (options.temperature <= 0.0 || options.topK == 1u) {
    if (lid == 0u) {
      tokens[row] = argmax;
    }
    return;
  }
  invTemperature = 1.0 / options.temperature;
  var cut = Cut(0u, V); // everything
  // Top-k (a count), then top-p (a share of the mass) of what top-k kept. One call
  // site: the search is large, and compilers inline it once per call.
  for (var byMass = 0u; byMass < 2u; byMass++) {
    let enabled = select(options.topK > 1u && options.topK < V, options.topP < 1.0, byMass == 1u);
    if (enabled) {
      let goal = select(f32(options.topK), max(options.topP, 0.0), byMass == 1u);
      cut = searchCut(lid, cut, byMass == 1u, goal);
    }
  }
  drawToken(lid, row, cut, drawUniform(options.seed, options.counter));
}
