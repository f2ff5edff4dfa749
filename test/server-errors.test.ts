import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, it } from "node:test";
import { type TestServer, postJson, readEvents, startServer } from "./http-server.js";
import { idle, promptOf, slowEngine, tinyEngine } from "./tiny-engine.js";

const URL_COMPLETIONS = "/v1/completions";

function assertOpenAiError(body: any, param: string | null, message: RegExp): void {
  assert.deepEqual(Object.keys(body), ["error"]);
  assert.deepEqual(Object.keys(body.error).sort(), ["code", "message", "param", "type"]);
  assert.equal(body.error.param, param);
  assert.match(body.error.message, message);
  assert.ok(!body.error.message.includes("\n"), "one line");
}

/** Open a streaming completion and wait for its first event; abort() then hangs up. */
async function openStream(url: string, body: object): Promise<{ abort: () => void; reader: ReadableStreamDefaultReader<Uint8Array> }> {
  const controller = new AbortController();
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal: controller.signal,
  });
  assert.equal(res.status, 200);
  const reader = res.body!.getReader();
  const first = await reader.read();
  assert.match(new TextDecoder().decode(first.value), /^data: \{/);
  return { abort: () => controller.abort(), reader };
}

async function metric(server: TestServer, name: string): Promise<number> {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? 0 : Number(line.split(" ")[1]);
}

