import type { FastifyInstance } from "fastify";
import { type ServerOptions, buildServer } from "../src/server/app.js";
import type { Engine } from "../src/runtime/engine.js";

export interface TestServer {
  app: FastifyInstance;
  /** http://127.0.0.1:<port> */
  url: string;
  close(): Promise<void>;
}

/** The server over `engine`, listening on a free port of 127.0.0.1; close() closes both. */
export async function startServer(engine: Engine, opts: ServerOptions = {}): Promise<TestServer> {
  const app = buildServer(engine, opts);
  await app.listen({ host: "127.0.0.1", port: 0 });
  const { port } = app.server.address() as { port: number };
  return {
    app,
    url: `http://127.0.0.1:${port}`,
    async close() {
      await app.close();
      await engine.close();
    },
  };
}

/** POST a JSON body (a string is sent as is) and read the JSON reply. */
export async function postJson(
  url: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; headers: Headers; body: any }> {
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, headers: res.headers, body: await res.json() };
}

/** The `data:` payloads of a server-sent event stream, in order. */
export async function readEvents(res: Response): Promise<string[]> {
  const text = await res.text();
  return text
    .split("\n\n")
    .filter((e) => e.startsWith("data: "))
    .map((e) => e.slice("data: ".length));
}
