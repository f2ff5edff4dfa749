import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { StepBatch } from "../src/engine/backend.js";
import { DecimaError } from "../src/errors.js";
import type { DoneEvent, Engine, GenerateEvent, GenerateRequest } from "../src/runtime/engine.js";
import { idle, promptOf, testTokenizer, tinyEngine } from "./tiny-engine.js";

async function collect(engine: Engine, request: GenerateRequest): Promise<GenerateEvent[]> {
  const events: GenerateEvent[] = [];
  for await (const event of engine.generate(request)) events.push(event);
  return events;
}

function doneOf(events: GenerateEvent[]): DoneEvent {
  const done = events.at(-1)!;
  assert.equal(done.type, "done");
  return done;
}

/** The text the events streamed, as a consumer joins it. */
function textOf(events: GenerateEvent[]): string {
  return events.flatMap((e) => (e.type === "token" || e.type === "text" ? [e.text] : [])).join("");
}

async function rejection(promise: Promise<unknown>): Promise<DecimaError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof DecimaError, `not a DecimaError: ${err}`);
    return err;
  }
  assert.fail("expected a rejection");
}

/** All blocks back: none held by a sequence, every one available to new requests. */
function assertPoolEmpty(engine: Engine): void {
  const stats = engine.stats();
  assert.equal(stats.running + stats.waiting, 0);
  assert.equal(stats.kvBlocksUsed, 0);
}

const noEos = { ignoreEos: true };

/** Whether some row of the batch takes its input from the step before. */
const carries = (batch: StepBatch) => batch.fromPrevious?.some((row) => row >= 0) ?? false;

