/**
 * The two stop rules llama.cpp's /infill adds to the usual ones, which editor plugins (llama.vscode) send
 * with every completion:
 * - t_max_predict_ms: once generation has run this long since its first token and its text holds a newline,
 *   it stops, so that an editor gets whole lines in bounded time;
 * - n_indent: a line after the first that starts less indented than this (spaces and tabs) ends the
 *   completion before its first other character: the completion stays inside the block being written.
 * Both stop as llama.cpp's "limit". The generated text passes through cut() in order, as it is made (a
 * backend call's tokens at a time); it returns what to keep and, once a rule has fired, nothing: the
 * request is then cancelled through `signal`.
 */
export class InfillStops {
  private readonly controller = new AbortController();
  private first: number | null = null;
  private newline = false;
  /** Inside the indentation of a line after a newline, and how deep so far. */
  private atLineStart = false;
  private indent = 0;

  constructor(
    private readonly maxPredictMs: number,
    private readonly minIndent: number,
    private readonly now: () => number = () => performance.now(),
  ) {}

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Whether a rule ended the completion. */
  get reached(): boolean {
    return this.controller.signal.aborted;
  }

  cut(text: string): string {
    if (this.reached) return "";
    const now = this.now();
    this.first ??= now;
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (c === "\n") {
        this.newline = this.atLineStart = true;
        this.indent = 0;
      } else if (this.atLineStart && (c === " " || c === "\t")) {
        this.indent++;
      } else if (this.atLineStart) {
        this.atLineStart = false;
        if (this.indent < this.minIndent) {
          this.controller.abort();
          return text.slice(0, i);
        }
      }
    }
    if (this.maxPredictMs > 0 && this.newline && now - this.first > this.maxPredictMs) this.controller.abort();
    return text;
  }
}
