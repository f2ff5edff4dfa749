import type { FastifyReply, FastifyRequest } from "fastify";
import type { DoneEvent } from "../runtime/engine.js";
import type { ChatMessage } from "../tokenizer/tokenizer.js";
import { ApiError } from "./api-error.js";
import type { RouteContext } from "./app.js";
import { type ChoiceBatch, collectChoices, startChoices } from "./choices.js";
import { chatLogprobs } from "./logprobs.js";
import { responseId, unixSeconds, usageOf } from "./openai.js";
import { type ChatBody, type ChatMessages, chatSchema, choiceSeed, parseBody, samplingOptions } from "./requests.js";
import { sendEvents } from "./sse.js";

/**
 * POST /v1/chat/completions: the conversation rendered by the model's chat template (with the generation
 * prompt), then generated as a completion. Without max_tokens (or with llama.cpp's -1) a reply may run to
 * the end of the context, as OpenAI's do.
 */
export async function chatCompletions(ctx: RouteContext, request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
  const body = parseBody(chatSchema, request.body);
  const model = ctx.checkModel(body.model);
  const { tokenizer, config } = ctx.engine;
  if (body.top_logprobs != null && !body.logprobs) {
    throw new ApiError(400, "top_logprobs: needs logprobs set to true", "top_logprobs");
  }
  const prompt = chatPromptIds(ctx, model, body.messages, true);
  const limit = body.max_completion_tokens ?? (body.max_tokens === -1 ? null : body.max_tokens);
  const maxTokens = limit ?? Math.max(1, config.maxPositionEmbeddings - prompt.length);
  const n = body.n ?? 1;
  const requests = Array.from({ length: n }, (_, i) => ({
    ...samplingOptions(body),
    prompt,
    maxTokens,
    logprobs: body.logprobs ? (body.top_logprobs ?? 0) : undefined,
    seed: choiceSeed(body.seed, i),
  }));
  const events = await startChoices(ctx.choicesContext(reply), requests);
  const head = { id: responseId("chatcmpl"), created: unixSeconds(), model };
  if (body.stream) {
    return sendEvents(reply, chatChunks(ctx, body, head, events), { doneMarker: true, onError: ctx.streamError });
  }

  const results = await collectChoices(events, n);
  const choices = results.map(({ tokens, done }, index) => ({
    index,
    message: { role: "assistant", content: done.text },
    logprobs: body.logprobs ? { content: chatLogprobs(tokenizer, tokens), refusal: null } : null,
    finish_reason: done.finishReason,
  }));
  return { ...head, object: "chat.completion", choices, usage: usageOf(results.map((r) => r.done), n) };
}

/** The conversation rendered by the model's chat template, as token ids (a 400 for a model without one). */
export function chatPromptIds(ctx: RouteContext, model: string, messages: ChatMessages, addGenerationPrompt: boolean): number[] {
  const { tokenizer } = ctx.engine;
  if (tokenizer.chatTemplate === null) {
    throw new ApiError(400, `model "${model}" has no chat template: use /v1/completions`, "messages");
  }
  const text = tokenizer.applyChatTemplate(messages.map(toChatMessage), { addGenerationPrompt });
  // The template writes BOS and the like itself; tokenizing must not add them again (as transformers).
  return tokenizer.encode(text, { addSpecialTokens: false });
}

/** OpenAI's content may be text parts; the template wants one string. */
function toChatMessage(m: ChatMessages[number]): ChatMessage {
  const content = m.content ?? "";
  return { role: m.role, content: typeof content === "string" ? content : content.map((p) => p.text).join("") };
}

/** A stream: each choice's role first, then its content as it comes, then its finish reason. */
async function* chatChunks(ctx: RouteContext, body: ChatBody, head: object, batches: AsyncIterable<ChoiceBatch>): AsyncGenerator<object[]> {
  const n = body.n ?? 1;
  const withUsage = body.stream_options?.include_usage === true;
  const chunk = (index: number, delta: object, logprobs: object | null, finish_reason: string | null) => ({
    ...head,
    object: "chat.completion.chunk",
    choices: [{ index, delta, logprobs, finish_reason }],
    ...(withUsage ? { usage: null } : {}),
  });
  yield Array.from({ length: n }, (_, index) => chunk(index, { role: "assistant", content: "" }, null, null));
  const dones: DoneEvent[] = [];
  for await (const batch of batches) {
    const out: object[] = [];
    for (const { index, event } of batch) {
      if (event.type === "done") {
        dones[index] = event;
        out.push(chunk(index, {}, null, event.finishReason));
      } else if (event.type === "token" && (event.text || body.logprobs)) {
        const logprobs = body.logprobs ? { content: chatLogprobs(ctx.engine.tokenizer, [event]), refusal: null } : null;
        out.push(chunk(index, { content: event.text }, logprobs, null));
      } else if (event.type === "text" && event.text) {
        out.push(chunk(index, { content: event.text }, null, null));
      }
    }
    yield out;
  }
  if (withUsage) yield [{ ...head, object: "chat.completion.chunk", choices: [], usage: usageOf(dones, n) }];
}
