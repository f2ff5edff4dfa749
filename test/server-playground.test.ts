import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Script } from "node:vm";
import { startServer } from "./http-server.js";
import { tinyEngine } from "./tiny-engine.js";

// The page's behaviour in a browser (streaming, fill in the middle, stop, errors, the API key) was checked
// with headless Chromium; CI has none, so this checks what it serves.
describe("server: playground page", () => {
  it("serves the page at /, with every field its script reads and a script that parses", async () => {
    const server = await startServer((await tinyEngine()).engine);
    try {
      const res = await fetch(`${server.url}/`);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get("content-type"), "text/html; charset=utf-8");
      const html = await res.text();
      assert.match(html, /<title>decima playground<\/title>/);
      const script = /<script>([\s\S]*)<\/script>/.exec(html)![1];
      new Script(script); // throws on a syntax error
      const read = [...script.matchAll(/\$\("(\w+)"\)/g)].map((m) => m[1]);
      for (const id of new Set(read)) assert.match(html, new RegExp(`id="${id}"`), `the page has #${id}`);
      assert.match(script, /fetch\("\/v1\/completions"/);
    } finally {
      await server.close();
    }
  });

  it("is not served with playground: false", async () => {
    const server = await startServer((await tinyEngine()).engine, { playground: false });
    try {
      assert.equal((await fetch(`${server.url}/`)).status, 404);
    } finally {
      await server.close();
    }
  });
});
