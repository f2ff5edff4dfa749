import { Lru } from "../lru.js";
import { fimAround } from "../tokenizer/fim.js";
import { LineEncoder } from "../tokenizer/line-encoder.js";
import type { Tokenizer } from "../tokenizer/tokenizer.js";
import type { InfillBody } from "./requests.js";

/** An /infill prompt, and whether anything of the request had to be left out of it. */
export interface InfillPrompt {
  ids: number[];
  truncated: boolean;
}

/** Chunk encodings kept: a few editors' rings (llama.vscode keeps 16 chunks by default). */
const CHUNKS_KEPT = 256;
/** Line encodings kept for prefixes and suffixes: a few editors' 256 lines before the cursor and 64 after. */
const LINES_KEPT = 8192;

/**
 * /infill's prompt: other files' text (input_extra) first, each after StarCoder's <filename> token where the
 * tokenizer has one (else llama.cpp's plain-text separator), then the fill-in-the-middle prompt, whose
 * prefix `prompt` continues. Editor plugins send more context than a 2,048-token model holds (llama.vscode a
 * ring of 16 chunks of 64 lines), and llama.cpp fits it to the context rather than refuse it, so this does
 * too: the completion keeps up to a quarter of the context; the chunks get up to half of it, the newest
 * that fit whole, in their order, chosen whatever the request's own text, so that a warm-up (n_predict 0)
 * and the completions after it start with the same chunks and share their cache; the prefix's end and the
 * suffix's start take the rest (the suffix at least a quarter of it where both are long).
 *
 * The same chunks come back request after request, so their encodings are kept: tokenizing a ring of them
 * took 40-50 ms of the one JavaScript thread here each time. So do the lines around the cursor, which the
 * prefix and suffix are encoded by (LineEncoder): a key typed changes one of them.
 */
export class InfillPrompter {
  private readonly chunks = new Lru<string, number[]>(CHUNKS_KEPT);
  private readonly lines: LineEncoder;
  private readonly fileToken: number | null;

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly contextLength: number,
  ) {
    this.fileToken = tokenizer.tokenToId("<filename>");
    this.lines = new LineEncoder(tokenizer, LINES_KEPT);
  }

  /** The prompt of a request that will generate `nPredict` tokens (-1: to the end of the context). */
  build(body: InfillBody, nPredict: number): InfillPrompt {
    const reserve = nPredict === 0 ? 0 : Math.min(nPredict < 0 ? Infinity : nPredict, Math.floor(this.contextLength / 4));
    let extraRoom = Math.floor(this.contextLength / 2);
    const chunks: number[][] = [];
    for (let i = body.input_extra.length - 1; i >= 0; i--) {
      const ids = this.chunk(body.input_extra[i]);
      if (ids.length > extraRoom) break;
      chunks.unshift(ids);
      extraRoom -= ids.length;
    }
    const extra = chunks.flat();

    const room = this.contextLength - reserve - extra.length - 3; // the three FIM tokens
    const prefix = this.lines.encode(body.input_prefix + body.prompt);
    const suffix = this.lines.encode(body.input_suffix);
    const suffixTake = Math.min(suffix.length, Math.max(room - prefix.length, Math.floor(room / 4)));
    const prefixTake = Math.max(0, Math.min(prefix.length, room - suffixTake));
    const fim = fimAround(this.tokenizer, prefix.slice(prefix.length - prefixTake), suffix.slice(0, suffixTake));
    const truncated = prefixTake < prefix.length || suffixTake < suffix.length || chunks.length < body.input_extra.length;
    return { ids: [...extra, ...fim], truncated };
  }

  private encode(text: string): number[] {
    return this.tokenizer.encode(text, { addSpecialTokens: false });
  }

  private chunk({ filename, text }: InfillBody["input_extra"][number]): number[] {
    const file = this.fileToken;
    return this.chunks.get(`${filename}\u0000${text}`, () =>
      file === null ? this.encode(`\n\n--- snippet ---\n\n${text}`) : [file, ...this.encode(`${filename}\n${text}`)],
    );
  }
}
