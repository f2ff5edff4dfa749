import type { FastifyReply, FastifyRequest } from "fastify";
import type { DoneEvent, GenerateRequest } from "../runtime/engine.js";
import { ApiError } from "./api-error.js";
import type { RouteContext } from "./app.js";
import { type ChoiceBatch, collectChoices, startChoices } from "./choices.js";
import { type CompletionLogprobs, completionLogprobs, concatLogprobs, promptCompletionLogprobs } from "./logprobs.js";
import { responseId, unixSeconds, usageOf } from "./openai.js";
import { type CompletionBody, choiceSeed, completionSchema, parseBody, samplingOptions } from "./requests.js";
import { sendEvents } from "./sse.js";

const DEFAULT_MAX_TOKENS = 16; // OpenAI's, for completions

/** POST /v1/completions: OpenAI's (legacy) completions API, fill-in-the-middle through `suffix`. */
export async function completions(ctx: RouteContext, request: FastifyRequest, reply: FastifyReply): Promise<unknown> {
  const body = parseBody(completionSchema, request.body);
  const model = ctx.checkModel(body.model);
  const withLogprobs = body.logprobs != null;
  if (body.echo && body.suffix != null) throw new ApiError(400, "echo: not available together with suffix", "echo");

  const prompts = promptList(body.prompt);
  const n = body.n ?? 1;
  const base: Omit<GenerateRequest, "prompt"> = {
    ...samplingOptions(body),
    maxTokens: body.max_tokens ?? DEFAULT_MAX_TOKENS,
    suffix: body.suffix ?? undefined,
    logprobs: body.logprobs ?? undefined,
    promptLogprobs: body.echo === true && withLogprobs,
  };
  const requests = prompts.flatMap((prompt) => Array.from({ length: n }, (_, i) => ({ ...base, prompt, seed: choiceSeed(body.seed, i) })));
  const events = await startChoices(ctx.choicesContext(reply), requests);
  const echoes = requests.map((r) => (body.echo ? echoText(ctx, r.prompt) : ""));
  const head = { id: responseId("cmpl"), object: "text_completion" as const, created: unixSeconds(), model };
  if (body.stream) {
    return sendEvents(reply, completionChunks(ctx, body, head, events, echoes), { doneMarker: true, onError: ctx.streamError });
  }

  const results = await collectChoices(events, requests.length);
  const choices = results.map(({ tokens, done }, index) => {
    let logprobs: CompletionLogprobs | null = null;
    if (withLogprobs) {
      logprobs = completionLogprobs(ctx.engine.tokenizer, tokens, echoes[index].length);
      if (body.echo) {
        const prompt = promptCompletionLogprobs(ctx.engine.tokenizer, done.promptTokens, done.promptLogprobs ?? []);
        logprobs = concatLogprobs(prompt, logprobs);
      }
    }
    return { index, text: echoes[index] + done.text, logprobs, finish_reason: done.finishReason };
  });
  return { ...head, choices, usage: usageOf(results.map((r) => r.done), n) };
}

/** OpenAI's prompt: a string, strings, token ids, or arrays of token ids; one engine prompt each. */
function promptList(prompt: CompletionBody["prompt"]): (string | number[])[] {
  if (typeof prompt === "string") return [prompt];
  if (typeof prompt[0] === "number") return [prompt as number[]];
  return prompt as string[] | number[][];
}

function echoText(ctx: RouteContext, prompt: string | number[]): string {
  return typeof prompt === "string" ? prompt : ctx.engine.tokenizer.decode(prompt);
}

/**
 * A stream's chunks: each choice's echo first (with logprobs, once the engine has computed the prompt's),
 * then a chunk per piece of text, a last one per choice.
 */
async function* completionChunks(
  ctx: RouteContext,
  body: CompletionBody,
  head: object,
  batches: AsyncIterable<ChoiceBatch>,
  echoes: string[],
): AsyncGenerator<object[]> {
  const withUsage = body.stream_options?.include_usage === true;
  const chunk = (index: number, text: string, logprobs: CompletionLogprobs | null, finish_reason: string | null) => ({
    ...head,
    choices: [{ index, text, logprobs, finish_reason }],
    ...(withUsage ? { usage: null } : {}),
  });
  const offsets = echoes.map((e) => e.length);
  const echoLogprobs = body.echo === true && body.logprobs != null;
  if (!echoLogprobs) yield echoes.flatMap((echo, index) => (echo ? [chunk(index, echo, null, null)] : []));
  const dones: DoneEvent[] = [];
  for await (const batch of batches) {
    const out: object[] = [];
    for (const { index, event } of batch) {
      if (event.type === "prompt") {
        out.push(chunk(index, echoes[index], promptCompletionLogprobs(ctx.engine.tokenizer, event.tokens, event.logprobs), null));
      } else if (event.type === "done") {
        dones[index] = event;
        out.push(chunk(index, "", null, event.finishReason));
      } else if (event.type === "token" && (event.text || body.logprobs != null)) {
        const logprobs = body.logprobs == null ? null : completionLogprobs(ctx.engine.tokenizer, [event], offsets[index]);
        offsets[index] += event.text.length;
        out.push(chunk(index, event.text, logprobs, null));
      } else if (event.type === "text" && event.text) {
        offsets[index] += event.text.length;
        out.push(chunk(index, event.text, null, null));
      }
    }
    yield out;
  }
  if (withUsage) yield [{ ...head, choices: [], usage: usageOf(dones, body.n ?? 1) }];
}
