/**
 * Dawn's Node bindings (the `webgpu` package) resolve GPU promises only while they poll, and
 * each poll takes the JS thread (dawn_event_pump.ts keeps the polls few and on timers). On a
 * CPU-emulated adapter (SwiftShader) the JS thread competes with the emulated GPU for the cores,
 * so on such adapters the runner first sleeps for most of the step's expected time, with no
 * Dawn promise pending, then awaits.
 *
 * The expectation is learned per step size (a power-of-two bucket of the step's token count):
 * the fastest of the last WINDOW measured step times, slept at SLEEP_FRACTION of it. The minimum
 * ignores one-off slow steps (a first-use pipeline compile took seconds and, as an average,
 * kept later steps oversleeping for minutes); oversleeping corrects itself at once, because a
 * step that finished early is measured at the sleep length and becomes the new minimum.
 */
const SLEEP_FRACTION = 0.8;
const WINDOW = 8;

export class ReadbackPacer {
  private readonly recent = new Map<number, number[]>();

  constructor(readonly enabled: boolean) {}

  /** Sleeps for most of the expected time of a `tokens`-token step submitted at `submittedAt`. */
  async beforeWait(tokens: number, submittedAt: number): Promise<void> {
    if (!this.enabled) return;
    const times = this.recent.get(bucket(tokens));
    if (times === undefined) return;
    const remaining = SLEEP_FRACTION * Math.min(...times) - (performance.now() - submittedAt);
    if (remaining >= 1) await new Promise((resolve) => setTimeout(resolve, remaining));
  }

  /** Records the measured submit-to-result time of a step of `tokens` tokens. */
  record(tokens: number, ms: number): void {
    if (!this.enabled) return;
    const key = bucket(tokens);
    const times = this.recent.get(key) ?? [];
    times.push(ms);
    if (times.length > WINDOW) times.shift();
    this.recent.set(key, times);
  }
}

function bucket(tokens: number): number {
  return Math.ceil(Math.log2(Math.max(1, tokens)));
}
