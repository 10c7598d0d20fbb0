/**
 * Packs a StepPlan into the per-step index data the kernels read (the
 * token-batch layout): one CPU ArrayBuffer, written to the GPU with a single
 * writeBuffer per step. Regions start at 256-byte offsets so each can be bound
 * on its own.
 */
import { FEEDBACK_TOKEN, type StepPlan } from "../step.ts";
import { planAttention } from "../kernels/attention.ts";
import { packSamplingParams, SAMPLING_PARAMS_BYTES, type SamplingRow } from "../kernels/sample.ts";
import { InvalidRequestError, UnknownAdapterError } from "../errors.ts";
import { NO_ADAPTER_SLOT } from "../kernels/lora.ts";

export interface StepCapacity {
  maxTokens: number; // tokens per step (prefill chunk budget)
  maxSeqs: number; // sequences per step
  maxBlocksPerSeq: number; // block-table entries per sequence
  blockSize: number;
  tileQ: number; // queries per prefill attention tile
}

export interface Region {
  offset: number; // bytes
  size: number; // bytes
}

export interface StepLayout {
  tokenIds: Region; // u32 [T] (uploaded to its own GPU buffer, see Forward.tokenIds)
  positions: Region; // u32 [T]: rotary position of each token
  slots: Region; // u32 [T]: index of each token in its sequence's KV (its position unless pruned)
  tokenSeq: Region; // u32 [T]
  // SeqInfo [S] = u32 x4 {blockTableOffset, contextLen (KV entries after the step), firstToken,
  // numTokens}
  seqs: Region;
  blockTables: Region; // u32 [S * maxBlocksPerSeq]
  logitRows: Region; // u32 [S]: batch row of the token each sequence samples from
  decodeTokens: Region; // u32x2 [T]: (token, seq) pairs whose attention runs in the decode kernel
  tiles: Region; // u32x4 [maxTiles]: prefill attention tiles (seq, firstToken, count, 0)
  sampling: Region; // SamplingParams [S], 32 bytes each
  // u32x4 [S]: (firstToken, numTokens, blockTableOffset, numKeys0) of trackMass sequences
  massChunks: Region;
  feedback: Region; // u32x2 [S]: (previous step's sample row, token index) of FEEDBACK_TOKEN inputs
  // u32 [T]: adapter pool slot of each token's sequence, NO_ADAPTER_SLOT for the base model
  loraSlots: Region;
  totalBytes: number;
}

export function maxTiles(cap: StepCapacity): number {
  return Math.ceil(cap.maxTokens / cap.tileQ) + cap.maxSeqs;
}

export function stepLayout(cap: StepCapacity): StepLayout {
  let offset = 0;
  const region = (bytes: number): Region => {
    const r = { offset, size: Math.max(16, Math.ceil(bytes / 16) * 16) };
    offset += Math.ceil(r.size / 256) * 256;
    return r;
  };
  const T = cap.maxTokens, S = cap.maxSeqs;
  const layout = {
    tokenIds: region(T * 4),
    positions: region(T * 4),
    slots: region(T * 4),
    tokenSeq: region(T * 4),
    seqs: region(S * 16),
    blockTables: region(S * cap.maxBlocksPerSeq * 4),
    logitRows: region(S * 4),
    decodeTokens: region(T * 8),
    tiles: region(maxTiles(cap) * 16),
    sampling: region(S * SAMPLING_PARAMS_BYTES),
    massChunks: region(S * 16),
    feedback: region(S * 8),
    loraSlots: region(T * 4),
  };
  return { ...layout, totalBytes: offset };
}

/** Counts the kernels need, besides the packed data. */
export interface StepCounts {
  tokens: number;
  seqs: number;
  sampledSeqs: number;
  /** Input tokens copied on the GPU from the previous step's samples (FEEDBACK_TOKEN). */
  feedbackTokens: number;
  /** Sequences whose attention mass is accumulated (trackMass). */
  massChunks: number;
  decodeTokens: number;
  tiles: number;
  /** Tokens whose sequence runs on a LoRA adapter (0: the step dispatches no LoRA kernels). */
  loraTokens: number;
  /** Sum over decode-kernel tokens of the keys each attends to (position + 1), for cost models. */
  decodeAttended: number;
  /** The same over prefill-kernel tokens. */
  prefillAttended: number;
}

/**
 * Fills `out` (layout.totalBytes) from the plan. Sequences that sample come first
 * in logitRows/sampling, in plan order; `sampleOrder[i]` is the plan index of row i.
 * `previousSampleRows` maps the seqIds that sampled in the previous step to their
 * sample row there: a FEEDBACK_TOKEN input is read from that row on the GPU.
 * `adapterSlots` maps the adapter ids the runner holds to their pool slots.
 */
