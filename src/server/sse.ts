import { Readable } from "node:stream";
import type { FastifyReply } from "fastify";
import type { ErrorBody } from "./api-error.js";

/**
 * Server-sent events: each chunk as `data: {json}\n\n`. A failure once the stream has begun can't change
 * the status any more, so it becomes one last event with the error body (as vLLM sends it). OpenAI's
 * streams end with `data: [DONE]`; llama.cpp's own endpoints don't.
 */
export function sendEvents(
  reply: FastifyReply,
  chunks: AsyncIterable<object>,
  opts: { doneMarker: boolean; onError: (err: unknown) => ErrorBody },
): FastifyReply {
  reply
    .header("content-type", "text/event-stream; charset=utf-8")
    .header("cache-control", "no-cache")
    .header("x-accel-buffering", "no"); // proxies (nginx) would otherwise hold tokens back
  return reply.send(Readable.from(eventLines(chunks, opts)));
}

async function* eventLines(
  chunks: AsyncIterable<object>,
  opts: { doneMarker: boolean; onError: (err: unknown) => ErrorBody },
): AsyncGenerator<string> {
  try {
    for await (const chunk of chunks) yield `data: ${JSON.stringify(chunk)}\n\n`;
  } catch (err) {
    yield `data: ${JSON.stringify(opts.onError(err))}\n\n`;
  }
  if (opts.doneMarker) yield "data: [DONE]\n\n";
}
