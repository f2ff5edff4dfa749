import type { TokenEvent } from "../runtime/engine.js";
import { IncrementalDetokenizer } from "../tokenizer/detokenizer.js";
import type { Tokenizer } from "../tokenizer/tokenizer.js";

/**
 * Log-probabilities in OpenAI's two formats. A token is shown as its own decoded text (special tokens
 * included); a byte of an unfinished UTF-8 character shows as U+FFFD.
 */

/** The completions API's: parallel arrays over tokens, offsets into the choice's text. */
export interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: (number | null)[];
  /** The token's most likely alternatives and the token itself (so up to logprobs + 1 entries). */
  top_logprobs: (Record<string, number> | null)[];
  text_offset: number[];
}

/** Generated tokens, the first of whose text starts at `offset` in the choice's text. */
export function completionLogprobs(tokenizer: Tokenizer, events: TokenEvent[], offset: number): CompletionLogprobs {
  const lp: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  for (const e of events) {
    const token = tokenText(tokenizer, e.id);
    const top: Record<string, number> = {};
    for (const alt of e.top ?? []) top[tokenText(tokenizer, alt.id)] ??= alt.logprob;
    top[token] ??= e.logprob;
    lp.tokens.push(token);
    lp.token_logprobs.push(e.logprob);
    lp.top_logprobs.push(top);
    lp.text_offset.push(offset);
    offset += e.text.length;
  }
  return lp;
}

/**
 * The prompt's tokens, for echo: their log-probs given the tokens before (null for the first, which has
 * none), offsets from decoding the prompt incrementally (special tokens such as BOS take no text).
 */
export function promptCompletionLogprobs(tokenizer: Tokenizer, ids: number[], logprobs: (number | null)[]): CompletionLogprobs {
  const lp: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  const text = new IncrementalDetokenizer(tokenizer, { skipSpecialTokens: true });
  let offset = 0;
  ids.forEach((id, i) => {
    const token = tokenText(tokenizer, id);
    const logprob = logprobs[i] ?? null;
    lp.tokens.push(token);
    lp.token_logprobs.push(logprob);
    lp.top_logprobs.push(logprob === null ? null : { [token]: logprob });
    lp.text_offset.push(offset);
    offset += text.push(id).length;
  });
  return lp;
}

export function concatLogprobs(a: CompletionLogprobs, b: CompletionLogprobs): CompletionLogprobs {
  return {
    tokens: [...a.tokens, ...b.tokens],
    token_logprobs: [...a.token_logprobs, ...b.token_logprobs],
    top_logprobs: [...a.top_logprobs, ...b.top_logprobs],
    text_offset: [...a.text_offset, ...b.text_offset],
  };
}

interface ChatAlternative {
  token: string;
  logprob: number;
  bytes: number[];
}

/** The chat API's: one entry per token, with its alternatives. */
export interface ChatTokenLogprob extends ChatAlternative {
  top_logprobs: ChatAlternative[];
}

export function chatLogprobs(tokenizer: Tokenizer, events: TokenEvent[]): ChatTokenLogprob[] {
  const alternative = (id: number, logprob: number): ChatAlternative => {
    const token = tokenText(tokenizer, id);
    return { token, logprob, bytes: [...Buffer.from(token, "utf8")] };
  };
  return events.map((e) => ({
    ...alternative(e.id, e.logprob),
    top_logprobs: (e.top ?? []).map((alt) => alternative(alt.id, alt.logprob)),
  }));
}

function tokenText(tokenizer: Tokenizer, id: number): string {
  return tokenizer.idToToken(id) === null ? "" : tokenizer.decode([id]);
}
