import { z } from "zod";
import type { SamplingOptions } from "../runtime/sampling-params.js";
import { MAX_STOP_STRINGS } from "../runtime/sampling-params.js";
import { ApiError } from "./api-error.js";

/**
 * The request bodies the server takes, as zod schemas (the typed boundary), and their translation into the
 * engine's options. Unknown fields are ignored, as OpenAI does; null means "not given", as OpenAI's clients
 * send it. Ranges are OpenAI's where it has them (temperature 0..2, penalties -2..2, logprobs 0..5).
 */

const MAX_CHOICES = 128; // OpenAI's limit on n
const penalty = z.number().min(-2).max(2).nullish();
const stopField = z.union([z.string().min(1), z.array(z.string().min(1)).max(MAX_STOP_STRINGS)]).nullish();

/** What completions and chat completions share: OpenAI's sampling fields and vLLM's common extensions. */
const samplingFields = {
  model: z.string(),
  temperature: z.number().min(0).max(2).nullish(),
  top_p: z.number().gt(0).max(1).nullish(),
  n: z.number().int().min(1).max(MAX_CHOICES).nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
  stop: stopField,
  seed: z.number().int().nullish(),
  presence_penalty: penalty,
  frequency_penalty: penalty,
  top_k: z.number().int().min(-1).nullish(), // -1 (vLLM) or 0: no limit
  min_p: z.number().min(0).max(1).nullish(),
  repetition_penalty: z.number().gt(0).nullish(),
  ignore_eos: z.boolean().nullish(),
  stop_token_ids: z.array(z.number().int().min(0)).nullish(),
};

const tokenIds = z.array(z.number().int()).min(1);

export const completionSchema = z.object({
  ...samplingFields,
  // Token ids before strings: a union tries its branches in order, and a long id list would first fail the
  // array-of-strings branch once per element.
  prompt: z.union([z.string(), tokenIds, z.array(z.string()).min(1), z.array(tokenIds).min(1)], {
    error: "expected a string, an array of strings, an array of token ids, or an array of token-id arrays",
  }),
  suffix: z.string().nullish(),
  max_tokens: z.number().int().min(0).nullish(), // 0: the prompt alone (echoed and scored, as OpenAI's was)
  logprobs: z.number().int().min(0).max(5).nullish(),
  echo: z.boolean().nullish(),
});

export type CompletionBody = z.infer<typeof completionSchema>;

const contentPart = z.object({ type: z.literal("text"), text: z.string() });
const chatMessages = z.array(z.object({ role: z.string(), content: z.union([z.string(), z.array(contentPart)]).nullish() })).min(1);

export type ChatMessages = z.infer<typeof chatMessages>;

export const chatSchema = z.object({
  ...samplingFields,
  messages: chatMessages,
  // -1: no limit, as llama.cpp's chat API takes it (llama.vscode sends it)
  max_tokens: z.number().int().min(-1).refine((n) => n !== 0, "expected a positive number of tokens, or -1 for no limit").nullish(),
  max_completion_tokens: z.number().int().min(1).nullish(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),
});

export type ChatBody = z.infer<typeof chatSchema>;

/** /tokenize: vLLM's form (`prompt`, or `messages`), or llama.cpp's (`content`). */
export const tokenizeSchema = z.object({
  model: z.string().nullish(),
  prompt: z.string().nullish(),
  messages: chatMessages.nullish(),
  content: z.string().nullish(),
  add_special_tokens: z.boolean().nullish(), // vLLM's, default true
  add_generation_prompt: z.boolean().nullish(), // vLLM's, with messages, default true
  add_special: z.boolean().nullish(), // llama.cpp's, default false
  with_pieces: z.boolean().nullish(), // llama.cpp's
});

export type TokenizeBody = z.infer<typeof tokenizeSchema>;

export const detokenizeSchema = z.object({
  model: z.string().nullish(),
  tokens: z.array(z.number().int()),
});

