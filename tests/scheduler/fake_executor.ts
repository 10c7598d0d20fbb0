/**
 * A CPU stand-in for the engine, for tests of the scheduling loops that run without a GPU.
 *
 * FakeExecutor honours the step contract of src/engine/step.ts (StepPlan in, StepResult out, plus
 * ModelRunner's readMass and applyKvEdit for pruning) the way ModelRunner does, with fake tokens
 * and fake timings:
 *
 * - It keeps a paged KV pool of its own: every physical slot (block * blockSize + offset) holds
 *   the entry the last step wrote there (token, rotary position, adapter, and a 32-bit "K/V value"
 *   that hashes the token, its position, its adapter and every entry it attended to). A step reads
 *   and writes the pool only through the plan's block tables, start slots and copies, so stale
 *   blocks keep stale entries, exactly like GPU memory.
 * - A sampled token is a hash of the K/V value of the chunk's last token and the sampling seed:
 *   a deterministic function of the sequence's whole history as the executor saw it. A wrong
 *   start position or slot, a block shared that should not be (another prompt, another adapter),
 *   a missing copy-on-write copy, a token fed twice or skipped, a stale FEEDBACK_TOKEN: each
 *   changes some entry the sequence attends to, hence its tokens, against `referenceGeneration`
 *   (the same request generated alone, unbatched).
 * - FEEDBACK_TOKEN inputs take the token the sequence sampled in the previous executed plan (and
 *   fail, as packStep does, if it did not sample there).
 * - Attention mass per physical slot accumulates for trackMass sequences (a fixed fake weight per
 *   entry, normalized over the keys each query attends to), is cleared when such a sequence
 *   writes a slot, and moves with KvEdit moves; block copies copy entries but not mass, as on the
 *   GPU (ModelRunner copies the K/V caches only).
 * - Steps can be pipelined: `submit` runs a plan on the fake GPU at once (in submission order, as
 *   the GPU does) and queues its result; `collect` hands back the oldest. The scheduler only
 *   learns what happened when it collects.
 *
 * FakeTrainer is the fine-tuning side of an iteration: it checks that DPO slices arrive in the
 * order planDpoSlices gives for the step's pairs (with the reference log-probs it holds), that no
 * step starts before the previous step's optimizer slice completed, and returns fake per-pair DPO
 * losses at each optimizer slice.
 */
import {
  FEEDBACK_TOKEN,
  type KvEdit,
  type SequenceWork,
  type StepPlan,
  type StepResult,
} from "../../src/engine/step.ts";
import type { StopReason } from "../../src/scheduler/request.ts";
import { planDpoSlices, type TrainingSlice } from "../../src/engine/training/slice_plan.ts";

/** A contract violation the real engine would reject (or silently compute garbage for). */
export class FakeExecutorError extends Error {
  override name = "FakeExecutorError";
}

// ---------------------------------------------------------------------------------------------
// The fake model: hashes

/** One 32-bit mixing round (murmur3's block step). */
function mix(h: number, x: number): number {
  let k = Math.imul(x | 0, 0xcc9e2d51);
  k = (k << 15) | (k >>> 17);
  k = Math.imul(k, 0x1b873593);
  h ^= k;
  h = (h << 13) | (h >>> 19);
  return (Math.imul(h, 5) + 0xe6546b64) >>> 0;
}

