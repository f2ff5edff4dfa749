import { IncrementalDetokenizer } from "../tokenizer/detokenizer.js";
import type { Tokenizer } from "../tokenizer/tokenizer.js";
import type { BlockAllocation } from "./block-manager.js";
import type { SamplingParams } from "./sampling-params.js";
import { type FinishReason, StopConditions, StopStringMatcher } from "./stop.js";

/** What a sequence is for: generating text, or the teacher-forced logits of its prompt (nothing sampled). */
export type SequenceKind = "generate" | "logits";

/** What a sequence needs to know about the model and tokenizer to turn tokens into text and stop. */
export interface SequenceContext {
  tokenizer: Tokenizer;
  eosIds: readonly number[];
  contextLength: number;
}

/** performance.now() milliseconds; null until it happens. */
export interface SequenceTimes {
  arrival: number;
  admitted: number | null;
  firstToken: number | null;
  finished: number | null;
}

/** One request's state, from arrival to its end. */
export class Sequence {
  /** The prompt, then the generated tokens: position order, as the KV cache holds them. */
  readonly tokens: number[];
  readonly promptLen: number;
  /** Tokens whose K/V are in the cache. */
  computed = 0;
  /** Set at admission; released (emptied) at the end. */
  blocks: BlockAllocation | null = null;
  finishReason: FinishReason | null = null;
  cancelled = false;
  /** The completion text emitted so far. */
  text = "";
  /** log P(prompt[i] | prompt[..i]) for every prompt token (null for the first), when asked for. */
  readonly promptLogprobs: (number | null)[] | null;
  /** The logits at every prompt position, for a "logits" sequence. */
  readonly logitRows: Float32Array[] | null;
  readonly times: SequenceTimes = { arrival: performance.now(), admitted: null, firstToken: null, finished: null };

  private readonly stop: StopConditions;
  private readonly detokenizer: IncrementalDetokenizer;
  private readonly stopStrings: StopStringMatcher;
  private readonly tokenizer: Tokenizer;
  private stoppedByString = false;
  /** Generated tokens whose text detokenizeNext() has produced. */
  private detokenized = 0;

  constructor(
    prompt: readonly number[],
    readonly params: SamplingParams,
    readonly kind: SequenceKind,
    ctx: SequenceContext,
  ) {
    this.tokens = [...prompt];
    this.promptLen = prompt.length;
    this.promptLogprobs = params.promptLogprobs ? [null] : null;
    this.logitRows = kind === "logits" ? [] : null;
    this.stop = new StopConditions(params, ctx.eosIds, ctx.contextLength);
    this.tokenizer = ctx.tokenizer;
    // The prompt as context lets the first generated token decode as it would inside the whole text.
    const context = prompt.filter((id) => this.hasText(id));
    this.detokenizer = new IncrementalDetokenizer(ctx.tokenizer, { skipSpecialTokens: true, context });
    this.stopStrings = new StopStringMatcher(params.stop);
  }

  get generated(): number {
    return this.tokens.length - this.promptLen;
  }

  get output(): number[] {
    return this.tokens.slice(this.promptLen);
  }

  get inPrefill(): boolean {
    return this.computed < this.promptLen;
  }

  /** Prefill chunks must return every position's logits (and so can't be served from the prefix cache). */
  get needsPromptLogits(): boolean {
    return this.logitRows !== null || this.promptLogprobs !== null;
  }

  /**
   * Whether it samples tokens at all: not a "logits" sequence, nor a request for no tokens (maxTokens 0: its
   * prompt is computed into the cache, where the prefix cache keeps it for the requests that follow).
   * Either ends once its prompt is computed.
   */
  get samples(): boolean {
    return this.kind === "generate" && this.params.maxTokens > 0;
  }

  /** Whether a token is sampled once the cache holds `computedAfter` tokens. */
  samplesAt(computedAfter: number): boolean {
    return this.samples && computedAfter === this.tokens.length;
  }

  /**
   * Take the logits of prompt positions computed .. computed + count - 1: rows firstRow.. of `logits`
   * (rows of `vocab` floats).
   */
  takePromptLogits(logits: Float32Array, firstRow: number, count: number, vocab: number): void {
    for (let j = 0; j < count; j++) {
      const row = logits.subarray((firstRow + j) * vocab, (firstRow + j + 1) * vocab);
      const next = this.computed + j + 1;
      if (this.logitRows) this.logitRows.push(row.slice());
      if (this.promptLogprobs && next < this.promptLen) this.promptLogprobs.push(logprobOf(row, this.tokens[next]));
    }
  }

  /**
   * A sampled token, first pass (before the next step is built): a stop token ends the sequence unseen
   * (false); any other joins `tokens`, and the token budget may end the sequence ("length"). Its text, and
   * the stop strings that text may hold, come with detokenizeNext().
   */
  take(id: number): boolean {
    this.times.firstToken ??= performance.now();
    if (this.stop.isStopToken(id)) {
      this.finishReason = "stop";
      return false;
    }
    this.tokens.push(id);
    if (this.stop.lengthReached(this.promptLen, this.generated)) this.finishReason = "length";
    return true;
  }

  /**
   * The text that became final with the oldest taken token not yet detokenized (null when none is left). A
   * stop string in it ends the sequence there: the tokens taken after it are dropped.
   */
  detokenizeNext(): string | null {
    if (this.promptLen + this.detokenized === this.tokens.length) return null;
    const id = this.tokens[this.promptLen + this.detokenized++];
    const out = this.stopStrings.push(this.hasText(id) ? this.detokenizer.push(id) : "");
    this.text += out.text;
    if (out.stopped) {
      this.stoppedByString = true;
      this.finishReason = "stop";
      this.tokens.length = this.promptLen + this.detokenized;
    }
    return out.text;
  }

  /** End the sequence; returns the text held back until now ("" after a stop string: nothing follows it). */
  finish(reason: FinishReason): string {
    this.finishReason = reason;
    this.times.finished = performance.now();
    if (this.stoppedByString || this.kind === "logits") return "";
    const tail = this.stopStrings.push(this.detokenizer.flush());
    if (tail.stopped && reason === "length") this.finishReason = "stop";
    const rest = tail.text + this.stopStrings.flush();
    this.text += rest;
    return rest;
  }

  /** A model's vocabulary may be larger than its tokenizer's (padded embeddings): such ids have no text. */
  private hasText(id: number): boolean {
    return this.tokenizer.idToToken(id) !== null;
  }
}

/** log_softmax(row)[id], in float64. */
function logprobOf(row: Float32Array, id: number): number {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  return row[id] - max - Math.log(sum);
}