/**
 * What llama.cpp's own generation routes (/completion, /infill) share, with its defaults (temperature 0.8,
 * top_k 40, top_p 0.95, min_p 0.05, no repeat penalty, n_predict -1: until the end of the context; 0: the
 * prompt alone), and the two stop rules /infill's clients send (InfillStops).
 */
const llamaFields = {
  n_predict: z.number().int().min(-1).default(-1),
  temperature: z.number().min(0).default(0.8),
  top_k: z.number().int().default(40), // <= 0: no limit
  top_p: z.number().gt(0).max(1).default(0.95),
  min_p: z.number().min(0).max(1).default(0.05),
  repeat_penalty: z.number().gt(0).default(1),
  presence_penalty: z.number().min(-2).max(2).default(0),
  frequency_penalty: z.number().min(-2).max(2).default(0),
  seed: z.number().int().min(-1).max(0xffffffff).default(-1), // -1: random
  stop: z.array(z.string().min(1)).max(MAX_STOP_STRINGS).default([]),
  stream: z.boolean().default(false),
  t_max_predict_ms: z.number().min(0).default(0), // 0: no limit
  n_indent: z.number().int().min(0).default(0),
  ignore_eos: z.boolean().default(false),
};

export type LlamaBody = z.infer<z.ZodObject<typeof llamaFields>>;

/**
 * llama.cpp's /infill: `prompt` is text that goes right after the prefix, as llama.cpp's format_infill puts
 * it; `input_extra` chunks (other files) go before the FIM prompt.
 */
export const infillSchema = z.object({
  ...llamaFields,
  input_prefix: z.string().default(""),
  input_suffix: z.string().default(""),
  input_extra: z.array(z.object({ filename: z.string().default("tmp"), text: z.string() })).default([]),
  prompt: z.string().default(""),
});

/** llama.cpp's /completion: the prompt as text or token ids. */
export const llamaCompletionSchema = z.object({
  ...llamaFields,
  prompt: z.union([z.string(), z.array(z.number().int().min(0)).min(1)]),
});

export type InfillBody = z.infer<typeof infillSchema>;

/** The body validated by `schema`, or a 400 naming the first bad field. */
export function parseBody<S extends z.ZodType>(schema: S, body: unknown): z.infer<S> {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new ApiError(400, "the request body must be a JSON object");
  }
  const parsed = schema.safeParse(body);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const param = issue.path.reduce<string>(
    (at, key) => (typeof key === "number" ? `${at}[${key}]` : at ? `${at}.${String(key)}` : String(key)),
    "",
  );
  throw new ApiError(400, `${param || "body"}: ${issue.message}`, param || null);
}

type SamplingBody = Pick<CompletionBody, Exclude<keyof typeof samplingFields, "model" | "n" | "stream" | "stream_options" | "seed">>;

/** The engine's options for OpenAI's sampling fields (temperature defaults to 1, as OpenAI's does). */
export function samplingOptions(body: SamplingBody): SamplingOptions {
  return {
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? undefined,
    topK: body.top_k == null ? undefined : Math.max(0, body.top_k),
    minP: body.min_p ?? undefined,
    repetitionPenalty: body.repetition_penalty ?? undefined,
    presencePenalty: body.presence_penalty ?? undefined,
    frequencyPenalty: body.frequency_penalty ?? undefined,
    stop: body.stop ?? undefined,
    stopTokenIds: body.stop_token_ids ?? undefined,
    ignoreEos: body.ignore_eos ?? undefined,
  };
}

/**
 * The engine's seed (a uint32) for choice `i` of a request: OpenAI's seed may be any integer, and choice i
 * draws with seed + i so that the choices differ yet each is reproducible. No seed: each draws its own.
 */
export function choiceSeed(seed: number | null | undefined, i: number): number | undefined {
  if (seed == null) return undefined;
  const m = 2 ** 32;
  return (((seed + i) % m) + m) % m;
}
