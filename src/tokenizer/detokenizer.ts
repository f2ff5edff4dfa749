import type { Tokenizer } from "./tokenizer.js";

const REPLACEMENT = "\uFFFD";

/** Prompt tokens kept as decoding context: enough for any decoder's dependence on its neighbours. */
const CONTEXT_TOKENS = 4;

/** Held-back tokens beyond this make the window try to shrink (see shortenWindow). */
const MAX_PENDING = 4;

/**
 * Streams text as tokens arrive. Each push returns the text that is now final; all pushes together (and
 * flush, at the end) give exactly tokenizer.decode(all ids, { skipSpecialTokens }).
 *
 * The usual technique (TGI, vLLM): decode a short window, the previous step's tokens as context plus the
 * new ones, and emit what it adds beyond the context's text. Decoding in context keeps decoders that look
 * at neighbours right (sentencepiece drops the leading space of the first token only), and the window
 * stays a few tokens long, so a push costs the same at token 10 and at token 10,000.
 *
 * A character whose UTF-8 bytes are split across tokens decodes to U+FFFD until its last byte arrives, so
 * a trailing U+FFFD is held back. Everything before it is final already (a UTF-8 decoder never revises
 * what precedes an unfinished sequence), so a genuine U+FFFD comes out with the next token, or from flush.
 */
export class IncrementalDetokenizer {
  private readonly skipSpecialTokens: boolean;
  /** The tokens decoded each push; older ones are dropped. */
  private window: number[];
  /** Tokens of the window before this are context: emitted already, decoded again for their effect. */
  private readOffset: number;
  /** How much of decode(window) has been emitted, in UTF-16 code units. */
  private emitted: number;

  constructor(
    private readonly tokenizer: Tokenizer,
    opts: { skipSpecialTokens?: boolean; context?: number[] } = {},
  ) {
    this.skipSpecialTokens = opts.skipSpecialTokens ?? false;
    // Prompt ids may include some the tokenizer lacks (a model's padded vocabulary): context needs none.
    const usable = (id: number) => tokenizer.idToToken(id) !== null && !this.skipped(id);
    this.window = (opts.context ?? []).filter(usable).slice(-CONTEXT_TOKENS);
    this.readOffset = this.window.length;
    this.emitted = this.tokenizer.decode(this.window).length;
  }

  push(id: number): string {
    // Skipped tokens are left out of the window, as decode leaves them out before its decoder runs: a
    // window of skipped tokens alone would otherwise lose its context.
    if (this.skipped(id)) return "";
    this.window.push(id);
    const text = this.tokenizer.decode(this.window);
    const pending = text.endsWith(REPLACEMENT);
    const out = this.emit(text, pending ? text.length - 1 : text.length);
    if (!pending) {
      this.advance();
    } else if (this.window.length - this.readOffset > MAX_PENDING) {
      this.shortenWindow(text);
    }
    return out;
  }

  /** The rest of the text, a held-back U+FFFD included: call it when the stream ends. */
  flush(): string {
    const out = this.emit(this.tokenizer.decode(this.window), Infinity);
    this.advance();
    return out;
  }

  private skipped(id: number): boolean {
    return this.skipSpecialTokens && this.tokenizer.isSpecial(id);
  }

  private emit(text: string, end: number): string {
    const out = text.slice(this.emitted, end);
    this.emitted += out.length;
    return out;
  }

  /** All emitted: this step's tokens become the context of the next. */
  private advance(): void {
    this.window = this.window.slice(this.readOffset);
    this.readOffset = this.window.length;
    this.emitted = this.tokenizer.decode(this.window).length;
  }

  /**
   * Bytes that never complete a character (a model emitting garbage) would keep the tail pending and the
   * window growing. Cut it before the newest token where that boundary is clean: if decoding the two sides
   * apart gives the same text as decoding them together, no character spans the boundary, so they will
   * decode independently from now on too.
   */
  private shortenWindow(text: string): void {
    const cut = this.window.length - 1;
    const head = this.tokenizer.decode(this.window.slice(0, cut));
    if (head.length > this.emitted || head + this.tokenizer.decode(this.window.slice(cut)) !== text) return;
    this.window = this.window.slice(cut);
    this.readOffset = 0;
    this.emitted -= head.length;
  }
}
