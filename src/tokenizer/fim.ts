import { fail } from "../errors.js";
import type { Tokenizer } from "./tokenizer.js";

/**
 * A fill-in-the-middle prompt in StarCoder's PSM order: <fim_prefix> prefix <fim_suffix> suffix <fim_middle>;
 * the model then writes the middle.
 *
 * The prefix and suffix are encoded as ordinary text, so a special token's name written in the code
 * ("<fim_prefix>") becomes that token. That is rare in real code, and it gives exactly the ids of the
 * reference recipe, which tokenizes the assembled string f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
 * with Hugging Face's defaults: a server and transformers see the same prompt.
 */
export function fimPromptIds(tokenizer: Tokenizer, prefix: string, suffix: string): number[] {
  const text = (s: string) => tokenizer.encode(s, { addSpecialTokens: false });
  return fimAround(tokenizer, text(prefix), text(suffix));
}

/** The same around a prefix and suffix already encoded (and perhaps cut to fit a context). */
export function fimAround(tokenizer: Tokenizer, prefix: number[], suffix: number[]): number[] {
  const fim = tokenizer.fim;
  if (fim === null) fail("input", "this model has no fill-in-the-middle tokens (<fim_prefix>, <fim_middle>, <fim_suffix>)");
  return [fim.prefix, ...prefix, fim.suffix, ...suffix, fim.middle];
}
