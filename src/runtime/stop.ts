import type { SamplingParams } from "./sampling-params.js";

export type FinishReason = "stop" | "length" | "abort";

/** The token-level stop rules of one request: stop tokens, its token budget, the model's context length. */
export class StopConditions {
  private readonly stopIds: Set<number>;
  private readonly maxTokens: number;

  constructor(
    params: SamplingParams,
    /** The model's end-of-sequence ids (config and tokenizer together). */
    eosIds: readonly number[],
    private readonly contextLength: number,
  ) {
    this.maxTokens = params.maxTokens;
    this.stopIds = new Set(params.ignoreEos ? params.stopTokenIds : [...eosIds, ...params.stopTokenIds]);
  }

  isStopToken(id: number): boolean {
    return this.stopIds.has(id);
  }

  /** Whether a sequence of `promptLen` + `generated` tokens must end ("length"). */
  lengthReached(promptLen: number, generated: number): boolean {
    return generated >= this.maxTokens || promptLen + generated >= this.contextLength;
  }
}

/**
 * Finds stop strings in streamed text, also where one spans several tokens. The stop string and anything
 * after it are never emitted: a tail of the text that could still grow into a stop string is held back
 * until the next text decides it. An occurrence can't start inside text already emitted, because such a
 * start would have been held back, so searching the held text plus the new text is enough.
 */
export class StopStringMatcher {
  private held = "";

  constructor(private readonly stops: readonly string[]) {}

  /** Feed newly final text; returns the text safe to emit now, and whether a stop string ended it. */
  push(text: string): { text: string; stopped: boolean } {
    const buf = this.held + text;
    const at = this.firstStop(buf);
    if (at >= 0) {
      this.held = "";
      return { text: buf.slice(0, at), stopped: true };
    }
    const keep = this.pendingTail(buf);
    this.held = buf.slice(buf.length - keep);
    return { text: buf.slice(0, buf.length - keep), stopped: false };
  }

  /** The held-back text, released at the end of generation (no stop string can complete any more). */
  flush(): string {
    const rest = this.held;
    this.held = "";
    return rest;
  }

  private firstStop(buf: string): number {
    let first = -1;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (first < 0 || i < first)) first = i;
    }
    return first;
  }

  /** The length of the longest tail of `buf` that begins some stop string. */
  private pendingTail(buf: string): number {
    let longest = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length - 1, buf.length); k > longest; k--) {
        if (buf.endsWith(s.slice(0, k))) {
          longest = k;
          break;
        }
      }
    }
    return longest;
  }
}
