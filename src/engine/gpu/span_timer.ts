/**
 * GPU time of a span of queue work (one engine iteration: a serving step and a DPO slice), by
 * timestamp queries: an empty compute pass writes a timestamp before the span's first submit and
 * another after its last, then both are resolved and read back. Pipelined iterations overlap on
 * the CPU side but run one after another on the queue, so each span's two timestamps bound its
 * own GPU work only. Needs the 'timestamp-query' feature (create() returns null without it).
 *
 * Buffers: a query set of 2 * MAX_SPANS timestamps; a resolve buffer with one 256-byte-aligned
 * slot of two u64 per span; a pool of 16-byte mappable readbacks, reused.
 */
import type { GpuContext } from "./context.ts";

/** Spans open at once (far more than the loop keeps in flight). */
const MAX_SPANS = 32;
/** resolveQuerySet's destination offset must be a multiple of 256. */
const RESOLVE_STRIDE = 256;

/** A span begun and not ended yet. */
export interface Span {
  slot: number;
}

export class SpanTimer {
  private readonly free: number[] = Array.from({ length: MAX_SPANS }, (_, i) => i);
  private readonly readbacks: GPUBuffer[] = [];

  private constructor(
    private readonly ctx: GpuContext,
    private readonly querySet: GPUQuerySet,
    private readonly resolve: GPUBuffer,
  ) {}

  static create(ctx: GpuContext): SpanTimer | null {
    if (!ctx.features.timestampQuery) return null;
    const querySet = ctx.device.createQuerySet({ type: "timestamp", count: 2 * MAX_SPANS });
    const resolve = ctx.device.createBuffer({
      size: RESOLVE_STRIDE * MAX_SPANS,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
      label: "span timer resolve",
    });
    return new SpanTimer(ctx, querySet, resolve);
  }

  /** Submits the span's start marker; call before the span's first submit. Null if all busy. */
  begin(): Span | null {
    const slot = this.free.pop();
    if (slot === undefined) return null;
    const encoder = this.ctx.device.createCommandEncoder({ label: "span begin" });
    this.marker(encoder, 2 * slot);
    this.ctx.device.queue.submit([encoder.finish()]);
    return { slot };
  }

  /**
   * Submits the span's end marker (after its last submit) and the copy of both timestamps;
   * resolves with the GPU ms between them once the queue has reached them.
   */
  async end(span: Span): Promise<number> {
    const { slot } = span;
    const encoder = this.ctx.device.createCommandEncoder({ label: "span end" });
    this.marker(encoder, 2 * slot + 1);
    encoder.resolveQuerySet(this.querySet, 2 * slot, 2, this.resolve, RESOLVE_STRIDE * slot);
    const readback = this.readbacks.pop() ?? this.ctx.device.createBuffer({
      size: 16,
      usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST,
      label: "span timer readback",
    });
    encoder.copyBufferToBuffer(this.resolve, RESOLVE_STRIDE * slot, readback, 0, 16);
    this.ctx.device.queue.submit([encoder.finish()]);
    try {
      await readback.mapAsync(GPUMapMode.READ);
      const [start, stop] = new BigUint64Array(readback.getMappedRange());
      readback.unmap();
      // Timestamps are ns; a driver may clamp a non-monotonic pair, never report it negative.
      return stop > start ? Number(stop - start) / 1e6 : 0;
    } finally {
      this.readbacks.push(readback);
      this.free.push(slot);
    }
  }

  destroy(): void {
    this.querySet.destroy();
    this.resolve.destroy();
    for (const b of this.readbacks) b.destroy();
  }

  /** An empty compute pass whose only job is to write timestamp `index`. */
  private marker(encoder: GPUCommandEncoder, index: number): void {
    encoder.beginComputePass({
      timestampWrites: { querySet: this.querySet, beginningOfPassWriteIndex: index },
    }).end();
  }
}
