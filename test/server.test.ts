import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import OpenAI from "openai";
import { Engine, type GenerateRequest, type TokenEvent } from "../src/runtime/engine.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { fimPromptIds } from "../src/tokenizer/fim.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";
import { type TestServer, postJson, readEvents, startServer } from "./http-server.js";
import { promptOf, slowEngine, testTokenizer, tinyBackend, tinyEngine } from "./tiny-engine.js";

const PROMPT = "def fib(n):\n    return";
const greedy = { temperature: 0 };

/** What the engine itself gives for a request: the reference the server's answers are checked against. */
async function direct(engine: Engine, request: GenerateRequest): Promise<{ text: string; tokens: TokenEvent[] }> {
  const tokens: TokenEvent[] = [];
  let text = "";
  for await (const e of engine.generate(request)) {
    if (e.type === "token") tokens.push(e);
    if (e.type === "done") text = e.text;
  }
  return { text, tokens };
}

// The engine's schedule must not show through the API: the same answers with async scheduling off and on.
for (const asyncScheduling of [false, true]) describe(`server: OpenAI completions (async scheduling ${asyncScheduling ? "on" : "off"})`, () => {
  let server: TestServer;
  let engine: Engine;
  let client: OpenAI;

  before(async () => {
    engine = (await tinyEngine({ asyncScheduling })).engine;
    server = await startServer(engine);
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  after(() => server.close());

  it("completes a prompt as the engine does, with OpenAI's fields and usage", async () => {
    const res = await client.completions.create({ model: "tiny", prompt: PROMPT, max_tokens: 8, ...greedy });
    const expected = await direct(engine, { prompt: PROMPT, maxTokens: 8 });
    assert.match(res.id, /^cmpl-[0-9a-f]{24}$/);
    assert.equal(res.object, "text_completion");
    assert.equal(res.model, "tiny");
    assert.ok(Math.abs(res.created - Date.now() / 1000) < 5);
    assert.equal(res.choices.length, 1);
    assert.equal(res.choices[0].index, 0);
    assert.equal(res.choices[0].text, expected.text);
    assert.equal(res.choices[0].logprobs, null);
    const promptTokens = testTokenizer().encode(PROMPT).length;
    assert.deepEqual(res.usage, { prompt_tokens: promptTokens, completion_tokens: expected.tokens.length, total_tokens: promptTokens + expected.tokens.length });
    assert.equal(res.choices[0].finish_reason, expected.tokens.length === 8 ? "length" : "stop");
  });

  it("defaults to OpenAI's max_tokens of 16", async () => {
    const res = await client.completions.create({ model: "tiny", prompt: promptOf(5, 1), ignore_eos: true } as never);
    assert.equal(res.usage!.completion_tokens, 16);
    assert.equal(res.choices[0].finish_reason, "length");
  });

  it("streams deltas that add up to the non-streamed text, then [DONE], with usage when asked", async () => {
    const request = { model: "tiny", prompt: PROMPT, max_tokens: 12, ignore_eos: true, ...greedy } as const;
    const whole = await client.completions.create(request);
    const stream = await client.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
    let text = "";
    const finishes: (string | null)[] = [];
    let usage: OpenAI.CompletionUsage | null | undefined = null;
    for await (const chunk of stream) {
      assert.equal(chunk.id.startsWith("cmpl-"), true);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) {
        text += c.text;
        finishes.push(c.finish_reason);
      }
    }
    assert.equal(text, whole.choices[0].text);
    assert.equal(finishes.at(-1), "length");
    assert.equal(finishes.filter((f) => f !== null).length, 1);
    assert.deepEqual(usage, whole.usage);

    const raw = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...request, stream: true }),
    });
    assert.match(raw.headers.get("content-type")!, /^text\/event-stream/);
    const events = await readEvents(raw);
    assert.equal(events.at(-1), "[DONE]");
    assert.equal(JSON.parse(events.at(-2)!).usage, undefined, "no usage chunk unless asked");
  });

  it("gives n choices per prompt, choice i sampled with seed + i", async () => {
    const request = { model: "tiny", prompt: PROMPT, max_tokens: 10, temperature: 1.5, seed: 42, n: 2, ignore_eos: true } as never;
    const res = await client.completions.create(request);
    assert.deepEqual(res.choices.map((c) => c.index), [0, 1]);
    const options = { prompt: PROMPT, maxTokens: 10, temperature: 1.5, ignoreEos: true };
    assert.equal(res.choices[0].text, (await direct(engine, { ...options, seed: 42 })).text);
    assert.equal(res.choices[1].text, (await direct(engine, { ...options, seed: 43 })).text);
    assert.notEqual(res.choices[0].text, res.choices[1].text);
    assert.deepEqual((await client.completions.create(request)).choices, res.choices, "reproducible");
    const promptTokens = testTokenizer().encode(PROMPT).length;
    assert.equal(res.usage!.prompt_tokens, promptTokens, "the prompt counts once");
    assert.equal(res.usage!.completion_tokens, 20);
  });

  it("takes several prompts, as strings or token ids", async () => {
    const ids = [promptOf(6, 2), promptOf(9, 3)];
    const res = await client.completions.create({ model: "tiny", prompt: ids, max_tokens: 4, ignore_eos: true, ...greedy } as never);
    assert.equal(res.choices.length, 2);
    for (const [i, prompt] of ids.entries()) {
      assert.equal(res.choices[i].text, (await direct(engine, { prompt, maxTokens: 4, ignoreEos: true })).text);
    }
    assert.equal(res.usage!.prompt_tokens, 15);
    const texts = await client.completions.create({ model: "tiny", prompt: ["a = 1", "b = 2"], max_tokens: 3, ...greedy });
    assert.deepEqual(texts.choices.map((c) => c.index), [0, 1]);
  });

  it("reports logprobs as OpenAI: tokens, their logprobs, the top alternatives and text offsets", async () => {
    const res = await client.completions.create({ model: "tiny", prompt: PROMPT, max_tokens: 6, logprobs: 3, ignore_eos: true, ...greedy } as never);
    const expected = await direct(engine, { prompt: PROMPT, maxTokens: 6, logprobs: 3, ignoreEos: true });
    const lp = res.choices[0].logprobs!;
    const tokenizer = testTokenizer();
    assert.deepEqual(lp.tokens, expected.tokens.map((e) => tokenizer.decode([e.id])));
    assert.deepEqual(lp.token_logprobs, expected.tokens.map((e) => e.logprob));
    let offset = 0;
    expected.tokens.forEach((e, i) => {
      assert.equal(lp.text_offset![i], offset);
      offset += e.text.length;
      const top = lp.top_logprobs![i];
      // Greedy: the sampled token is the best alternative, so the three alternatives are all there is.
      assert.equal(Object.keys(top).length, 3);
      assert.equal(top[lp.tokens![i]], e.logprob);
      for (const alt of e.top!) assert.equal(top[tokenizer.decode([alt.id])], alt.logprob);
    });
  });

  it("echoes the prompt, with its tokens' logprobs (the first null)", async () => {
    const plain = await client.completions.create({ model: "tiny", prompt: PROMPT, max_tokens: 4, echo: true, ...greedy });
    const expected = await direct(engine, { prompt: PROMPT, maxTokens: 4 });
    assert.equal(plain.choices[0].text, PROMPT + expected.text);

    const res = await client.completions.create({ model: "tiny", prompt: PROMPT, max_tokens: 4, echo: true, logprobs: 1, ...greedy });
    const lp = res.choices[0].logprobs!;
    const promptIds = testTokenizer().encode(PROMPT);
    const n = promptIds.length;
    assert.equal(lp.tokens!.length, n + expected.tokens.length);
    assert.equal(lp.token_logprobs![0], null);
    assert.equal(lp.top_logprobs![0], null);
    for (let i = 1; i < n; i++) assert.ok(lp.token_logprobs![i]! < 0);
    assert.equal(lp.text_offset![0], 0);
    assert.equal(lp.text_offset![n], PROMPT.length, "the completion's first token starts after the prompt");
    assert.deepEqual(lp.tokens!.slice(0, n).join(""), PROMPT);
    assert.deepEqual(lp.token_logprobs!.slice(n), expected.tokens.map((e) => e.logprob));
  });

  it("streams the echo with its prompt logprobs first, then the completion's, as the whole response has them", async () => {
    const request = { model: "tiny", prompt: PROMPT, max_tokens: 4, echo: true, logprobs: 1, ...greedy } as const;
    const whole = (await client.completions.create(request)).choices[0];
    const stream = await client.completions.create({ ...request, stream: true });
    const chunks: OpenAI.CompletionChoice[] = [];
    for await (const chunk of stream) chunks.push(...chunk.choices);
    assert.equal(chunks[0].text, PROMPT);
    assert.equal(chunks[0].logprobs!.tokens!.join(""), PROMPT);
    assert.equal(chunks.map((c) => c.text).join(""), whole.text);
    const streamed = chunks.flatMap((c) => c.logprobs?.token_logprobs ?? []);
    assert.deepEqual(streamed, whole.logprobs!.token_logprobs);
    assert.deepEqual(chunks.flatMap((c) => c.logprobs?.text_offset ?? []), whole.logprobs!.text_offset);
  });

  it("stops before a stop string", async () => {
    const free = await direct(engine, { prompt: PROMPT, maxTokens: 16, ignoreEos: true });
    const stop = free.text.slice(5, 7);
    const cut = free.text.indexOf(stop);
    const res = await client.completions.create({ model: "tiny", prompt: PROMPT, max_tokens: 16, stop: [stop], ignore_eos: true, ...greedy } as never);
    assert.equal(res.choices[0].text, free.text.slice(0, cut));
    assert.equal(res.choices[0].finish_reason, "stop");
  });

  it("fills in the middle with suffix: the engine's tokens for fimPromptIds", async () => {
    const prefix = "def add(a, b):\n    ";
    const suffix = "\n\nprint(add(1, 2))\n";
    const res = await client.completions.create({ model: "tiny", prompt: prefix, suffix, max_tokens: 8, logprobs: 0, ignore_eos: true, ...greedy } as never);
    const ids = fimPromptIds(testTokenizer(), prefix, suffix);
    const expected = await direct(engine, { prompt: ids, maxTokens: 8, ignoreEos: true });
    assert.equal(res.choices[0].text, expected.text);
    assert.deepEqual(res.choices[0].logprobs!.token_logprobs, expected.tokens.map((e) => e.logprob));
    assert.equal(res.usage!.prompt_tokens, ids.length);
  });

  it("lists the served model", async () => {
    const models = await client.models.list();
    assert.deepEqual(models.data.map((m) => [m.id, m.object, m.owned_by]), [["tiny", "model", "decima"]]);
  });

  it("serves llama.cpp's /infill, whole or streamed", async () => {
    const body = { input_prefix: "def add(a, b):\n    ", input_suffix: "\n", prompt: "return", n_predict: 6, temperature: 0 };
    const ids = fimPromptIds(testTokenizer(), body.input_prefix + body.prompt, body.input_suffix);
    const expected = await direct(engine, { prompt: ids, maxTokens: 6 });
    const res = await postJson(`${server.url}/infill`, body);
    assert.equal(res.status, 200);
    assert.equal(res.body.content, expected.text);
    assert.equal(res.body.stop, true);
    assert.equal(res.body.tokens_predicted, expected.tokens.length);
    assert.equal(res.body.tokens_evaluated, ids.length);
    assert.equal(res.body.stopped_limit, expected.tokens.length === 6);
    assert.equal(res.body.stopped_eos, expected.tokens.length < 6);
    assert.equal(res.body.stopped_word, false);
    assert.equal(res.body.timings.predicted_n, expected.tokens.length);

    const raw = await fetch(`${server.url}/infill`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ...body, stream: true }) });
    const events = (await readEvents(raw)).map((e) => JSON.parse(e));
    const last = events.at(-1);
    assert.equal(last.stop, true);
    assert.equal(last.content, "");
    assert.ok(events.slice(0, -1).every((e) => e.stop === false));
    assert.equal(events.map((e) => e.content).join(""), expected.text);

    const worded = await postJson(`${server.url}/infill`, { ...body, n_predict: 16, stop: [expected.text.slice(2, 4)] });
    assert.equal(worded.body.stopped_word, true);
    assert.equal(worded.body.stopping_word, expected.text.slice(2, 4));
  });

  it("serves llama.cpp's /completion, whole or streamed, from text or token ids", async () => {
    const ids = testTokenizer().encode(PROMPT);
    const expected = await direct(engine, { prompt: ids, maxTokens: 6, ignoreEos: true });
    const body = { prompt: PROMPT, n_predict: 6, temperature: 0, ignore_eos: true };
    const res = await postJson(`${server.url}/completion`, body);
    assert.deepEqual([res.status, res.body.content, res.body.tokens_predicted, res.body.tokens_evaluated], [200, expected.text, 6, ids.length]);
    assert.equal(res.body.stop_type, "limit");
    assert.equal((await postJson(`${server.url}/completion`, { ...body, prompt: ids })).body.content, expected.text);
    const raw = await fetch(`${server.url}/completion`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ...body, stream: true }) });
    const events = (await readEvents(raw)).map((e) => JSON.parse(e));
    assert.equal(events.map((e) => e.content).join(""), expected.text);
    assert.equal(events.at(-1).stop, true);
    const refused = await postJson(`${server.url}/completion`, { prompt: promptOf(300, 1) });
    assert.equal(refused.status, 400);
  });

  it("answers /health, and /metrics with what happened", async () => {
    const health = await fetch(`${server.url}/health`);
    assert.equal(health.status, 200);
    assert.deepEqual(await health.json(), { status: "ok" });

    const scrape = async () => {
      const res = await fetch(`${server.url}/metrics`);
      assert.match(res.headers.get("content-type")!, /^text\/plain/);
      const text = await res.text();
      return (name: string) => Number(new RegExp(`^${name.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(text)?.[1] ?? NaN);
    };
    const earlier = await scrape();
    await client.completions.create({ model: "tiny", prompt: PROMPT, max_tokens: 5, ignore_eos: true } as never);
    await postJson(`${server.url}/v1/completions`, { model: "nope", prompt: "x" });
    const value = await scrape();
    assert.equal(value("decima_kv_blocks_total"), 64);
    assert.equal(value("decima_kv_blocks_used"), 0);
    assert.equal(value("decima_requests_running"), 0);
    assert.equal(value("decima_requests_waiting"), 0);
    const length = 'decima_requests_finished_total{finish_reason="length"}';
    assert.equal(value(length), earlier(length) + 1);
    assert.equal(value("decima_generation_tokens_total"), earlier("decima_generation_tokens_total") + 5);
    assert.equal(value("decima_prompt_tokens_total"), earlier("decima_prompt_tokens_total") + testTokenizer().encode(PROMPT).length);
    assert.equal(value('decima_requests_failed_total{status="404"}'), 1);
    const stops = value('decima_requests_finished_total{finish_reason="stop"}') || 0;
    assert.equal(value("decima_e2e_request_latency_seconds_count"), value(length) + stops);
    // Every request so far had a first token (the requests for none come after this test).
    assert.ok(value("decima_time_to_first_token_seconds_count") >= value(length));
    assert.ok(value("decima_inter_token_latency_seconds_count") >= 4 * value(length));
    assert.ok(value("decima_prefix_cache_hit_rate") > 0);

    // The same 40-token prompt twice: the second finds its two full 16-token blocks cached.
    const cached = "decima_cached_prompt_tokens_total";
    for (let i = 0; i < 2; i++) await client.completions.create({ model: "tiny", prompt: promptOf(40, 9), max_tokens: 1 } as never);
    assert.equal((await scrape())(cached), value(cached) + 32);
    assert.ok(value("process_resident_memory_bytes") > 0);
  });

  it("scores a prompt without generating: max_tokens 0 with echo and logprobs", async () => {
    const request = { model: "tiny", prompt: PROMPT, echo: true, logprobs: 1, ...greedy } as const;
    const generating = (await client.completions.create({ ...request, max_tokens: 2 })).choices[0].logprobs!;
    const res = await client.completions.create({ ...request, max_tokens: 0 });
    const [choice] = res.choices;
    assert.deepEqual([choice.text, choice.finish_reason, res.usage!.completion_tokens], [PROMPT, "length", 0]);
    const n = choice.logprobs!.tokens!.length;
    assert.deepEqual(choice.logprobs!.token_logprobs, generating.token_logprobs!.slice(0, n));
    const stream = await client.completions.create({ ...request, max_tokens: 0, stream: true });
    const chunks: OpenAI.CompletionChoice[] = [];
    for await (const chunk of stream) chunks.push(...chunk.choices);
    assert.equal(chunks.map((c) => c.text).join(""), PROMPT);
    assert.equal(chunks.at(-1)!.finish_reason, "length");
  });

  it("computes an /infill of n_predict 0 into the prefix cache, as llama.vscode sends its context chunks", async () => {
    // llama.vscode's request for its ring buffer of chunks, fields the server does not use included.
    const context = {
      input_extra: [{ filename: "util.py", text: "def mul(a, b):\n    return a * b\n\n\ndef sub(a, b):\n    return a - b\n" }],
      input_prefix: "def add(a, b):\n    ",
      input_suffix: "\n",
      prompt: "",
    };
    const warm = await postJson(`${server.url}/infill`, { ...context, n_predict: 0, samplers: [], cache_prompt: true, t_max_prompt_ms: 500, t_max_predict_ms: 1 });
    assert.equal(warm.status, 200);
    assert.deepEqual([warm.body.content, warm.body.tokens_predicted, warm.body.stop_type, warm.body.tokens_cached], ["", 0, "limit", 0]);
    assert.ok(warm.body.tokens_evaluated > 32 && warm.body.timings.prompt_ms >= 0);
    const completion = await postJson(`${server.url}/infill`, { ...context, n_predict: 4, temperature: 0 });
    assert.equal(completion.body.tokens_predicted, 4);
    assert.equal(completion.body.tokens_cached, Math.floor((warm.body.tokens_evaluated - 1) / 16) * 16, "every full block but the last token's");
  });

  it("fits an /infill of more context than the model holds, as llama.cpp does, and says so", async () => {
    const chunk = (i: number) => ({ filename: `f${i}.py`, text: Array.from({ length: 12 }, (_, k) => `v${i}_${k} = ${k}\n`).join("") });
    const res = await postJson(`${server.url}/infill`, { input_extra: Array.from({ length: 40 }, (_, i) => chunk(i)), input_prefix: "x = ", n_predict: 8 });
    assert.equal(res.status, 200);
    assert.equal(res.body.truncated, true);
    assert.ok(res.body.tokens_evaluated <= 256 - 8, `${res.body.tokens_evaluated} prompt tokens`);
    assert.equal(res.body.tokens_predicted + res.body.tokens_evaluated <= 256, true);
    const small = await postJson(`${server.url}/infill`, { input_extra: [chunk(0)], input_prefix: "x = ", n_predict: 8 });
    assert.equal(small.body.truncated, false);
  });

  it("ends an /infill at llama.cpp's t_max_predict_ms once its text has a newline, and at its n_indent", async () => {
    const slow = await startServer((await slowEngine()).engine); // a token every 2 ms or more
    try {
      const body = { input_prefix: "x = 1\n", input_suffix: "\n", n_predict: 24, temperature: 0 };
      const free = (await postJson(`${slow.url}/infill`, body)).body;
      const newline = free.content.indexOf("\n");
      assert.ok(newline >= 0 && free.content.length > newline + 8, "this prompt's completion has a newline early, and goes on");
      const limited = (await postJson(`${slow.url}/infill`, { ...body, t_max_predict_ms: 1 })).body;
      assert.deepEqual([limited.stop_type, limited.stopped_limit], ["limit", true]);
      assert.ok(limited.content.length > newline && free.content.startsWith(limited.content), JSON.stringify(limited.content));
      assert.ok(limited.tokens_predicted < free.tokens_predicted);
      const raw = await fetch(`${slow.url}/infill`, { method: "POST", body: JSON.stringify({ ...body, t_max_predict_ms: 1, stream: true }), headers: { "content-type": "application/json" } });
      const events = (await readEvents(raw)).map((e) => JSON.parse(e));
      assert.equal(events.map((e) => e.content).join(""), limited.content);
      assert.equal(events.at(-1).stop_type, "limit");
      // n_indent: the first later line indented less than 4 ends it before its first other character.
      const under = [...free.content.matchAll(/\n([ \t]*)(?=[^ \t\n])/g)].find((m) => m[1].length < 4)!;
      const indented = (await postJson(`${slow.url}/infill`, { ...body, n_indent: 4 })).body;
      assert.equal(indented.content, free.content.slice(0, under.index + 1 + under[1].length));
      assert.equal(indented.stop_type, "limit");
    } finally {
      await slow.close();
    }
  });
});

describe("server: tokenize", () => {
  let server: TestServer;
  before(async () => {
    server = await startServer((await tinyEngine()).engine);
  });
  after(() => server.close());

  it("tokenizes and detokenizes in vLLM's and llama.cpp's forms", async () => {
    const text = "def add(a, b):\n    return a + b\n";
    const ids = testTokenizer().encode(text);
    const vllm = await postJson(`${server.url}/tokenize`, { model: "tiny", prompt: text });
    assert.deepEqual(vllm.body, { tokens: ids, count: ids.length, max_model_len: 256 });
    const llama = await postJson(`${server.url}/tokenize`, { content: text, with_pieces: true });
    const pieces = llama.body.tokens as { id: number; piece: string }[];
    assert.deepEqual(pieces.map((t) => t.id), testTokenizer().encode(text, { addSpecialTokens: false }));
    assert.equal(pieces.map((t) => t.piece).join(""), text);
    assert.deepEqual((await postJson(`${server.url}/detokenize`, { tokens: ids })).body, { prompt: text, content: text });
    const refusals: [string, object, number][] = [
      ["/tokenize", { prompt: "a", content: "b" }, 400],
      ["/tokenize", {}, 400],
      ["/tokenize", { model: "nope", prompt: "a" }, 404],
      ["/detokenize", { tokens: [1, 99999] }, 400],
      ["/detokenize", { tokens: "1,2" }, 400],
    ];
    for (const [path, body, status] of refusals) assert.equal((await postJson(server.url + path, body)).status, status, JSON.stringify(body));
  });
});

describe("server: chat completions", () => {
  const files = buildTokenizerFiles();
  const template =
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
  const chatTokenizer = Tokenizer.fromObjects(files.tokenizerJson, { ...files.tokenizerConfig, chat_template: template });
  let server: TestServer;
  let engine: Engine;
  let client: OpenAI;
  const messages = [
    { role: "system" as const, content: "You write Python." },
    { role: "user" as const, content: [{ type: "text" as const, text: "Sum a list." }] },
  ];
  const promptIds = () =>
    chatTokenizer.encode(
      chatTokenizer.applyChatTemplate(
        [
          { role: "system", content: "You write Python." },
          { role: "user", content: "Sum a list." },
        ],
        { addGenerationPrompt: true },
      ),
      { addSpecialTokens: false },
    );

  before(async () => {
    engine = new Engine({ backend: await tinyBackend(), tokenizer: chatTokenizer, modelId: "tiny-chat" });
    server = await startServer(engine, { servedModelName: "chatty" });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  after(() => server.close());

  it("renders the chat template with the generation prompt and completes it", async () => {
    const res = await client.chat.completions.create({ model: "chatty", messages, max_tokens: 8, ...greedy });
    const expected = await direct(engine, { prompt: promptIds(), maxTokens: 8 });
    assert.match(res.id, /^chatcmpl-/);
    assert.equal(res.object, "chat.completion");
    assert.equal(res.model, "chatty");
    assert.deepEqual(res.choices[0].message, { role: "assistant", content: expected.text });
    assert.equal(res.usage!.prompt_tokens, promptIds().length);
    assert.equal(res.usage!.completion_tokens, expected.tokens.length);
    const byId = await client.chat.completions.create({ model: "tiny-chat", messages, max_completion_tokens: 8, ...greedy });
    assert.equal(byId.choices[0].message.content, expected.text, "the engine's model id is accepted too");
    // llama.cpp's -1 (no limit), as llama.vscode sends it: to the end of the context, or a stop.
    const unlimited = await postJson(`${server.url}/v1/chat/completions`, { model: "chatty", messages, max_tokens: -1, ignore_eos: true, ...greedy });
    assert.equal(unlimited.body.usage.completion_tokens, 256 - promptIds().length);
    const zero = await postJson(`${server.url}/v1/chat/completions`, { model: "chatty", messages, max_tokens: 0 });
    assert.equal(zero.status, 400);
  });

  it("tokenizes a conversation as the chat route renders it", async () => {
    const res = await postJson(`${server.url}/tokenize`, { model: "chatty", messages });
    assert.deepEqual(res.body.tokens, promptIds());
  });

  it("streams the role, then content deltas that add up, then the finish reason", async () => {
    const request = { model: "chatty", messages, max_tokens: 10, n: 2, seed: 7, temperature: 1.2 } as const;
    const whole = await client.chat.completions.create(request);
    const stream = await client.chat.completions.create({ ...request, stream: true, stream_options: { include_usage: true } });
    const texts = ["", ""];
    const firsts: unknown[] = [];
    const finishes: (string | null)[] = [null, null];
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      assert.equal(chunk.object, "chat.completion.chunk");
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) {
        if (c.delta.role) firsts.push([c.index, c.delta.role]);
        texts[c.index] += c.delta.content ?? "";
        if (c.finish_reason) finishes[c.index] = c.finish_reason;
      }
    }
    assert.deepEqual(firsts, [
      [0, "assistant"],
      [1, "assistant"],
    ]);
    assert.deepEqual(texts, whole.choices.map((c) => c.message.content));
    assert.deepEqual(finishes, whole.choices.map((c) => c.finish_reason));
    assert.deepEqual(usage, whole.usage);
  });

  it("reports chat logprobs", async () => {
    const res = await client.chat.completions.create({ model: "chatty", messages, max_tokens: 4, logprobs: true, top_logprobs: 2, ...greedy });
    const content = res.choices[0].logprobs!.content!;
    const expected = await direct(engine, { prompt: promptIds(), maxTokens: 4, logprobs: 2 });
    assert.deepEqual(content.map((c) => c.logprob), expected.tokens.map((e) => e.logprob));
    assert.ok(content.every((c) => c.top_logprobs.length === 2 && c.bytes!.length === Buffer.byteLength(c.token)));
  });

  it("refuses a model without a chat template with a 400 that says so", async () => {
    const { engine: plain } = await tinyEngine();
    const other = await startServer(plain);
    try {
      const res = await postJson(`${other.url}/v1/chat/completions`, { model: "tiny", messages: [{ role: "user", content: "hi" }] });
      assert.equal(res.status, 400);
      assert.equal(res.body.error.type, "invalid_request_error");
      assert.match(res.body.error.message, /has no chat template/);
    } finally {
      await other.close();
    }
  });
});
