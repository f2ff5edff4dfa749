/**
 * A push-to-pull queue between the engine loop, which pushes a request's events as steps complete, and the
 * one consumer that pulls them with `for await`. Unbounded: events are small and a request's count is
 * bounded by its maxTokens.
 */
export class EventChannel<T> {
  private readonly items: T[] = [];
  private ended = false;
  private error: unknown = undefined;
  private wake: (() => void) | null = null;

  push(item: T): void {
    this.items.push(item);
    this.notify();
  }

  /** No more items; with an error, the consumer gets it after the items already pushed. */
  end(error?: unknown): void {
    this.ended = true;
    this.error = error;
    this.notify();
  }

  /** Every item pushed since the last batch, at once: one wake-up for a step's worth of events. */
  async *batches(): AsyncGenerator<T[]> {
    for (;;) {
      if (this.items.length > 0) {
        yield this.items.splice(0);
      } else if (this.ended) {
        if (this.error !== undefined) throw this.error;
        return;
      } else {
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T> {
    for await (const batch of this.batches()) yield* batch;
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }
}
