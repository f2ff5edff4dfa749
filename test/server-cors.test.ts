import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { ServerOptions } from "../src/server/app.js";
import { startServer } from "./http-server.js";
import { tinyEngine } from "./tiny-engine.js";

const preflight = {
  "access-control-request-method": "POST",
  "access-control-request-headers": "authorization, content-type",
};

async function withServer(opts: ServerOptions, use: (url: string) => Promise<void>): Promise<void> {
  const server = await startServer((await tinyEngine()).engine, opts);
  try {
    await use(server.url);
  } finally {
    await server.close();
  }
}

function complete(url: string, origin: string, key?: string): Promise<Response> {
  return fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { origin, "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify({ model: "tiny", prompt: "x", max_tokens: 1 }),
  });
}

describe("server: CORS", () => {
  it("lets the allowed origins' pages call the API, the API key's preflight included, and no other", async () => {
    await withServer({ allowedOrigins: ["https://editor.example"], apiKey: "k" }, async (url) => {
      const pre = await fetch(`${url}/v1/completions`, { method: "OPTIONS", headers: { origin: "https://editor.example", ...preflight } });
      assert.equal(pre.status, 204);
      assert.equal(pre.headers.get("access-control-allow-origin"), "https://editor.example");
      assert.match(pre.headers.get("access-control-allow-headers")!, /authorization/);
      const ok = await complete(url, "https://editor.example", "k");
      assert.equal(ok.status, 200);
      assert.equal(ok.headers.get("access-control-allow-origin"), "https://editor.example");
      const refused = await complete(url, "https://editor.example");
      assert.equal(refused.status, 401);
      assert.equal(refused.headers.get("access-control-allow-origin"), "https://editor.example", "its page can read why");
      const other = await complete(url, "https://elsewhere.example", "k");
      assert.equal(other.headers.get("access-control-allow-origin"), null);
    });
  });

  it("allows any page with *, and none by default", async () => {
    await withServer({ allowedOrigins: ["*"] }, async (url) => {
      assert.equal((await complete(url, "https://any.example")).headers.get("access-control-allow-origin"), "*");
    });
    await withServer({}, async (url) => {
      const res = await complete(url, "https://any.example");
      assert.equal(res.status, 200, "a client that is not a browser is served as ever");
      assert.equal(res.headers.get("access-control-allow-origin"), null);
      const pre = await fetch(`${url}/v1/completions`, { method: "OPTIONS", headers: { origin: "https://any.example", ...preflight } });
      assert.equal(pre.headers.get("access-control-allow-origin"), null);
    });
  });
});
