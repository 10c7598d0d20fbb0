/**
 * A bounded event pump for Dawn's Node bindings (the `webgpu` package) under Deno.
 *
 * dawn.node delivers GPU callbacks (mapAsync, onSubmittedWorkDone, device errors) only from its
 * "async runner": while any of its promises is pending it calls `globalThis.setImmediate(tick)`,
 * where `tick` is a new native function each time that processes Dawn's events and queues the
 * next tick. Left alone that is a busy poll: about 1,400 ticks per decode step on SwiftShader.
 * Each tick function carries an N-API finalizer, and Deno's N-API keeps finalizers in one list
 * that it unregisters from by a linear search and a remove when the GC collects the function:
 * a major GC that collects n tick functions holds the JS thread for O(n^2) time (measured:
 * 0.3 s at n = 20,000, 1.1 s at 40,000, 4 s at 80,000). Those were the multi-second "Dawn
 * stalls", the JS thread at 100% and the emulated GPU idle (docs/backends.md).
 *
 * This pump decides when each of those ticks runs (every other setImmediate call is untouched).
 * It times every wait: from the call of one of Dawn's async methods to its promise settling.
 *  - A wait on an object that has waited before (a readback buffer, the queue) sleeps through
 *    EXPECT_FRACTION of the fastest of its last HISTORY waits, with no tick while the GPU works,
 *    then polls on the timer below.
 *  - A wait with no history starts with SPIN_TICKS ticks back to back (a result already done
 *    needs two: one notices the work finished, one delivers it), then polls on the timer.
 *  - The timer waits an eighth of the time waited, 1 to 16 ms: the added latency stays within
 *    an eighth of the wait plus a timer's resolution.
 * The next tick serves the most urgent pending wait. Measured on SwiftShader: 2.5 ticks per
 * pipelined decode step (two readbacks each), where a plain backoff took 6.9 and dawn.node's
 * own loop about 1,400; a 100 ms wait with no history takes 32 ticks. The JS thread sleeps
 * instead of spinning (an emulated GPU gets the core back).
 */

/** Ticks run back to back when a wait with no history starts. */
const SPIN_TICKS = 2;
/** Then each tick waits this fraction of the time waited so far... */
const BACKOFF = 1 / 8;
/** ...but at least a timer's resolution... */
const MIN_DELAY_MS = 1;
/** ...and at most this long, so a long wait still ends within 16 ms of its work. */
const MAX_DELAY_MS = 16;
/**
 * A wait first sleeps this fraction of the fastest recent wait on the same object (0.8 took 3.0
 * ticks a step, 0.95 took 2.1)... Below 1, so that waits that got faster are seen, and learned.
 */
const EXPECT_FRACTION = 0.9;
/** ...of its last this many. */
const HISTORY = 8;

/** The promise-returning methods of dawn.node's classes: each call is a wait. */
const ASYNC_METHODS: Record<string, readonly string[]> = {
  GPU: ["requestAdapter"],
  GPUAdapter: ["requestDevice"],
  GPUDevice: ["createComputePipelineAsync", "createRenderPipelineAsync", "popErrorScope"],
  GPUBuffer: ["mapAsync"],
  GPUQueue: ["onSubmittedWorkDone"],
  GPUShaderModule: ["getCompilationInfo"],
};

const INSTALLED = Symbol.for("mace.dawnEventPump");

type Immediate = (callback: (...args: unknown[]) => void, ...args: unknown[]) => unknown;

/** Dawn ticks the pump scheduled since it was installed (for tests and measurements). */
export const pumpStats = { ticks: 0 };

/**
 * The delay before poll number `tick` (0-based) of a wait begun `waitedMs` ago, whose first
 * `spin` polls run at once.
 */
export function tickDelay(tick: number, waitedMs: number, spin = SPIN_TICKS): number {
  if (tick < spin) return 0;
  return Math.min(MAX_DELAY_MS, Math.max(MIN_DELAY_MS, waitedMs * BACKOFF));
}

/**
 * Dawn's ticks are native functions without a name, queued with no arguments: JS code cannot
 * make such a function (bound functions are named "bound ..."), built-ins all have names, and
 * dawn.node is the only native addon the engine loads.
 */
export function isDawnTick(callback: unknown, args: readonly unknown[]): boolean {
  return typeof callback === "function" && args.length === 0 && callback.name === "" &&
    Function.prototype.toString.call(callback) === "function () { [native code] }";
}

