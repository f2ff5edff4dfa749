// llama.cpp's own generation routes, which editor plugins (llama.vim, llama.vscode) and other llama.cpp
// clients speak. Both reply with the fields of llama.cpp's that clients read; a stream sends `{"content",
// "stop": false}` events and ends with the full result (its content empty, as llama.cpp's), without
// OpenAI's [DONE].
import type { FastifyReply, FastifyRequest } from "fastify";
import type { DoneEvent } from "../runtime/engine.js";
import type { Tokenizer } from "../tokenizer/tokenizer.js";
import type { RouteContext } from "./app.js";
import { type ChoiceBatch, startChoices } from "./choices.js";
import type { InfillPrompt, InfillPrompter } from "./infill-prompt.js";
import { InfillStops } from "./infill-stops.js";
import { type LlamaBody, infillSchema, llamaCompletionSchema, parseBody } from "./requests.js";
import { sendEvents } from "./sse.js";

/**
 * POST /infill: fill in the middle between input_prefix and input_suffix, the prompt fitted to the context
 * (InfillPrompter).
 */
export async function infill(ctx: RouteContext, prompter: InfillPrompter, request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
  const body = parseBody(infillSchema, request.body);
  return generate(ctx, reply, body, prompter.build(body, body.n_predict));
}

/** POST /completion: a plain completion of text or token ids (special tokens added, as llama.cpp does). */
export async function llamaCompletion(ctx: RouteContext, request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
  const body = parseBody(llamaCompletionSchema, request.body);
  const ids = typeof body.prompt === "string" ? ctx.engine.tokenizer.encode(body.prompt) : body.prompt;
  return generate(ctx, reply, body, { ids, truncated: false });
}

async function generate(ctx: RouteContext, reply: FastifyReply, body: LlamaBody, { ids: prompt, truncated }: InfillPrompt): Promise<unknown> {
  const { config } = ctx.engine;
  // n_predict 0 computes the prompt alone: editor plugins (llama.vscode) send their context chunks so, for
  // the prefix cache to hold them before the completions that follow.
  const maxTokens = body.n_predict >= 0 ? body.n_predict : Math.max(1, config.maxPositionEmbeddings - prompt.length);
  const stops = new InfillStops(body.t_max_predict_ms, body.n_indent);
  const request = {
    prompt,
    maxTokens,
    temperature: body.temperature,
    topK: Math.max(0, body.top_k),
    topP: body.top_p,
    minP: body.min_p,
    repetitionPenalty: body.repeat_penalty,
    presencePenalty: body.presence_penalty,
    frequencyPenalty: body.frequency_penalty,
    seed: body.seed === -1 ? undefined : body.seed,
    stop: body.stop,
    ignoreEos: body.ignore_eos,
    signal: stops.signal,
  };
  const events = await startChoices(ctx.choicesContext(reply), [request]);
  const run: Run = { body, stops, truncated };
  if (body.stream) {
    return sendEvents(reply, streamed(ctx, run, prompt.length, events), { doneMarker: false, onError: ctx.streamError });
  }
  let content = "";
  let done: DoneEvent | undefined;
  for await (const batch of events) {
    for (const { event } of batch) {
      if (event.type === "token" || event.type === "text") content += stops.cut(event.text);
      if (event.type === "done") done = event;
    }
  }
  return result(ctx, run, done!, content);
}

/** What a request's result reports besides its done event. */
interface Run {
  body: LlamaBody;
  stops: InfillStops;
  /** Its prompt left some of the request out, to fit the context. */
  truncated: boolean;
}

async function* streamed(ctx: RouteContext, run: Run, promptTokens: number, batches: AsyncIterable<ChoiceBatch>): AsyncGenerator<object[]> {
  let predicted = 0;
  for await (const batch of batches) {
    const out: object[] = [];
    for (const { event } of batch) {
      if (event.type === "done") {
        out.push(result(ctx, run, event, ""));
      } else {
        if (event.type === "prompt") continue;
        if (event.type === "token") predicted++;
        const content = run.stops.cut(event.text);
        if (content) out.push({ content, stop: false, tokens_predicted: predicted, tokens_evaluated: promptTokens });
      }
    }
    yield out;
  }
}

function result(ctx: RouteContext, { body, stops, truncated }: Run, done: DoneEvent, content: string): object {
  const { stopType, word } = stopOf(ctx.engine.tokenizer, done, body.stop, stops.reached);
  const t = done.timings;
  const promptN = done.promptTokens.length - done.cachedPromptTokens;
  const promptMs = t.promptMs;
  const predictedN = done.tokens.length;
  return {
    content,
    stop: true,
    model: ctx.modelName,
    tokens_predicted: predictedN,
    tokens_evaluated: done.promptTokens.length,
    tokens_cached: done.cachedPromptTokens,
    truncated,
    stop_type: stopType,
    stopped_eos: stopType === "eos",
    stopped_limit: stopType === "limit",
    stopped_word: stopType === "word",
    stopping_word: word,
    generation_settings: {
      n_predict: body.n_predict,
      temperature: body.temperature,
      top_k: body.top_k,
      top_p: body.top_p,
      min_p: body.min_p,
      repeat_penalty: body.repeat_penalty,
      presence_penalty: body.presence_penalty,
      frequency_penalty: body.frequency_penalty,
      seed: body.seed,
      stop: body.stop,
    },
    timings: {
      prompt_n: promptN,
      prompt_ms: promptMs,
      prompt_per_token_ms: promptN > 0 ? promptMs / promptN : 0,
      prompt_per_second: promptMs > 0 ? (promptN * 1000) / promptMs : 0,
      predicted_n: predictedN,
      predicted_ms: t.decodeMs,
      predicted_per_token_ms: predictedN > 1 ? t.decodeMs / (predictedN - 1) : 0,
      predicted_per_second: t.tokensPerSecond,
    },
  };
}

/**
 * llama.cpp's stop type. The engine says "stop" for an end-of-sequence token and for a stop string alike;
 * a stop string is the one case where the generated tokens' text holds one (the reply's text ends before it).
 * A request InfillStops ended (`limited`) ends as aborted in the engine.
 */
function stopOf(tokenizer: Tokenizer, done: DoneEvent, stops: string[], limited: boolean): { stopType: string; word: string } {
  if (done.finishReason === "length" || (done.finishReason === "abort" && limited)) return { stopType: "limit", word: "" };
  if (done.finishReason !== "stop") return { stopType: "none", word: "" };
  const text = tokenizer.decode(done.tokens, { skipSpecialTokens: true });
  let first: { at: number; word: string } | null = null;
  for (const word of stops) {
    const at = text.indexOf(word);
    if (at >= 0 && (first === null || at < first.at)) first = { at, word };
  }
  return first ? { stopType: "word", word: first.word } : { stopType: "eos", word: "" };
}
