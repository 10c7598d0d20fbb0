/** A Worker that counts its terminate() calls: whether a client ended the worker it was given. */
export class TrackedWorker extends Worker {
  terminated = 0;
  override terminate(): void {
    this.terminated++;
    super.terminate();
  }
}
