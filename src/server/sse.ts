import { Readable } from "node:stream";
import type { FastifyReply } from "fastify";
import type { ErrorBody } from "./api-error.js";

/**
 * Server-sent events: each chunk as `data: {json}\n\n`, the chunks that came together written at once (one
 * socket write for a step's tokens, not one per token). A failure once the stream has begun can't change
 * the status any more, so it becomes one last event with the error body (as vLLM sends it). OpenAI's
 * streams end with `data: [DONE]`; llama.cpp's own endpoints don't.
 */
export function sendEvents(
  reply: FastifyReply,
  chunks: AsyncIterable<object[]>,
  opts: { doneMarker: boolean; onError: (err: unknown) => ErrorBody },
): FastifyReply {
  reply
    .header("content-type", "text/event-stream; charset=utf-8")
    .header("cache-control", "no-cache")
    .header("x-accel-buffering", "no"); // proxies (nginx) would otherwise hold tokens back
  return reply.send(Readable.from(eventLines(chunks, opts)));
}

async function* eventLines(
  chunks: AsyncIterable<object[]>,
  opts: { doneMarker: boolean; onError: (err: unknown) => ErrorBody },
): AsyncGenerator<string> {
  const line = (chunk: object) => `data: ${JSON.stringify(chunk)}\n\n`;
  try {
    for await (const batch of chunks) if (batch.length > 0) yield batch.map(line).join("");
  } catch (err) {
    yield line(opts.onError(err));
  }
  if (opts.doneMarker) yield "data: [DONE]\n\n";
}