/** Murmur3's finalizer: every input bit reaches every output bit. */
function finish(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Stable hash of an adapter id; 0 for the base model. */
export function adapterHash(adapterId: string | undefined): number {
  if (adapterId === undefined) return 0;
  let h = 0x811c9dc5;
  for (let i = 0; i < adapterId.length; i++) h = mix(h, adapterId.charCodeAt(i));
  return finish(mix(h, adapterId.length)) | 1;
}

/** The digest of an empty context. */
const EMPTY_CONTEXT = 0x2545f491;

/** The K/V "value" of a token: its id, position, adapter, and the digest of what it attends to. */
function kvValue(context: number, token: number, position: number, adapter: number): number {
  return finish(mix(mix(mix(mix(context, token), position), adapter), 0x3c6ef372));
}

/** Extends a context digest (over slots in order) by one more entry's value. */
function extend(context: number, value: number): number {
  return mix(context, value);
}

/** The token sampled from the logits of a token whose K/V value is `value`. */
function sampleToken(value: number, seed: number, vocabSize: number): number {
  return finish(mix(mix(value, seed), 0x9e3779b9)) % vocabSize;
}

/** Fake attention weight a query gives a key (before normalization): 1 .. 9 by the key's value. */
function massWeight(value: number): number {
  return 1 + ((value >>> 11) & 0xff) / 32;
}

/** What a physical KV slot holds. */
export interface FakeEntry {
  token: number;
  position: number;
  adapterId: string | undefined;
  value: number;
}

// ---------------------------------------------------------------------------------------------
// The reference: one request alone, no batching, no paging

export interface ReferenceRequest {
  prompt: readonly number[];
  maxTokens: number;
  eosIds: readonly number[];
  adapterId?: string;
  sampling: { seed: number };
}

export interface ReferenceOutput {
  tokens: number[];
  stopReason: Exclude<StopReason, "cancelled">;
}

/**
 * The tokens the request generates alone: the fake model over its exact, unpruned history
 * (prompt, then each generated token), stopping at an EOS id (not returned) or maxTokens.
 */
export function referenceGeneration(req: ReferenceRequest, vocabSize: number): ReferenceOutput {
  const adapter = adapterHash(req.adapterId);
  const tokens: number[] = [];
  let context = EMPTY_CONTEXT;
  let last = 0;
  const feed = (token: number, position: number) => {
    last = kvValue(context, token, position, adapter);
    context = extend(context, last);
  };
  req.prompt.forEach((token, i) => feed(token, i));
  for (;;) {
    const next = sampleToken(last, req.sampling.seed, vocabSize);
    if (req.eosIds.includes(next)) return { tokens, stopReason: "eos" };
    tokens.push(next);
    if (tokens.length >= req.maxTokens) return { tokens, stopReason: "length" };
    feed(next, req.prompt.length + tokens.length - 1);
  }
}

// ---------------------------------------------------------------------------------------------
// The executor

/** A sample taken by a sequence, with every KV entry its last token attended to (in slot order). */
export interface SampleEvent {
  seqId: number;
  /** Rotary position of the token whose logits were sampled. */
  position: number;
  adapterId: string | undefined;
  attended: readonly FakeEntry[];
  token: number;
}

export interface FakeExecutorOptions {
  numBlocks: number;
  blockSize: number;
  vocabSize: number;
  /** The engine's step capacity (packStep's checks). */
  maxTokensPerStep: number;
  maxSeqsPerStep: number;
  /** Longest block table the engine takes (maxContext / blockSize); default numBlocks. */
  maxBlocksPerSeq?: number;
  /** Fake duration of a step, ms (default 2 + 0.05 per token + 0.5 per sequence). */
  stepMs?: (plan: StepPlan) => number;
  /** Called for every sample as the step runs (tests audit what a sequence attended to). */
  onSample?: (event: SampleEvent) => void;
}

export class FakeExecutor {
  readonly slots: (FakeEntry | undefined)[];
  readonly mass: Float32Array;
  /** Input tokens taken from the previous step's samples (FEEDBACK_TOKEN), for statistics. */
  feedbackTokens = 0;
  /** seqId -> the token it sampled in the previous executed plan (FEEDBACK_TOKEN reads it). */
  private previousSamples = new Map<number, number>();
  private readonly queue: StepResult[] = [];

  constructor(readonly options: FakeExecutorOptions) {
    const n = options.numBlocks * options.blockSize;
    this.slots = new Array<FakeEntry | undefined>(n).fill(undefined);
    this.mass = new Float32Array(n);
  }

  /** Steps submitted whose result was not collected yet. */
  get inFlight(): number {
    return this.queue.length;
  }

  /** Runs the plan on the fake GPU now (after every plan submitted before); queues its result. */
  submit(plan: StepPlan): void {
    this.queue.push(this.run(plan));
  }

  /** The result of the oldest step in flight. */
  collect(): StepResult {
    const result = this.queue.shift();
    if (!result) throw new FakeExecutorError("collect with no step in flight");
    return result;
  }

  /** ModelRunner's execute: the plan runs at once; its promise settles with its result. */
  execute(plan: StepPlan): Promise<StepResult> {
    try {
      return Promise.resolve(this.run(plan));
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Attention mass of every physical slot after every submitted step (a copy). */
  massSnapshot(): Float32Array {
    return this.mass.slice();
  }

  readMass(): Promise<Float32Array> {
    return Promise.resolve(this.massSnapshot());
  }

  applyKvEdit(edit: KvEdit): Promise<void> {
    try {
      this.applyEdit(edit);
      return Promise.resolve();
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Block copies, then slot moves (entries and mass), each move reading the pre-move contents. */
  applyEdit(edit: KvEdit): void {
    for (const copy of edit.copies) this.copyBlock(copy.src, copy.dst);
    const n = this.slots.length;
    for (const [src, dst] of edit.moves) {
      if (![src, dst].every((x) => Number.isInteger(x) && x >= 0 && x < n)) {
        throw new FakeExecutorError(`KV move ${src} -> ${dst}: slot outside the pool of ${n}`);
      }
    }
    const entries = edit.moves.map(([src]) => this.slots[src]);
    const masses = edit.moves.map(([src]) => this.mass[src]);
    edit.moves.forEach(([, dst], i) => {
      this.slots[dst] = entries[i];
      this.mass[dst] = masses[i];
    });
  }

  /** Executes one plan: copies, then every sequence's tokens; returns its samples. */
  run(plan: StepPlan): StepResult {
    const { maxTokensPerStep, maxSeqsPerStep, blockSize: B, vocabSize } = this.options;
    const maxBlocksPerSeq = this.options.maxBlocksPerSeq ?? this.options.numBlocks;
    if (plan.sequences.length > maxSeqsPerStep) {
      throw new FakeExecutorError(
        `step has ${plan.sequences.length} sequences; the engine takes ${maxSeqsPerStep}`,
      );
    }
    const totalTokens = plan.sequences.reduce((s, w) => s + w.tokens.length, 0);
    if (totalTokens > maxTokensPerStep) {
      throw new FakeExecutorError(
        `step has ${totalTokens} tokens; the engine takes ${maxTokensPerStep}`,
      );
    }
    const seqIds = new Set<number>();
    for (const work of plan.sequences) {
      if (seqIds.has(work.seqId)) {
        throw new FakeExecutorError(`sequence ${work.seqId} appears twice in one step`);
      }
      seqIds.add(work.seqId);
    }
    // Physical slot -> index of the sequence that writes it in this step: no other sequence of the
    // step may read or write it (sharing covers only blocks computed in earlier steps). Known
    // before any sequence runs, so the check does not depend on the order within the step.
    const writtenBy = new Map<number, number>();
    plan.sequences.forEach((work, s) => {
      const startSlot = work.startSlot ?? work.startPosition;
      for (let slot = startSlot; slot < startSlot + work.tokens.length; slot++) {
        const block = work.blockTable[Math.floor(slot / B)];
        if (block === undefined) continue; // runSequence reports the short table
        const p = block * B + (slot % B);
        const other = writtenBy.get(p);
        if (other !== undefined) {
          throw new FakeExecutorError(
            `sequences ${plan.sequences[other].seqId} and ${work.seqId} both write KV slot ${p} ` +
              `in one step`,
          );
        }
        writtenBy.set(p, s);
      }
    });
    const sampled = new Array<number>(plan.sequences.length).fill(-1);
    const samples = new Map<number, number>();
    plan.sequences.forEach((work, s) => {
      const token = this.runSequence(work, s, writtenBy, B, vocabSize, maxBlocksPerSeq);
      if (token !== null) {
        sampled[s] = token;
        samples.set(work.seqId, token);
      }
    });
    this.previousSamples = samples;
    const gpuMs = this.options.stepMs?.(plan) ??
      2 + 0.05 * totalTokens + 0.5 * plan.sequences.length;
    return { sampled, gpuMs };
  }

  private runSequence(
    work: SequenceWork,
    index: number,
    writtenBy: Map<number, number>,
    B: number,
    vocabSize: number,
    maxBlocksPerSeq: number,
  ): number | null {
    const n = work.tokens.length;
    const where = `sequence ${work.seqId}`;
    if (n === 0) throw new FakeExecutorError(`${where}: empty chunk`);
    const startSlot = work.startSlot ?? work.startPosition;
    if (!Number.isInteger(startSlot) || startSlot < 0 || startSlot > work.startPosition) {
      throw new FakeExecutorError(
        `${where}: KV slot ${startSlot} is not in 0..position ${work.startPosition}`,
      );
    }
    const end = startSlot + n;
    const blocksNeeded = Math.ceil(end / B);
    if (blocksNeeded > work.blockTable.length || blocksNeeded > maxBlocksPerSeq) {
      throw new FakeExecutorError(
        `${where}: ${end} KV slots need ${blocksNeeded} blocks; its table has ` +
          `${work.blockTable.length} (engine limit ${maxBlocksPerSeq})`,
      );
    }
    for (let j = 0; j < blocksNeeded; j++) this.checkBlock(work.blockTable[j], where);
    const physical = (slot: number) => work.blockTable[Math.floor(slot / B)] * B + (slot % B);
    const adapter = adapterHash(work.adapterId);
    const read = (slot: number): FakeEntry => {
      const p = physical(slot);
      const writer = writtenBy.get(p);
      if (writer !== undefined && writer !== index) {
        throw new FakeExecutorError(
          `${where} reads KV slot ${p}, written in the same step by another sequence`,
        );
      }
      const entry = this.slots[p];
      if (!entry) {
        throw new FakeExecutorError(
          `${where} reads KV slot ${p} (its slot ${slot}), never written`,
        );
      }
      return entry;
    };
    // The context the chunk's first token attends to: every earlier slot of the sequence.
    let context = EMPTY_CONTEXT;
    for (let slot = 0; slot < startSlot; slot++) context = extend(context, read(slot).value);
    if (work.trackMass) {
      for (let slot = startSlot; slot < end; slot++) this.mass[physical(slot)] = 0;
    }
    for (let i = 0; i < n; i++) {
      let token = work.tokens[i];
      if (token === FEEDBACK_TOKEN) {
        const fed = this.previousSamples.get(work.seqId);
        if (i !== 0 || fed === undefined) {
          throw new FakeExecutorError(
            `${where}: FEEDBACK_TOKEN at index ${i}, but ` +
              (i !== 0 ? "only tokens[0] may be one" : "it did not sample in the previous step"),
          );
        }
        token = fed;
        this.feedbackTokens++;
      } else if (!Number.isInteger(token) || token < 0 || token >= vocabSize) {
        throw new FakeExecutorError(`${where}: token id ${token} outside [0, ${vocabSize})`);
      }
      const slot = startSlot + i;
      const p = physical(slot);
      const position = work.startPosition + i;
      const value = kvValue(context, token, position, adapter);
      this.slots[p] = { token, position, adapterId: work.adapterId, value };
      context = extend(context, value);
      if (work.trackMass) this.accumulateMass(slot, read, physical);
    }
    if (!work.sample) return null;
    const lastSlot = end - 1;
    const token = sampleToken(read(lastSlot).value, work.sampling.seed, vocabSize);
    if (this.options.onSample) {
      const attended: FakeEntry[] = [];
      for (let slot = 0; slot <= lastSlot; slot++) attended.push(read(slot));
      this.options.onSample({
        seqId: work.seqId,
        position: work.startPosition + n - 1,
        adapterId: work.adapterId,
        attended,
        token,
      });
    }
    return token;
  }

  /** The query at `querySlot` spreads one unit of attention over keys 0 .. querySlot. */
  private accumulateMass(
    querySlot: number,
    read: (slot: number) => FakeEntry,
    physical: (slot: number) => number,
  ): void {
    let total = 0;
    for (let k = 0; k <= querySlot; k++) total += massWeight(read(k).value);
    for (let k = 0; k <= querySlot; k++) {
      this.mass[physical(k)] += massWeight(read(k).value) / total;
    }
  }

  private copyBlock(src: number, dst: number): void {
    this.checkBlock(src, `block copy ${src} -> ${dst}`);
    this.checkBlock(dst, `block copy ${src} -> ${dst}`);
    const B = this.options.blockSize;
    for (let i = 0; i < B; i++) this.slots[dst * B + i] = this.slots[src * B + i];
  }

  private checkBlock(block: number, where: string): void {
    if (!Number.isInteger(block) || block < 0 || block >= this.options.numBlocks) {
      throw new FakeExecutorError(
        `${where}: block ${block} is outside the pool of ${this.options.numBlocks}`,
      );
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The fine-tuning side

/** A DPO step's pair as the trainer sees it. */
export interface FakePairRef {
  item: { id: number };
}

/** A fine-tuning slice of an iteration, as the CoScheduler hands it out (FinetuneWork). */
export interface FakeSliceWork {
  slice: TrainingSlice;
  pairs: readonly FakePairRef[];
  startsStep: boolean;
}

/**
 * The fake trainer: checks the slice protocol and makes up losses. A pair's loss after its n-th
 * training is a fixed function of (pair id, n) in [0.05, 2.05): some pairs stay above a retrain
 * threshold, some fall below it.
 */
export class FakeTrainer {
  /** Pair id -> trainings completed (optimizer slices that included it). */
  readonly trainings = new Map<number, number>();
  /** Pair id -> the loss returned at each of its optimizer slices, in order. */
  readonly losses = new Map<number, number[]>();
  slicesIssued = 0;
  slicesCompleted = 0;
  optimizerSteps = 0;
  private readonly referenceCached = new Set<number>();
  private step: {
    pairIds: number[];
    expected: TrainingSlice[];
    issued: number;
    completed: number;
  } | null = null;

  constructor(readonly numLayers: number, readonly layersPerSlice: number) {}

  /** Whether the trainer holds a pair's reference log-probs (the live engine asks its trainer). */
  isReferenceCached(pairId: number): boolean {
    return this.referenceCached.has(pairId);
  }

  /**
   * A pair's first forward slice reads its reference log-probs on the CPU when it is encoded:
   * true when they are not there yet, so every iteration in flight must complete first (the
   * engine loop's needsDrain).
   */
  needsReference(work: FakeSliceWork): boolean {
    const slice = work.slice;
    if (slice.kind !== "forward" || slice.fromLayer !== 0) return false;
    return !this.referenceCached.has(work.pairs[slice.pair].item.id);
  }

  /** True while a step has slices issued and its optimizer slice has not completed. */
  get stepInProgress(): boolean {
    return this.step !== null;
  }

  /** Slices of the step in progress not issued yet (0 without one). */
  get slicesLeftInStep(): number {
    return this.step ? this.step.expected.length - this.step.issued : 0;
  }

  /** The slice is issued (submitted to the GPU). Throws on a protocol violation. */
  issue(work: FakeSliceWork): void {
    const ids = work.pairs.map((p) => p.item.id);
    if (work.startsStep) {
      if (this.step) {
        throw new FakeExecutorError(
          `a new DPO step starts while step [${this.step.pairIds}] has ${
            this.step.expected.length - this.step.completed
          } slice(s) not completed (its optimizer slice included)`,
        );
      }
      this.step = {
        pairIds: ids,
        expected: planDpoSlices(
          ids.map((id) => this.referenceCached.has(id)),
          this.numLayers,
          this.layersPerSlice,
        ),
        issued: 0,
        completed: 0,
      };
    } else if (!this.step) {
      throw new FakeExecutorError(`slice ${JSON.stringify(work.slice)} continues no DPO step`);
    }
    const step = this.step;
    if (ids.join(",") !== step.pairIds.join(",")) {
      throw new FakeExecutorError(
        `slice for pairs [${ids}] in the step of pairs [${step.pairIds}]`,
      );
    }
    const expected = step.expected[step.issued];
    if (this.needsReference(work)) {
      throw new FakeExecutorError(
        `forward slice of pair ${ids[work.slice.kind === "forward" ? work.slice.pair : 0]} ` +
          `issued before its reference log-probs were on the CPU (the loop must drain first)`,
      );
    }
    if (JSON.stringify(work.slice) !== JSON.stringify(expected)) {
      throw new FakeExecutorError(
        `slice ${step.issued} of the step of pairs [${step.pairIds}] is ` +
          `${JSON.stringify(work.slice)}, planned ${JSON.stringify(expected)}`,
      );
    }
    step.issued++;
    this.slicesIssued++;
  }

  /**
   * The slice completed (in issue order). Returns the per-pair losses after an optimizer slice,
   * in the step's pair order.
   */
  complete(work: FakeSliceWork): number[] | undefined {
    const step = this.step;
    if (!step || step.completed >= step.issued) {
      throw new FakeExecutorError("a slice completed that was not issued");
    }
    const slice = step.expected[step.completed++];
    this.slicesCompleted++;
    if (JSON.stringify(slice) !== JSON.stringify(work.slice)) {
      throw new FakeExecutorError("slices completed out of order");
    }
    if (slice.kind === "reference" && slice.toLayer === this.numLayers) {
      this.referenceCached.add(step.pairIds[slice.pair]);
    }
    if (slice.kind !== "optimizer") return undefined;
    this.step = null;
    this.optimizerSteps++;
    return step.pairIds.map((id) => {
      const n = (this.trainings.get(id) ?? 0) + 1;
      this.trainings.set(id, n);
      const loss = 0.05 + (finish(mix(mix(0x51ed270b, id), n)) % 2000) / 1000;
      this.losses.set(id, [...(this.losses.get(id) ?? []), loss]);
      return loss;
    });
  }

  /** The step in progress is abandoned (an iteration failed): the next one starts afresh. */
  abandonStep(): void {
    this.step = null;
  }

  /** Pairs that leave the queue for good drop their cached reference log-probs. */
  retire(pairIds: readonly number[]): void {
    for (const id of pairIds) this.referenceCached.delete(id);
  }
}
