import { randomInt } from "node:crypto";
import { z } from "zod";
import { fail } from "../errors.js";
import type { SamplingKnobs } from "../engine/backend.js";

/** The generation options a caller may give (all optional), as the engine API and the server take them. */
export interface SamplingOptions {
  /** 0 (the default) is greedy decoding. */
  temperature?: number;
  /** 0 (the default) is no limit. */
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  frequencyPenalty?: number;
  presencePenalty?: number;
  /** A uint32; without one each request draws its own, so runs differ. */
  seed?: number;
  /** Default 256. 0: compute the prompt (into the prefix cache; its log-probs if asked) and generate nothing. */
  maxTokens?: number;
  stop?: string | string[];
  stopTokenIds?: number[];
  ignoreEos?: boolean;
  /** Report this many most likely alternatives (0..20) beside each token's own log-prob. */
  logprobs?: number;
  /** Report the log-prob of every prompt token (OpenAI's echo + logprobs). */
  promptLogprobs?: boolean;
}

/** Validated options with every default filled in. */
export interface SamplingParams extends SamplingKnobs {
  maxTokens: number;
  stop: string[];
  stopTokenIds: number[];
  ignoreEos: boolean;
  /** null when the caller asked for no alternatives. */
  logprobs: number | null;
  promptLogprobs: boolean;
}

export const MAX_STOP_STRINGS = 8;
export const MAX_LOGPROBS = 20;

const penalty = z.number().min(-2).max(2).default(0);

const schema = z.object({
  temperature: z.number().min(0).default(0),
  topK: z.number().int().min(0).default(0),
  topP: z.number().gt(0).max(1).default(1),
  minP: z.number().min(0).max(1).default(0),
  repetitionPenalty: z.number().gt(0).default(1),
  frequencyPenalty: penalty,
  presencePenalty: penalty,
  seed: z.number().int().min(0).max(0xffffffff).optional(),
  maxTokens: z.number().int().min(0).default(256),
  stop: z
    .preprocess((s) => (typeof s === "string" ? [s] : s), z.array(z.string().min(1)).max(MAX_STOP_STRINGS))
    .default([]),
  stopTokenIds: z.array(z.number().int().min(0)).default([]),
  ignoreEos: z.boolean().default(false),
  logprobs: z.number().int().min(0).max(MAX_LOGPROBS).optional(),
  promptLogprobs: z.boolean().default(false),
});

/** Validate generation options (unknown keys are ignored); a bad one fails with a line naming the field. */
export function parseSamplingParams(options: SamplingOptions): SamplingParams {
  const parsed = schema.safeParse(options);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    fail("input", `${issue.path.join(".") || "sampling options"}: ${issue.message}`);
  }
  const p = parsed.data;
  return { ...p, seed: p.seed ?? randomInt(0x100000000), logprobs: p.logprobs ?? null };
}

/** Whether the sampler needs the sequence's token history (only the penalties read it). */
export function usesPenalties(p: SamplingParams): boolean {
  return p.repetitionPenalty !== 1 || p.frequencyPenalty !== 0 || p.presencePenalty !== 0;
}
