import type { Rng } from "../model/random.js";

/** One /infill request of an editor: its body, and whether it only warms the cache (n_predict 0). */
export interface EditorRequest {
  body: object;
  warmup: boolean;
}

/**
 * Chunks of other files an editor sends with every request: llama.vscode keeps up to 16 of 64 lines, made
 * smaller here, as for a model of a 2,048-token context (half of which the server gives to chunks).
 */
export const RING_CHUNKS = 8;
export const CHUNK_LINES = 16;
/** Every this many completions a new chunk enters the ring, announced by a warm-up request first. */
const RING_EVERY = 8;
/** About the tokens of a line below, for sizing the prefix and suffix from a token count. */
const TOKENS_PER_LINE = 10;

/**
 * The requests of one editor session, as llama.vscode sends them to /infill: the text around a cursor where
 * a line is written before each completion (three quarters of `promptTokens` before it, a quarter after),
 * with a ring of chunks from other files as input_extra. Now and then a chunk enters the ring (the oldest
 * leaves), and the editor first sends the new ring alone with n_predict 0, so that the server computes it
 * ahead of the completions that follow. The text is random code-like lines: only its size and its reuse
 * from one request to the next matter here.
 */
export function editorSession(rng: Rng, promptTokens: number, genTokens: number): () => EditorRequest {
  const line = () => {
    const n = () => rng.nextU32() % 1000;
    return `    v${n()} = f${n()}(v${n()}, ${n()})\n`;
  };
  const lines = (count: number) => Array.from({ length: count }, line);
  const before = Math.max(1, Math.round((0.75 * promptTokens) / TOKENS_PER_LINE));
  const after = Math.max(1, Math.round((0.25 * promptTokens) / TOKENS_PER_LINE));
  const written = lines(before); // before the cursor
  const rest = lines(after).join(""); // after it
  const chunk = (i: number) => ({ filename: `file${i}.py`, text: lines(CHUNK_LINES).join("") });
  const ring = Array.from({ length: RING_CHUNKS }, (_, i) => chunk(i));
  let made = ring.length;
  let completions = 0;
  let warmed = true;
  return () => {
    if (completions > 0 && completions % RING_EVERY === 0 && warmed) {
      ring.shift();
      ring.push(chunk(made++));
      warmed = false;
      return { body: { input_extra: [...ring], input_prefix: "", input_suffix: "", n_predict: 0 }, warmup: true };
    }
    warmed = true;
    completions++;
    written.push(line());
    const body = {
      input_extra: [...ring],
      input_prefix: written.slice(-before).join(""),
      input_suffix: rest,
      n_predict: genTokens,
      temperature: 0,
      ignore_eos: true, // every completion generates exactly genTokens tokens
      stream: true,
    };
    return { body, warmup: false };
  };
}