/** One pending call of a Dawn async method. */
interface Wait {
  start: number;
  /** When polling starts: `start`, or later when this object's waits took at least that. */
  due: number;
  /** Ticks scheduled for it since it was due. */
  polls: number;
}

/** Pending waits and how long past waits on each object took. */
export class WaitBook {
  readonly pending = new Set<Wait>();
  private readonly history = new WeakMap<object, Map<string, number[]>>();

  begin(owner: object, method: string, now: number): Wait {
    const recent = this.history.get(owner)?.get(method);
    const expected = recent ? EXPECT_FRACTION * Math.min(...recent) : 0;
    const wait = { start: now, due: now + expected, polls: 0 };
    this.pending.add(wait);
    return wait;
  }

  end(owner: object, method: string, wait: Wait, now: number): void {
    this.pending.delete(wait);
    let methods = this.history.get(owner);
    if (!methods) this.history.set(owner, methods = new Map());
    const recent = methods.get(method) ?? [];
    recent.push(now - wait.start);
    if (recent.length > HISTORY) recent.shift();
    methods.set(method, recent);
  }

  /**
   * The delay before the next tick, counting it as a poll of every wait it serves; null when
   * nothing known is pending (the caller then treats the tick as a wait of its own).
   */
  nextDelay(now: number): number | null {
    let delay: number | null = null;
    for (const wait of this.pending) {
      // A wait that slept through its expected time is (nearly) done: no spin.
      const spin = wait.due > wait.start ? 0 : SPIN_TICKS;
      const own = now < wait.due ? wait.due - now : tickDelay(wait.polls, now - wait.start, spin);
      if (delay === null || own < delay) delay = own;
    }
    if (delay !== null) {
      for (const wait of this.pending) if (now + delay >= wait.due) wait.polls++;
    }
    return delay;
  }
}

/**
 * Installs the pump (once per process) before dawn.node queues its first tick: takes over
 * `globalThis.setImmediate` for Dawn's ticks (every other call goes to the original unchanged)
 * and times the waits of the async methods of `globals` (dawn.node's classes). The promises
 * those methods return are the same objects; the pump only observes them settling.
 */
export function installDawnEventPump(globals: Record<string, unknown>): void {
  const global = globalThis as unknown as Record<PropertyKey, unknown> & {
    setImmediate: Immediate;
  };
  if (global[INSTALLED]) return;
  global[INSTALLED] = true;
  const book = new WaitBook();
  for (const [className, methods] of Object.entries(ASYNC_METHODS)) {
    const proto = (globals[className] as { prototype?: Record<string, unknown> } | undefined)
      ?.prototype;
    for (const name of methods) {
      const method = proto?.[name];
      if (typeof method !== "function") continue;
      proto![name] = function (this: object, ...args: unknown[]) {
        const wait = book.begin(this, name, performance.now());
        const settled = () => book.end(this, name, wait, performance.now());
        let promise: Promise<unknown>;
        try {
          promise = method.apply(this, args);
        } catch (error) {
          book.pending.delete(wait);
          throw error;
        }
        // Observing a rejection marks it handled here; the caller still gets it from `promise`.
        promise.then(settled, settled);
        return promise;
      };
    }
  }
  const original = global.setImmediate;
  // Ticks with no known wait pending (Dawn's own work, a method not listed) back off as one wait
  // per chain of ticks; a tick queued from outside a tick starts a chain.
  let inTick = false;
  let chain = { start: 0, ticks: 0 };
  const run = (callback: () => void) => {
    inTick = true;
    try {
      callback();
    } finally {
      inTick = false;
    }
  };
  global.setImmediate = (callback, ...args) => {
    if (!isDawnTick(callback, args)) return original(callback, ...args);
    pumpStats.ticks++;
    if (!inTick) chain = { start: performance.now(), ticks: 0 };
    // Decide after the current task's promise callbacks ran: a wait that the last tick ended is
    // off the book by then, and the next tick serves the ones still pending.
    return original(() => {
      const now = performance.now();
      const delay = book.nextDelay(now) ?? tickDelay(chain.ticks++, now - chain.start);
      if (delay === 0) run(callback);
      else setTimeout(() => run(callback), delay);
    });
  };
}
