import { DecimaError, oneLine } from "../errors.js";

/** OpenAI's error body: every failed response of the server has this shape. */
export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

/** A response the server refuses with, for problems found at the HTTP layer (fields, model, key). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
  }
}

/** Seconds a client is told to wait before retrying a request refused for capacity. */
export const RETRY_AFTER_SECONDS = 1;

export interface ErrorReply {
  status: number;
  body: ErrorBody;
  headers: Record<string, string>;
  /** Not the client's doing: worth a line in the server's log. */
  unexpected: boolean;
}

/**
 * What any error thrown while serving a request becomes: ApiError and the engine's DecimaError keep their
 * status, Fastify's own 4xx errors (bad JSON, body too large, media type) keep theirs, anything else is
 * a 500 with the error's message on one line.
 */
export function errorReply(err: unknown): ErrorReply {
  if (err instanceof ApiError) return reply(err.status, err.message, err.param, err.code);
  if (err instanceof DecimaError) {
    const r = reply(err.status, err.message);
    if (err.status === 503) r.headers["retry-after"] = String(RETRY_AFTER_SECONDS);
    r.unexpected = err.status >= 500 && err.status !== 503;
    return r;
  }
  const status = (err as { statusCode?: unknown }).statusCode;
  if (typeof status === "number" && status >= 400 && status < 500) return reply(status, oneLine(err));
  const r = reply(500, `internal error: ${oneLine(err)}`);
  r.unexpected = true;
  return r;
}

function reply(status: number, message: string, param: string | null = null, code: string | null = null): ErrorReply {
  const type = status >= 500 ? "server_error" : "invalid_request_error";
  return { status, body: { error: { message, type, param, code } }, headers: {}, unexpected: false };
}