export function packStep(
  plan: StepPlan,
  cap: StepCapacity,
  layout: StepLayout,
  vocabSize: number,
  out: ArrayBuffer,
  previousSampleRows: ReadonlyMap<number, number> = new Map(),
  adapterSlots: ReadonlyMap<string, number> = new Map(),
): { counts: StepCounts; sampleOrder: number[]; newMassSlots: number[] } {
  const u32 = (r: Region) => new Uint32Array(out, r.offset, r.size / 4);
  const tokenIds = u32(layout.tokenIds), positions = u32(layout.positions);
  const slots = u32(layout.slots);
  const tokenSeq = u32(layout.tokenSeq), seqs = u32(layout.seqs);
  const blockTables = u32(layout.blockTables), logitRows = u32(layout.logitRows);
  const decodeTokens = u32(layout.decodeTokens), tiles = u32(layout.tiles);
  const feedback = u32(layout.feedback);
  const massChunks = u32(layout.massChunks);
  const loraSlots = u32(layout.loraSlots);
  let feedbackTokens = 0, numMassChunks = 0, loraTokens = 0;
  /** Physical KV slots (block * blockSize + offset) written this step by trackMass sequences. */
  const newMassSlots: number[] = [];
  const samplingRows: SamplingRow[] = [];

  if (plan.sequences.length > cap.maxSeqs) {
    throw new InvalidRequestError(
      `step has ${plan.sequences.length} sequences; this engine was built for ${cap.maxSeqs}`,
    );
  }
  let t = 0, decodeAttended = 0, prefillAttended = 0;
  const chunks: { firstToken: number; numTokens: number }[] = [];
  const sampleOrder: number[] = [];
  plan.sequences.forEach((seq, s) => {
    const n = seq.tokens.length;
    if (n === 0) throw new InvalidRequestError(`sequence ${seq.seqId}: empty chunk`);
    if (t + n > cap.maxTokens) {
      throw new InvalidRequestError(
        `step has more than ${cap.maxTokens} tokens; split the prefill into chunks`,
      );
    }
    // KV entries of the sequence after this step (positions, unless pruning dropped some).
    const startSlot = seq.startSlot ?? seq.startPosition;
    if (startSlot > seq.startPosition) {
      throw new InvalidRequestError(
        `sequence ${seq.seqId}: KV slot ${startSlot} is past position ${seq.startPosition}`,
      );
    }
    const contextLen = startSlot + n;
    const blocksNeeded = Math.ceil(contextLen / cap.blockSize);
    if (blocksNeeded > seq.blockTable.length || blocksNeeded > cap.maxBlocksPerSeq) {
      throw new InvalidRequestError(
        `sequence ${seq.seqId}: ${contextLen} KV slots need ${blocksNeeded} KV blocks; ` +
          `block table has ${seq.blockTable.length} (engine limit ${cap.maxBlocksPerSeq})`,
      );
    }
    let slot = NO_ADAPTER_SLOT;
    if (seq.adapterId !== undefined) {
      const found = adapterSlots.get(seq.adapterId);
      if (found === undefined) {
        throw new UnknownAdapterError(seq.adapterId, [...adapterSlots.keys()]);
      }
      slot = found;
      loraTokens += n;
    }
    loraSlots.fill(slot, t, t + n);
    const tableOffset = s * cap.maxBlocksPerSeq;
    for (let j = 0; j < blocksNeeded; j++) blockTables[tableOffset + j] = seq.blockTable[j];
    seqs.set([tableOffset, contextLen, t, n], s * 4);
    for (let i = 0; i < n; i++) {
      const id = seq.tokens[i];
      if (id === FEEDBACK_TOKEN && i === 0) {
        const row = previousSampleRows.get(seq.seqId);
        if (row === undefined) {
          throw new InvalidRequestError(
            `sequence ${seq.seqId}: FEEDBACK_TOKEN input, but it did not sample in the ` +
              `previous step`,
          );
        }
        feedback.set([row, t + i], 2 * feedbackTokens++);
        tokenIds[t + i] = 0;
      } else if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
        throw new InvalidRequestError(
          `sequence ${seq.seqId}: token id ${id} outside [0, ${vocabSize})`,
        );
      }
      tokenIds[t + i] = id;
      positions[t + i] = seq.startPosition + i;
      slots[t + i] = startSlot + i;
      tokenSeq[t + i] = s;
    }
    chunks.push({ firstToken: t, numTokens: n });
    if (seq.trackMass) {
      massChunks.set([t, n, tableOffset, startSlot + 1], 4 * numMassChunks++);
      for (let j = startSlot; j < contextLen; j++) {
        newMassSlots.push(
          seq.blockTable[Math.floor(j / cap.blockSize)] * cap.blockSize + (j % cap.blockSize),
        );
      }
    }
    if (n === 1) decodeAttended += contextLen;
    else prefillAttended += n * startSlot + (n * (n + 1)) / 2;
    if (seq.sample) {
      logitRows[sampleOrder.length] = t + n - 1;
      // The random stream is indexed by the new token's position, so a sequence
      // draws the same numbers alone or batched.
      samplingRows.push({ ...seq.sampling, counter: contextLen });
      sampleOrder.push(s);
    }
    t += n;
  });
  new Uint8Array(out, layout.sampling.offset, layout.sampling.size).set(
    packSamplingParams(samplingRows),
  );
  const attention = planAttention(chunks);
  decodeTokens.set(attention.decodeTokens);
  tiles.set(attention.tiles);
  return {
    counts: {
      tokens: t,
      seqs: plan.sequences.length,
      sampledSeqs: sampleOrder.length,
      feedbackTokens,
      massChunks: numMassChunks,
      loraTokens,
      decodeTokens: attention.decodeTokens.length / 2,
      tiles: attention.tiles.length / 4,
      decodeAttended,
      prefillAttended,
    },
    sampleOrder,
    newMassSlots,
  };
}
