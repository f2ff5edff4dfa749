/**
 * Every failure that a user can cause (a bad file, flag, request or device state) becomes a DecimaError:
 * one line that names the thing at fault. Entry points print `message` alone (no stack unless
 * DECIMA_DEBUG=1); the server maps `status` to its HTTP response.
 */
export type ErrorKind =
  | "config" // config.json or a model/engine option
  | "checkpoint" // safetensors / sharded checkpoint
  | "tokenizer"
  | "hub" // model resolution, cache, download
  | "input" // a bad flag, prompt, token id or request field
  | "device" // GPU, native addon, out of memory
  | "engine" // decima engine files
  | "capacity"; // the KV pool or queue is full

export class DecimaError extends Error {
  override readonly name = "DecimaError";
  constructor(
    readonly kind: ErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }

  /** HTTP status for the server: input problems are the client's (400), capacity is 503. */
  get status(): number {
    if (this.kind === "input") return 400;
    if (this.kind === "capacity") return 503;
    return 500;
  }
}

export function fail(kind: ErrorKind, message: string, cause?: unknown): never {
  throw new DecimaError(kind, message, cause === undefined ? undefined : { cause });
}

/** The message of anything thrown, on one line. */
export function oneLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.replace(/\s*\n\s*/g, " ");
}