describe("Engine", () => {
  it("streams token events whose texts add up to the completion, then done", async () => {
    const { engine } = await tinyEngine();
    const events = await collect(engine, { prompt: "def fib(n):\n", maxTokens: 12, ...noEos });
    const done = doneOf(events);
    const tokens = events.filter((e) => e.type === "token");
    assert.equal(tokens.length, 12);
    assert.equal(done.finishReason, "length");
    assert.deepEqual(done.promptTokens, testTokenizer().encode("def fib(n):\n"));
    assert.deepEqual(done.tokens, tokens.map((e) => e.id));
    assert.equal(textOf(events), done.text);
    for (const e of tokens) assert.ok(e.logprob <= 0 && e.logprob > -50);
    assert.ok(done.timings.timeToFirstTokenMs >= done.timings.queuedMs);
    assert.ok(done.timings.decodeMs > 0 && done.timings.tokensPerSecond > 0);
    assert.equal(engine.stats().generatedTokensTotal, 12);
    assert.equal(engine.stats().promptTokensTotal, done.promptTokens.length);
    assertPoolEmpty(engine);
    await engine.close();
  });

  it("gives the same greedy tokens whether prompts are prefilled whole or in chunks", async () => {
    const prompt = promptOf(70, 3);
    const whole = await tinyEngine();
    const chunked = await tinyEngine({ maxBatchTokens: 16 });
    const a = await whole.engine.complete({ prompt, maxTokens: 10, ...noEos });
    const b = await chunked.engine.complete({ prompt, maxTokens: 10, ...noEos });
    assert.deepEqual(b.tokens, a.tokens);
    assert.ok(chunked.backend.batches.filter((batch) => batch.tokens.length > 1).length >= 5, "the prompt took several steps");
    assert.ok(chunked.backend.batches.every((batch) => batch.tokens.length <= 16));
    const wholeLogits = await whole.engine.logits(prompt);
    const chunkedLogits = await chunked.engine.logits(prompt);
    assert.equal(chunkedLogits.length, 70);
    chunkedLogits.forEach((row, i) => row.forEach((x, j) => assert.ok(Math.abs(x - wholeLogits[i][j]) < 1e-4)));
    await whole.engine.close();
    await chunked.engine.close();
  });

  it("batches concurrent requests of different lengths, with the same tokens as one at a time", async () => {
    const lengths = [5, 40, 17, 1, 60, 33];
    const requests = lengths.map((len, i) => ({ prompt: promptOf(len, i), maxTokens: 4 + 3 * i, ...noEos }));
    const alone = await tinyEngine();
    const expected: number[][] = [];
    for (const r of requests) expected.push((await alone.engine.complete(r)).tokens);

    const { engine, backend } = await tinyEngine({ maxBatchTokens: 64 });
    const results = await Promise.all(requests.map((r) => engine.complete(r)));
    assert.deepEqual(
      results.map((d) => d.tokens),
      expected,
    );
    assert.ok(Math.max(...backend.batches.map((b) => b.contextLens.length)) >= 4, "requests ran together");
    assertPoolEmpty(engine);
    await alone.engine.close();
    await engine.close();
  });

  it("runs several decode steps per backend call with the same tokens as one step per call", async () => {
    const prompts = [promptOf(9, 1), promptOf(30, 2), promptOf(17, 3)];
    const run = async (decodeSteps: number) => {
      // No time cap on a call: it is not what this test checks, and on a loaded machine (CI runs test files
      // in parallel on two cores) slow CPU steps made it cut calls short (21 calls instead of under 13).
      const { engine, backend } = await tinyEngine({ decodeSteps, maxCallMs: 1e9 });
      const done = await Promise.all(
        prompts.map((prompt, i) => engine.complete({ prompt, maxTokens: 20 + 7 * i, temperature: i === 2 ? 0.8 : 0, seed: 5, ...noEos })),
      );
      // A stop string met inside a multi-step call ends the request there.
      const first = done[0].text.slice(3, 6);
      const stopped = await engine.complete({ prompt: prompts[0], maxTokens: 20, stop: [first], ...noEos });
      assertPoolEmpty(engine);
      await engine.close();
      return { tokens: done.map((d) => d.tokens), stopped: stopped.text, calls: backend.batches.length, steps: backend.batches.map((b) => b.steps ?? 1) };
    };
    const one = await run(1);
    const many = await run(16);
    assert.deepEqual(many.tokens, one.tokens);
    assert.equal(many.stopped, one.stopped);
    assert.ok(many.steps.some((k) => k > 1), "some calls ran several steps");
    assert.ok(many.calls < one.calls / 3, `${many.calls} calls instead of ${one.calls}`);
  });

  it("queues the next decode call before the last one's tokens are back, with the same events as without", async () => {
    const prompts = [promptOf(9, 1), promptOf(30, 2), promptOf(17, 3)];
    const requests = prompts.map((prompt, i) => ({ prompt, maxTokens: 18 + 5 * i, temperature: i === 2 ? 0.8 : 0, seed: 5, ...noEos }));
    /** What a consumer sees, timings aside. */
    const seen = (events: GenerateEvent[]) => events.map((e) => (e.type === "done" ? [e.finishReason, e.tokens, e.text] : e));
    const run = async (asyncScheduling: boolean) => {
      const { engine, backend } = await tinyEngine({ asyncScheduling, decodeSteps: 4, maxCallMs: 1e9 });
      const plain = await Promise.all(requests.map((r) => collect(engine, r)));
      // The first request again, ended by a stop token and then by a stop string in the middle of a call,
      // with calls for it already queued; the others go on.
      const tokens = doneOf(plain[0]).tokens;
      const text = doneOf(plain[0]).text;
      const stopped = await Promise.all([
        collect(engine, { ...requests[0], stopTokenIds: [tokens[6]] }),
        collect(engine, { ...requests[0], stop: [text.slice(-6, -3)] }),
        ...requests.slice(1).map((r) => collect(engine, r)),
      ]);
      assertPoolEmpty(engine);
      // A failed call fails its requests, with the call queued behind it; the engine keeps serving.
      backend.failWhen = (batch) => batch.steps === 4;
      await assert.rejects(engine.complete(requests[1]), /injected backend failure/);
      backend.failWhen = null;
      assertPoolEmpty(engine);
      const after = await collect(engine, requests[1]);
      await engine.close();
      const reasons = stopped.slice(0, 2).map((events) => doneOf(events).finishReason);
      return { events: [...plain, ...stopped, after].map(seen), reasons, continued: backend.batches.filter(carries).length };
    };
    const sync = await run(false);
    const queued = await run(true);
    assert.deepEqual(queued.events, sync.events);
    assert.equal(sync.continued, 0);
    assert.ok(queued.continued > 5, `${queued.continued} continuing calls`);
    assert.deepEqual(queued.reasons, ["stop", "stop"]);
  });

  it("queues each call behind the one in flight as requests arrive and end, with the same events as without", async () => {
    const base = { prompt: promptOf(9, 1), maxTokens: 24, ...noEos };
    const requests: GenerateRequest[] = [
      { prompt: promptOf(30, 2), maxTokens: 10, temperature: 0.8, seed: 3, ...noEos },
      { prompt: promptOf(12, 3), maxTokens: 12, repetitionPenalty: 1.3, ...noEos },
      { prompt: promptOf(17, 4), maxTokens: 8, promptLogprobs: true, logprobs: 2, ...noEos },
      { prompt: promptOf(40, 5), maxTokens: 6, ...noEos },
    ];
    const seen = (events: GenerateEvent[]) => events.map((e) => (e.type === "done" ? [e.finishReason, e.tokens, e.text, e.promptLogprobs] : e));
    const run = async (asyncScheduling: boolean, stopTokenIds: number[] = []) => {
      // Chunks of 16 prompt tokens, so that prompts run over several calls too.
      const { engine, backend } = await tinyEngine({ asyncScheduling, decodeSteps: 4, maxCallMs: 1e9, maxBatchTokens: 16 });
      // The k-th token of a leading request brings request k, and a request cancelled after its first token.
      const others: Promise<GenerateEvent[]>[] = [];
      const cancelled = new AbortController();
      const lead: GenerateEvent[] = [];
      for await (const event of engine.generate({ ...base, stopTokenIds })) {
        lead.push(event);
        const k = lead.filter((e) => e.type === "token").length;
        if (event.type !== "token") continue;
        if (k <= requests.length) others.push(collect(engine, requests[k - 1]));
        if (k === 2) {
          const abort = { ...base, signal: cancelled.signal };
          others.push(collect(engine, abort).then((events) => [doneOf(events)]));
          setImmediate(() => cancelled.abort());
        }
      }
      const events = await Promise.all(others);
      assertPoolEmpty(engine);
      await engine.close();
      const mixed = backend.batches.filter((b) => carries(b) && b.fromPrevious!.includes(-1)).length;
      return { lead, events, mixed };
    };
    const sync = await run(false);
    const queued = await run(true);
    assert.deepEqual(seen(queued.lead), seen(sync.lead));
    const keep = (r: { events: GenerateEvent[][] }) => r.events.filter((e) => e.length > 1).map(seen);
    assert.deepEqual(keep(queued), keep(sync));
    assert.equal(keep(sync).length, requests.length);
    for (const r of [sync, queued]) assert.ok(r.events.some((e) => e.length === 1 && doneOf(e).finishReason === "abort"));
    assert.equal(sync.mixed, 0);
    assert.ok(queued.mixed > 2, `${queued.mixed} calls carried some rows and took others from the host`);
    // The leading request ended by a stop token while calls for it were queued.
    const tokens = doneOf(sync.lead).tokens;
    const at = tokens.findIndex((id, i) => i >= 6 && !tokens.slice(0, i).includes(id));
    assert.ok(at > 0, "a token first seen after the sixth");
    const stopped = await run(true, [tokens[at]]);
    assert.equal(doneOf(stopped.lead).finishReason, "stop");
    assert.deepEqual(doneOf(stopped.lead).tokens, tokens.slice(0, at));
  });

  it("reproduces seeded sampling, alone or batched with others", async () => {
    const { engine } = await tinyEngine();
    const request = { prompt: promptOf(12, 5), maxTokens: 16, temperature: 1.2, topP: 0.95, seed: 1234, ...noEos };
    const first = await engine.complete(request);
    const [second] = await Promise.all([
      engine.complete(request),
      engine.complete({ prompt: promptOf(30, 6), maxTokens: 20, temperature: 1, ...noEos }),
    ]);
    const other = await engine.complete({ ...request, seed: 99 });
    assert.deepEqual(second.tokens, first.tokens);
    assert.notDeepEqual(other.tokens, first.tokens);
    await engine.close();
  });

  it("reuses cached prompt blocks, still computing the last prompt token", async () => {
    const { engine } = await tinyEngine({ blockSize: 16 });
    const prompt = promptOf(48, 8); // three full blocks: the third holds the last token
    const cold = await engine.complete({ prompt, maxTokens: 6, ...noEos });
    const warm = await engine.complete({ prompt, maxTokens: 6, ...noEos });
    assert.equal(cold.cachedPromptTokens, 0);
    assert.equal(warm.cachedPromptTokens, 32);
    assert.deepEqual(warm.tokens, cold.tokens);
    const stats = engine.stats();
    assert.equal(stats.prefixCacheQueries, 4);
    assert.equal(stats.prefixCacheHits, 2);
    // A follow-up that extends the conversation reuses the generated part too.
    const chat = [...prompt, ...cold.tokens, 5, 6, 7, 8, 9, 10, 11];
    const follow = await engine.complete({ prompt: chat, maxTokens: 2, ...noEos });
    assert.equal(follow.cachedPromptTokens, 48);
    assertPoolEmpty(engine);
    await engine.close();
  });

  it("reports prompt log-probs from the teacher-forced logits, without the prefix cache", async () => {
    const { engine } = await tinyEngine();
    const prompt = promptOf(20, 9);
    await engine.complete({ prompt, maxTokens: 1 }); // warms the prefix cache
    const events = [];
    for await (const e of engine.generate({ prompt, maxTokens: 1, promptLogprobs: true, ...noEos })) events.push(e);
    const done = events.at(-1) as DoneEvent;
    assert.equal(done.cachedPromptTokens, 0);
    // Streamed first, before any token: the same ids and log-probs as the done event's.
    assert.deepEqual(events[0], { type: "prompt", tokens: prompt, logprobs: done.promptLogprobs });
    assert.equal(events[1].type, "token");
    const logits = await engine.logits(prompt);
    assert.equal(logits.length, 20);
    assert.equal(logits[0].length, 1024);
    const expected = [null, ...prompt.slice(1).map((id, i) => logSoftmaxAt(logits[i], id))];
    assert.equal(done.promptLogprobs!.length, 20);
    done.promptLogprobs!.forEach((lp, i) => {
      if (expected[i] === null) assert.equal(lp, null);
      else assert.ok(Math.abs(lp! - expected[i]!) < 1e-5, `position ${i}: ${lp} vs ${expected[i]}`);
    });
    // The first sampled token is the argmax of the last position's logits.
    assert.equal(done.tokens[0], argmax(logits[19]));
    await engine.close();
  });

  it("reports the requested number of alternatives, best first", async () => {
    const { engine } = await tinyEngine();
    const events = await collect(engine, { prompt: promptOf(8, 2), maxTokens: 3, logprobs: 4, ...noEos });
    for (const e of events) {
      if (e.type !== "token") continue;
      assert.equal(e.top!.length, 4);
      assert.equal(e.top![0].id, e.id, "greedy picks the most likely");
      assert.equal(e.top![0].logprob, e.logprob);
      assert.ok(e.top![0].logprob >= e.top![1].logprob && e.top![2].logprob >= e.top![3].logprob);
    }
    await engine.close();
  });

  it("stops at a stop string without emitting it or anything after it", async () => {
    const { engine } = await tinyEngine();
    const prompt = "function add(a, b) {";
    const free = await engine.complete({ prompt, maxTokens: 30, ...noEos });
    assert.ok(free.text.length > 12, `too little text to test with: ${JSON.stringify(free.text)}`);
    const stop = free.text.slice(5, 9);
    const cut = free.text.indexOf(stop);
    const events = await collect(engine, { prompt, maxTokens: 30, stop: [stop], ...noEos });
    const done = doneOf(events);
    assert.equal(done.finishReason, "stop");
    assert.equal(done.text, free.text.slice(0, cut));
    assert.equal(textOf(events), done.text);
    assertPoolEmpty(engine);
    await engine.close();
  });

  it("stops at stop token ids, and at the context length", async () => {
    const { engine } = await tinyEngine({ maxPositionEmbeddings: 40 });
    const free = await engine.complete({ prompt: promptOf(6, 1), maxTokens: 8, ...noEos });
    const stopTokenIds = [free.tokens[3]];
    const stopped = await engine.complete({ prompt: promptOf(6, 1), maxTokens: 8, stopTokenIds, ...noEos });
    assert.equal(stopped.finishReason, "stop");
    assert.deepEqual(stopped.tokens, free.tokens.slice(0, free.tokens.indexOf(free.tokens[3])));
    const long = await engine.complete({ prompt: promptOf(36, 1), maxTokens: 100, ...noEos });
    assert.equal(long.finishReason, "length");
    assert.equal(long.tokens.length, 4);
    await engine.close();
  });

  it("ends an aborted request at the next step and frees its blocks", async () => {
    const { engine } = await tinyEngine();
    const controller = new AbortController();
    const events: GenerateEvent[] = [];
    const request = { prompt: promptOf(10, 1), maxTokens: 50, signal: controller.signal, ...noEos };
    for await (const e of engine.generate(request)) {
      events.push(e);
      if (events.length === 3) controller.abort();
    }
    const done = doneOf(events);
    assert.equal(done.finishReason, "abort");
    assert.ok(done.tokens.length >= 3 && done.tokens.length < 50);
    assertPoolEmpty(engine);

    const early = await collect(engine, { prompt: promptOf(10, 1), signal: AbortSignal.abort(), ...noEos });
    assert.equal(doneOf(early).finishReason, "abort");
    assert.deepEqual(doneOf(early).tokens, []);
    await engine.close();
  });

  it("cancels a request whose consumer leaves the loop early", async () => {
    const { engine } = await tinyEngine();
    let seen = 0;
    for await (const e of engine.generate({ prompt: promptOf(10, 1), maxTokens: 50, ...noEos })) {
      if (e.type === "token" && ++seen === 2) break;
    }
    await idle(engine);
    assertPoolEmpty(engine);
    assert.ok(engine.stats().generatedTokensTotal < 50);
    await engine.close();
  });

  it("refuses bad requests on the first next(), and a full queue with a capacity error", async () => {
    const { engine } = await tinyEngine({ numBlocks: 8, maxWaiting: 2 });
    const bad = await rejection(engine.complete({ prompt: "x", temperature: -1 }));
    assert.equal(bad.kind, "input");
    assert.match(bad.message, /^temperature: /);
    const outside = await rejection(engine.complete({ prompt: [5, 1024] }));
    assert.equal(outside.message, "prompt[1]: token id 1024 is outside the vocabulary (0..1023)");
    const huge = await rejection(engine.complete({ prompt: promptOf(100, 1), maxTokens: 100 }));
    assert.equal(huge.kind, "input");
    assert.match(huge.message, /needs 13 KV blocks .* the KV pool has 8/);
    const long = await rejection(engine.complete({ prompt: promptOf(256, 1) }));
    assert.equal(long.message, "the prompt has 256 tokens; the model's context length is 256");

    // Requests are queued synchronously by their first next(): the third finds the queue full.
    const its = [1, 2, 3].map((i) => engine.generate({ prompt: promptOf(4, i), maxTokens: 2, ...noEos }));
    const firsts = its.map((it) => it.next());
    const full = await rejection(firsts[2]);
    assert.equal(full.kind, "capacity");
    for (const it of its.slice(0, 2)) while (!(await it.next()).done);
    assertPoolEmpty(engine);
    await engine.close();
  });

  it("fails only the requests of a failed step, and keeps serving", async () => {
    const { engine, backend } = await tinyEngine();
    backend.failWhen = (batch) => batch.tokens.includes(999);
    const failed = engine.complete({ prompt: [999, 20, 21], maxTokens: 4 });
    await assert.rejects(failed, /injected backend failure/);
    assertPoolEmpty(engine);
    const ok = await engine.complete({ prompt: [20, 21], maxTokens: 4, ...noEos });
    assert.equal(ok.tokens.length, 4);
    await engine.close();
  });

  it("fails pending requests on close, and refuses new ones", async () => {
    const { engine } = await tinyEngine();
    const pending = engine.complete({ prompt: promptOf(10, 1), maxTokens: 200, ...noEos });
    await new Promise((r) => setImmediate(r));
    await engine.close();
    const err = await rejection(pending);
    assert.equal(err.message, "the engine was closed");
    assert.equal((await rejection(engine.complete({ prompt: "x" }))).message, "the engine is closed");
  });

  it("builds a fill-in-the-middle prompt from prefix and suffix", async () => {
    const { engine } = await tinyEngine();
    const fim = testTokenizer().fim!;
    const request = { prompt: "def f(x):\n    ", suffix: "\n    return y\n", maxTokens: 3, ...noEos };
    const done = await engine.complete(request);
    assert.equal(done.promptTokens[0], fim.prefix);
    assert.equal(done.promptTokens.at(-1), fim.middle);
    assert.ok(done.promptTokens.includes(fim.suffix));
    await engine.close();
  });
});

function logSoftmaxAt(row: Float32Array, id: number): number {
  const max = Math.max(...row);
  const sum = row.reduce((s, x) => s + Math.exp(x - max), 0);
  return row[id] - max - Math.log(sum);
}

function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}