describe("server: bad requests", () => {
  let server: TestServer;
  const logged: string[] = [];
  const post = (body: unknown) => postJson(server.url + URL_COMPLETIONS, body);

  before(async () => {
    server = await startServer((await tinyEngine()).engine, { log: (line) => logged.push(line) });
  });
  after(() => server.close());

  it("answers malformed JSON, a non-object body and an unknown route in OpenAI's shape", async () => {
    const bad = await post('{"model": "tiny", "prompt": ');
    assert.equal(bad.status, 400);
    assertOpenAiError(bad.body, null, /JSON/);
    assert.equal(bad.body.error.type, "invalid_request_error");
    const array = await post("[1, 2]");
    assert.equal(array.status, 400);
    assertOpenAiError(array.body, null, /must be a JSON object/);
    const route = await postJson(`${server.url}/v1/edits`, {});
    assert.equal(route.status, 404);
    assertOpenAiError(route.body, null, /no route POST \/v1\/edits/);
  });

  it("names the field at fault", async () => {
    const cases: [object, string, RegExp][] = [
      [{ prompt: "x" }, "model", /^model: .*expected string/],
      [{ model: "tiny" }, "prompt", /^prompt: expected a string, an array of strings/],
      [{ model: "tiny", prompt: "x", max_tokens: "abc" }, "max_tokens", /^max_tokens: .*expected number, received string/],
      [{ model: "tiny", prompt: "x", max_tokens: -5 }, "max_tokens", /^max_tokens: Too small/],
      [{ model: "tiny", prompt: "x", max_tokens: 2.5 }, "max_tokens", /^max_tokens: .*int/],
      [{ model: "tiny", prompt: "x", temperature: 3 }, "temperature", /^temperature: Too big: expected number to be <=2/],
      [{ model: "tiny", prompt: "x", top_p: 0 }, "top_p", /^top_p: Too small/],
      [{ model: "tiny", prompt: "x", logprobs: 6 }, "logprobs", /^logprobs: Too big/],
      [{ model: "tiny", prompt: "x", stop: ["a", 3] }, "stop", /^stop: /],
      [{ model: "tiny", prompt: "x", n: 0 }, "n", /^n: Too small/],
      [{ model: "tiny", prompt: [[1, 2], ["x"]] }, "prompt", /^prompt: /],
    ];
    for (const [body, param, message] of cases) {
      const res = await post(body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assertOpenAiError(res.body, param, message);
    }
    const chat = await postJson(`${server.url}/v1/chat/completions`, { model: "tiny", messages: [{ role: 1, content: "hi" }] });
    assertOpenAiError(chat.body, "messages[0].role", /^messages\[0\]\.role: /);
    const infill = await postJson(`${server.url}/infill`, { input_prefix: "x", n_predict: -2 });
    assertOpenAiError(infill.body, "n_predict", /^n_predict: Too small/);
  });

  it("ignores unknown fields, as OpenAI does", async () => {
    const res = await post({ model: "tiny", prompt: "x = 1", max_tokens: 2, user: "someone", best_of: 1, whatever: { a: 1 } });
    assert.equal(res.status, 200);
    assert.equal(res.body.usage.completion_tokens <= 2, true);
  });

  it("says 404 model_not_found for another model", async () => {
    const res = await post({ model: "gpt-4", prompt: "x" });
    assert.equal(res.status, 404);
    assertOpenAiError(res.body, "model", /The model `gpt-4` does not exist/);
    assert.equal(res.body.error.code, "model_not_found");
  });

  it("passes the engine's refusals on as 400s: a prompt past the context, a token outside the vocabulary", async () => {
    const long = await post({ model: "tiny", prompt: promptOf(300, 1) });
    assert.equal(long.status, 400);
    assertOpenAiError(long.body, null, /the prompt has 300 tokens; the model's context length is 256/);
    const vocab = await post({ model: "tiny", prompt: [5, 5000] });
    assert.equal(vocab.status, 400);
    assertOpenAiError(vocab.body, null, /^prompt\[1\]: token id 5000 is outside the vocabulary/);
    const fim = await post({ model: "tiny", prompt: [5, 6], suffix: "x" });
    assert.equal(fim.status, 400);
  });

  it("refuses a body over the limit with 413", async () => {
    const res = await post({ model: "tiny", prompt: "x".repeat(1024 * 1024) });
    assert.equal(res.status, 413);
    assertOpenAiError(res.body, null, /too large/);
    const small = await startServer((await tinyEngine()).engine, { bodyLimit: 100 });
    try {
      const r = await postJson(small.url + URL_COMPLETIONS, { model: "tiny", prompt: "y".repeat(100) });
      assert.equal(r.status, 413);
    } finally {
      await small.close();
    }
  });

  it("counted every failure and logged none: they were the client's", async () => {
    assert.ok((await metric(server, 'decima_requests_failed_total{status="400"}')) >= 15);
    assert.equal(await metric(server, 'decima_requests_failed_total{status="413"}'), 1);
    assert.deepEqual(logged, []);
  });
});

describe("server: API key", () => {
  let server: TestServer;
  before(async () => {
    server = await startServer((await tinyEngine()).engine, { apiKey: "sekrit" });
  });
  after(() => server.close());

  it("wants the bearer key on every route but /health and the playground page", async () => {
    const body = { model: "tiny", prompt: "x", max_tokens: 1 };
    const attempts: Record<string, string>[] = [{}, { authorization: "Bearer wrong" }, { authorization: "sekrit" }];
    for (const headers of attempts) {
      const res = await postJson(server.url + URL_COMPLETIONS, body, headers);
      assert.equal(res.status, 401);
      assertOpenAiError(res.body, null, /invalid API key/);
      assert.equal(res.body.error.code, "invalid_api_key");
    }
    assert.equal((await fetch(`${server.url}/v1/models`)).status, 401);
    assert.equal((await fetch(`${server.url}/metrics`)).status, 401);
    assert.equal((await fetch(`${server.url}/health`)).status, 200);
    assert.equal((await fetch(`${server.url}/`)).status, 200);
    const ok = await postJson(server.url + URL_COMPLETIONS, body, { authorization: "Bearer sekrit" });
    assert.equal(ok.status, 200);
  });
});

describe("server: capacity, disconnects and failures", () => {
  it("refuses a request past a full queue with 503 and Retry-After, then serves again", async () => {
    const { engine } = await slowEngine({ maxBatchSeqs: 1, maxWaiting: 1 });
    const server = await startServer(engine);
    try {
      const long = { model: "tiny", prompt: promptOf(4, 1), max_tokens: 200, ignore_eos: true };
      const running = await openStream(server.url + URL_COMPLETIONS, long);
      const waiting = postJson(server.url + URL_COMPLETIONS, { ...long, max_tokens: 3, stream: false });
      while (engine.stats().waiting === 0) await sleep(1);
      const refused = await postJson(server.url + URL_COMPLETIONS, { ...long, max_tokens: 3 });
      assert.equal(refused.status, 503);
      assert.equal(refused.headers.get("retry-after"), "1");
      assertOpenAiError(refused.body, null, /already waiting/);
      assert.equal(refused.body.error.type, "server_error");
      running.abort();
      const served = await waiting;
      assert.equal(served.status, 200);
      assert.equal(served.body.usage.completion_tokens, 3);
      await idle(engine);
      assert.equal(engine.stats().kvBlocksUsed, 0);
    } finally {
      await server.close();
    }
  });

  it("cancels a stream whose client hangs up, and frees its KV blocks", async () => {
    const { engine } = await slowEngine();
    const server = await startServer(engine);
    try {
      const stream = await openStream(server.url + URL_COMPLETIONS, { model: "tiny", prompt: promptOf(40, 2), max_tokens: 200, ignore_eos: true, n: 2 });
      assert.ok(engine.stats().kvBlocksUsed > 0);
      stream.abort();
      await idle(engine);
      assert.equal(engine.stats().kvBlocksUsed, 0);
      assert.equal(await metric(server, 'decima_requests_finished_total{finish_reason="abort"}'), 2);
      assert.ok((await metric(server, "decima_generation_tokens_total")) < 100, "ended well before max_tokens");
    } finally {
      await server.close();
    }
  });

  it("turns an unexpected failure into a logged 500, or a stream's last event, and goes on serving", async () => {
    const { engine, backend } = await slowEngine();
    const logged: string[] = [];
    const server = await startServer(engine, { log: (line) => logged.push(line) });
    try {
      const request = { model: "tiny", prompt: promptOf(8, 3), max_tokens: 50, ignore_eos: true };
      backend.failWhen = () => true;
      const whole = await postJson(server.url + URL_COMPLETIONS, request);
      assert.equal(whole.status, 500);
      assertOpenAiError(whole.body, null, /^internal error: injected backend failure$/);
      assert.equal(whole.body.error.type, "server_error");

      backend.failWhen = null;
      const stream = await openStream(server.url + URL_COMPLETIONS, request);
      backend.failWhen = () => true;
      let rest = "";
      for (let r = await stream.reader.read(); !r.done; r = await stream.reader.read()) rest += new TextDecoder().decode(r.value);
      const events = rest.split("\n\n").filter(Boolean);
      assert.equal(events.at(-1), "data: [DONE]");
      assertOpenAiError(JSON.parse(events.at(-2)!.slice("data: ".length)), null, /injected backend failure/);
      assert.deepEqual(logged, ["decima serve: internal error: injected backend failure", "decima serve: internal error: injected backend failure"]);

      backend.failWhen = null;
      const after = await postJson(server.url + URL_COMPLETIONS, { ...request, max_tokens: 2 });
      assert.equal(after.status, 200);
      assert.equal(await metric(server, 'decima_requests_failed_total{status="500"}'), 2);
      await idle(engine);
      assert.equal(engine.stats().kvBlocksUsed, 0);
    } finally {
      await server.close();
    }
  });

  it("streams infill without [DONE], and chat/infill errors in the same shape", async () => {
    const { engine } = await tinyEngine();
    const server = await startServer(engine);
    try {
      const raw = await fetch(`${server.url}/infill`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ input_prefix: "a", input_suffix: "b", n_predict: 2, stream: true }),
      });
      const events = await readEvents(raw);
      assert.ok(!events.includes("[DONE]"));
      assert.equal(JSON.parse(events.at(-1)!).stop, true);
      // (A prompt longer than the context is fitted to it, as llama.cpp does: see the server tests.)
      const bad = await postJson(`${server.url}/infill`, { input_prefix: 1 });
      assert.equal(bad.status, 400);
      assertOpenAiError(bad.body, "input_prefix", /^input_prefix: .*expected string/);
    } finally {
      await server.close();
    }
  });
});
