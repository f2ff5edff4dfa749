import { createHash, timingSafeEqual } from "node:crypto";
import cors from "@fastify/cors";
import Fastify, { type FastifyInstance, type FastifyReply } from "fastify";
import type { Engine } from "../runtime/engine.js";
import { ApiError, type ErrorBody, errorReply } from "./api-error.js";
import { chatCompletions } from "./chat.js";
import type { ChoicesContext } from "./choices.js";
import { completions } from "./completions.js";
import { InfillPrompter } from "./infill-prompt.js";
import { infill, llamaCompletion } from "./llama-cpp.js";
import { ServerMetrics } from "./metrics.js";
import { unixSeconds } from "./openai.js";
import { PLAYGROUND_HTML } from "./playground.js";
import { detokenize, tokenize } from "./tokenize.js";

/**
 * 1 MiB: a full 4,096-token context is about 16 KB of text, or 25 KB as token ids, so this holds dozens of
 * long prompts in one request while a client can't make the server buffer much.
 */
export const DEFAULT_BODY_LIMIT = 1024 * 1024;

export interface ServerOptions {
  /** When set, every route but /health and the playground page wants `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Serve the playground page at `/` (default true). */
  playground?: boolean;
  /**
   * Origins whose pages may call the API from a browser (CORS), or "*" for any page. Default none: only
   * same-origin pages, such as the playground, can.
   */
  allowedOrigins?: string[];
  /** The model name that clients send and responses report (default: the engine's modelId, also accepted). */
  servedModelName?: string;
  /** The largest request body, in bytes (default DEFAULT_BODY_LIMIT); past it a request gets 413. */
  bodyLimit?: number;
  /** Where failures that are not the client's doing are logged, one line each (default: stderr). */
  log?: (line: string) => void;
}

/** What the route handlers share. */
export interface RouteContext {
  engine: Engine;
  /** The served model's name. */
  modelName: string;
  /** The name a response reports for the request's `model`; 404 unless this server serves it. */
  checkModel(model: string): string;
  /** startChoices' context for a request: its arrival, and a signal that fires if its client leaves. */
  choicesContext(reply: FastifyReply): ChoicesContext;
  /** A failure after a stream's status was sent: counted and logged like any other, as an error body. */
  streamError(err: unknown): ErrorBody;
}

/**
 * The HTTP server: OpenAI's completions, chat completions and models routes, llama.cpp's /infill and
 * /completion, /tokenize and /detokenize (vLLM's and llama.cpp's forms), /health, Prometheus /metrics and the playground
 * page, over one engine. The caller listens (decima serve binds 127.0.0.1 unless told otherwise) and closes
 * the engine after the server. Nothing a client sends can take the server down: every failure becomes an
 * error response in OpenAI's shape, and only unexpected ones (500) are logged.
 */
export function buildServer(engine: Engine, opts: ServerOptions = {}): FastifyInstance {
  // forceCloseConnections: closing the server cuts open streams, whose requests are then cancelled.
  const app = Fastify({ bodyLimit: opts.bodyLimit ?? DEFAULT_BODY_LIMIT, forceCloseConnections: true });
  const metrics = new ServerMetrics(engine);
  const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const modelName = opts.servedModelName ?? engine.modelId;
  const started = unixSeconds();
  const playground = opts.playground ?? true;
  const open = new Set(playground ? ["/health", "/"] : ["/health"]); // routes without the API key

  const report = (err: unknown) => {
    const r = errorReply(err);
    metrics.requestFailed(r.status);
    if (r.unexpected) log(`decima serve: ${r.body.error.message}`);
    return r;
  };
  const ctx: RouteContext = {
    engine,
    modelName,
    checkModel(model) {
      if (model !== modelName && model !== engine.modelId) {
        throw new ApiError(404, `The model \`${model}\` does not exist (this server serves "${modelName}")`, "model", "model_not_found");
      }
      return modelName;
    },
    choicesContext(reply) {
      const gone = new AbortController();
      reply.raw.once("close", () => {
        if (!reply.raw.writableFinished) gone.abort();
      });
      return { engine, metrics, signal: gone.signal, arrival: performance.now() - reply.elapsedTime };
    },
    streamError: (err) => report(err).body,
  };

  if (opts.allowedOrigins?.length) {
    app.register(cors, { origin: opts.allowedOrigins.includes("*") ? "*" : opts.allowedOrigins, exposedHeaders: ["retry-after"] });
  }
  if (opts.apiKey !== undefined) {
    const expected = digest(opts.apiKey);
    app.addHook("onRequest", async (request) => {
      // A browser's CORS preflight (OPTIONS) carries no credentials; no route answers OPTIONS otherwise.
      if (request.method === "OPTIONS" || open.has(request.url.split("?")[0])) return;
      const key = /^Bearer\s+(\S+)\s*$/i.exec(request.headers.authorization ?? "")?.[1] ?? "";
      if (!timingSafeEqual(digest(key), expected)) {
        throw new ApiError(401, "missing or invalid API key: send it as Authorization: Bearer <key>", null, "invalid_api_key");
      }
    });
  }
  app.setErrorHandler((err, _request, reply) => {
    const r = report(err);
    return reply.code(r.status).headers(r.headers).send(r.body);
  });
  app.setNotFoundHandler((request, reply) => {
    const r = report(new ApiError(404, `no route ${request.method} ${request.url.split("?")[0]}`));
    return reply.code(r.status).send(r.body);
  });

  app.get("/health", async () => ({ status: "ok" }));
  if (playground) app.get("/", async (_request, reply) => reply.type("text/html; charset=utf-8").send(PLAYGROUND_HTML));
  app.get("/metrics", async (_request, reply) => {
    const { contentType, body } = await metrics.text();
    return reply.type(contentType).send(body);
  });
  app.get("/v1/models", async () => ({
    object: "list",
    data: [{ id: modelName, object: "model", created: started, owned_by: "decima", max_model_len: engine.config.maxPositionEmbeddings }],
  }));
  app.post("/v1/completions", (request, reply) => completions(ctx, request, reply));
  app.post("/v1/chat/completions", (request, reply) => chatCompletions(ctx, request, reply));
  const prompter = new InfillPrompter(engine.tokenizer, engine.config.maxPositionEmbeddings);
  app.post("/infill", (request, reply) => infill(ctx, prompter, request, reply));
  app.post("/completion", (request, reply) => llamaCompletion(ctx, request, reply));
  app.post("/tokenize", (request) => tokenize(ctx, request));
  app.post("/detokenize", (request) => detokenize(ctx, request));
  return app;
}

/** Keys are compared as hashes: equal lengths for timingSafeEqual, and no timing hint of the key. */
function digest(key: string): Buffer {
  return createHash("sha256").update(key).digest();
}
