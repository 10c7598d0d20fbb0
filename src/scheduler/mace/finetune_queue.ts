/**
 * The feedback pairs waiting for fine-tuning, with what the scheduler knows of each: when it
 * arrived, how often it was trained, and its latest DPO loss. A pair that was never trained has
 * the loss of a fresh (zero-B) adapter, ln 2, exactly; after each training its measured loss
 * replaces that, and it is trained again while the loss stays above a threshold (up to a limit).
 */

export const FRESH_DPO_LOSS = Math.LN2;

export interface FeedbackItem<T> {
  id: number;
  /** Tokens of its two sequences: prompt + chosen + prompt + rejected. */
  tokens: number;
  /** What the executor needs to train it (token ids live; nothing in the simulator). */
  payload: T;
}

export interface QueuedPair<T> {
  item: FeedbackItem<T>;
  arrivedAt: number;
  /** Eligible since (arrival, or the end of its last training). */
  readySince: number;
  loss: number;
  trainings: number;
  /** In the DPO step being run. */
  inStep: boolean;
}

export interface SelectOptions {
  /** Weight γ of the latest DPO loss. */
  gamma: number;
  agingPerS: number;
  /** Highest priority first when true, else first come first served. */
  byPriority: boolean;
}

export class FinetuneQueue<T> {
  private readonly pairs: QueuedPair<T>[] = [];
  /** Received and not trained yet (staleness). */
  private untrainedCount = 0;

  constructor(private readonly retrainAboveLoss: number, private readonly maxTrainings: number) {}

  add(item: FeedbackItem<T>, now: number): void {
    this.pairs.push({
      item,
      arrivedAt: now,
      readySince: now,
      loss: FRESH_DPO_LOSS,
      trainings: 0,
      inStep: false,
    });
    this.untrainedCount++;
  }

  /** Pairs that can go into a new step. */
  eligible(): QueuedPair<T>[] {
    return this.pairs.filter((p) => !p.inStep);
  }

  get size(): number {
    return this.pairs.length;
  }

  get untrained(): number {
    return this.untrainedCount;
  }

  /** P_ft_total of one pair: aging by time waited + γ · L_DPO. */
  static priority<T>(p: QueuedPair<T>, now: number, o: SelectOptions): number {
    return o.agingPerS * Math.max(0, now - p.readySince) / 1000 + o.gamma * p.loss;
  }

  /** Takes up to `n` eligible pairs for a step (marked inStep), best first. */
  take(
    n: number,
    now: number,
    o: SelectOptions,
    among: QueuedPair<T>[] = this.eligible(),
  ): QueuedPair<T>[] {
    const ranked = o.byPriority
      ? [...among].sort((a, b) =>
        FinetuneQueue.priority(b, now, o) - FinetuneQueue.priority(a, now, o) ||
        a.item.id - b.item.id
      )
      : among;
    const chosen = ranked.slice(0, n);
    for (const p of chosen) p.inStep = true;
    return chosen;
  }

  /**
   * A step over `pairs` finished with these per-pair losses (measured in its forward slices):
   * each pair leaves the queue, or stays for another training while its loss is high. Returns
   * the pairs that left.
   */
  trained(
    pairs: readonly QueuedPair<T>[],
    losses: readonly number[],
    now: number,
  ): QueuedPair<T>[] {
    const retired: QueuedPair<T>[] = [];
    pairs.forEach((p, i) => {
      if (p.trainings === 0) this.untrainedCount--;
      p.trainings++;
      p.loss = Number.isFinite(losses[i]) ? losses[i] : p.loss;
      p.inStep = false;
      p.readySince = now;
      if (p.trainings >= this.maxTrainings || p.loss <= this.retrainAboveLoss) {
        this.pairs.splice(this.pairs.indexOf(p), 1);
        retired.push(p);
      }
    });
    return retired;
  }

  /** Returns the pairs of an abandoned step to the queue untouched. */
  release(pairs: readonly QueuedPair<T>[]): void {
    for (const p of pairs) p.inStep = false;
  }
}
