import { randomBytes } from "node:crypto";
import type { DoneEvent } from "../runtime/engine.js";

/** Token counts of a response, as OpenAI reports them. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/** A response id in OpenAI's form: "cmpl-" or "chatcmpl-" and 24 random hex digits. */
export function responseId(prefix: "cmpl" | "chatcmpl"): string {
  return `${prefix}-${randomBytes(12).toString("hex")}`;
}

export function unixSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/**
 * Usage of `n` choices per prompt (dones in choice order): each prompt's tokens count once, as OpenAI and
 * vLLM count them, however many choices share it.
 */
export function usageOf(dones: DoneEvent[], n: number): Usage {
  let prompt = 0;
  let completion = 0;
  dones.forEach((done, i) => {
    if (i % n === 0) prompt += done.promptTokens.length;
    completion += done.tokens.length;
  });
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}
