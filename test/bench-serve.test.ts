import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { DecimaError } from "../src/errors.js";
import { type LoadReport, percentiles, runLoad, soakVerdict } from "../src/server/benchmark.js";
import { startServer } from "./http-server.js";
import { tinyEngine } from "./tiny-engine.js";

const MiB = 2 ** 20;

describe("bench-serve's load", () => {
  it("runs concurrent streaming clients and reports what they saw and what the prefix cache saved", async () => {
    const { engine } = await tinyEngine({ blockSize: 16 });
    const server = await startServer(engine, { apiKey: "k" });
    try {
      const load = { url: server.url, apiKey: "k", clients: 4, requests: 10, promptLen: 40, genLen: 6, sharedPrefix: 32, sampleEveryS: 0.05, rampUpS: 0.05 };
      const started = performance.now();
      const report = await runLoad(load);
      // The last of 4 clients starts 37.5 ms in (timers may round a millisecond either way).
      assert.ok(performance.now() - started >= 35, "the last client started after its share of the ramp-up");
      assert.equal(report.model, "tiny");
      assert.equal(report.requests, 10);
      assert.equal(report.errors, 0);
      assert.equal(report.outputTokens, 60, "exactly gen-len tokens each");
      assert.ok(Math.abs(report.outputTokensPerS - 60 / report.durationS) < 1e-9);
      assert.ok(report.requestsPerS > 0);
      assert.ok(report.timeToFirstTokenMs.p50 > 0 && report.timeToFirstTokenMs.p99 >= report.timeToFirstTokenMs.p50);
      assert.ok(report.interTokenLatencyMs.p99 >= report.interTokenLatencyMs.p50);
      assert.ok(report.timePerOutputTokenMs.p50 > 0 && report.timePerOutputTokenMs.p99 >= report.timePerOutputTokenMs.p50);
      // Two full 16-token blocks shared: the first request computes them, the nine others find them cached.
      assert.ok(report.prefixCache.prefillTokensSaved >= 32 * 6, `saved ${report.prefixCache.prefillTokensSaved}`);
      assert.ok(report.prefixCache.hitRate > 0.5);
      assert.equal(report.kvBlocksUsedAtEnd, 0);
      assert.ok(report.samples.length >= 2 && report.samples.every((s) => s.rssBytes > 0));
      assert.equal(engine.stats().generatedTokensTotal, 60);
    } finally {
      await server.close();
    }
  });

  it("runs editors sending /infill requests: a ring of chunks, warmed ahead and then found cached", async () => {
    const { engine } = await tinyEngine({ blockSize: 16, maxPositionEmbeddings: 1024 });
    const server = await startServer(engine);
    try {
      // One editor, 11 requests: 8 completions, a warm-up for the ring's new chunk, 2 completions.
      const report = await runLoad({ url: server.url, clients: 1, requests: 11, promptLen: 40, genLen: 3, sharedPrefix: 0, workload: "infill" });
      assert.equal(report.workload, "infill");
      assert.deepEqual([report.requests, report.errors, report.outputTokens], [10, 0, 30]);
      const editor = report.editor!;
      assert.equal(editor.warmups, 1);
      assert.ok(editor.promptTokens.p50 > 40);
      assert.ok(editor.cachedShare > 0.3, `${editor.cachedShare} of the prompts cached: the chunks, request after request`);
      assert.equal(report.kvBlocksUsedAtEnd, 0);
      await assert.rejects(runLoad({ url: server.url, clients: 1, requests: 1, promptLen: 40, genLen: 3, sharedPrefix: 8, workload: "infill" }), /share no prefix/);
    } finally {
      await server.close();
    }
  });

  it("counts refused requests as errors, with their messages", async () => {
    const { engine } = await tinyEngine({ maxBatchSeqs: 1, maxWaiting: 1 });
    const server = await startServer(engine);
    try {
      const report = await runLoad({ url: server.url, clients: 6, requests: 6, promptLen: 8, genLen: 20, sharedPrefix: 0 });
      assert.equal(report.requests + report.errors, 6);
      assert.ok(report.errors > 0);
      assert.match(report.firstErrors[0], /^HTTP 503: .*already waiting/);
    } finally {
      await server.close();
    }
  });

  it("sends each run its own prompts unless given the seed of another", async () => {
    const { engine } = await tinyEngine({ blockSize: 16 });
    const server = await startServer(engine);
    try {
      const load = { url: server.url, clients: 2, requests: 4, promptLen: 40, genLen: 2, sharedPrefix: 0 };
      const first = await runLoad(load);
      const fresh = await runLoad(load);
      assert.notEqual(fresh.seed, first.seed);
      assert.equal(fresh.prefixCache.hitRate, 0, "nothing of the first run's prompts is found");
      const again = await runLoad({ ...load, seed: first.seed });
      assert.equal(again.prefixCache.prefillTokensSaved, 4 * 32, "the same prompts: two full blocks each from the cache");
    } finally {
      await server.close();
    }
  });

  it("fails with one line when the server can't be reached or the prefix is too long", async () => {
    await assert.rejects(
      runLoad({ url: "http://127.0.0.1:9", clients: 1, requests: 1, promptLen: 8, genLen: 1, sharedPrefix: 0 }),
      (err) => err instanceof DecimaError && /^http:\/\/127\.0\.0\.1:9\/v1\/models: /.test(err.message),
    );
    await assert.rejects(
      runLoad({ url: "http://127.0.0.1:9", clients: 1, requests: 1, promptLen: 8, genLen: 1, sharedPrefix: 9 }),
      /--shared-prefix 9 is longer than --prompt-len 8/,
    );
  });

  it("takes percentiles between closest ranks", () => {
    assert.deepEqual(percentiles([3, 1, 2]), { p50: 2, p99: 2.98 });
    assert.deepEqual(percentiles([5]), { p50: 5, p99: 5 });
    assert.ok(Number.isNaN(percentiles([]).p50));
  });
});

describe("soak verdict", () => {
  const report = (rssMiB: number[], overrides: Partial<LoadReport> = {}): LoadReport =>
    ({
      errors: 0,
      firstErrors: [],
      kvBlocksUsedAtEnd: 0,
      samples: rssMiB.map((m, i) => ({ atS: i * 10, rssBytes: m * MiB, kvBlocksUsed: 0, running: 0, waiting: 0 })),
      ...overrides,
    }) as LoadReport;

  it("passes a flat run, judging RSS from after warm-up", () => {
    const v = soakVerdict(report([100, 300, 310, 305, 320, 315, 318, 322]));
    assert.deepEqual(v, { passed: true, problems: [], rssMiB: { first: 100, afterWarmup: 310, last: 322, peak: 322 } });
  });

  it("fails on growth, failed requests or KV blocks left held", () => {
    const v = soakVerdict(report([100, 300, 310, 400, 500, 600, 700, 800], { errors: 2, firstErrors: ["HTTP 503: full"], kvBlocksUsedAtEnd: 3 }));
    assert.equal(v.passed, false);
    assert.deepEqual(v.problems, [
      "2 requests failed (first: HTTP 503: full)",
      "3 KV blocks still held at the end",
      "RSS grew after warm-up from 310 to 800 MiB (allowed 32 MiB)",
    ]);
  });
});
