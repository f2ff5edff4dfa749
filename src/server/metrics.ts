import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { Engine, GenerateEvent } from "../runtime/engine.js";

// Seconds. Time to first token spans queueing and prefill; the inter-token buckets go finer, down to what
// a GPU decode step takes.
const TTFT_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60];
const INTER_TOKEN_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5];
const E2E_BUCKETS = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300];

/**
 * The server's Prometheus metrics, in a registry of its own (two servers in one process, as in tests, don't
 * share counts). The engine's state (requests, KV blocks, prefix cache) is read at scrape time; the rest is
 * fed by the routes as their requests run. Each choice of a request counts as one request here (n = 2 is
 * two), as it is one sequence in the engine. Node's process metrics (RSS, heap, event-loop lag) come with
 * it: the event loop also drives the CPU backend's steps, so its lag is the server's responsiveness.
 */
export class ServerMetrics {
  readonly registry = new Registry();
  private readonly promptTokens: Counter;
  private readonly generatedTokens: Counter;
  private readonly cachedPromptTokens: Counter;
  private readonly finished: Counter<"finish_reason">;
  private readonly failed: Counter<"status">;
  private readonly timeToFirstToken: Histogram;
  private readonly interTokenLatency: Histogram;
  private readonly e2eLatency: Histogram;

  constructor(engine: Engine) {
    const registers = [this.registry];
    const gauge = (name: string, help: string, read: () => number) =>
      new Gauge({ name, help, registers, collect() { this.set(read()); } });
    // Totals the engine keeps, copied at scrape time.
    const engineCounter = (name: string, help: string, read: () => number) =>
      new Counter({ name, help, registers, collect() { this.reset(); this.inc(read()); } });
    gauge("decima_requests_running", "Requests (choices) being generated.", () => engine.stats().running);
    gauge("decima_requests_waiting", "Requests (choices) waiting for admission.", () => engine.stats().waiting);
    gauge("decima_kv_blocks_used", "KV cache blocks held by sequences.", () => engine.stats().kvBlocksUsed);
    gauge("decima_kv_blocks_total", "KV cache blocks in the pool.", () => engine.stats().kvBlocksTotal);
    gauge("decima_prefix_cache_hit_rate", "Share of full prompt blocks found in the prefix cache, since start.", () => {
      const s = engine.stats();
      return s.prefixCacheQueries === 0 ? 0 : s.prefixCacheHits / s.prefixCacheQueries;
    });
    engineCounter("decima_prefix_cache_queries_total", "Full prompt blocks looked up in the prefix cache.", () => engine.stats().prefixCacheQueries);
    engineCounter("decima_prefix_cache_hits_total", "Full prompt blocks found in the prefix cache.", () => engine.stats().prefixCacheHits);

    this.promptTokens = new Counter({ name: "decima_prompt_tokens_total", help: "Prompt tokens of finished requests.", registers });
    this.generatedTokens = new Counter({ name: "decima_generation_tokens_total", help: "Generated tokens.", registers });
    this.cachedPromptTokens = new Counter({
      name: "decima_cached_prompt_tokens_total",
      help: "Prompt tokens served from the prefix cache: prefill work saved.",
      registers,
    });
    this.finished = new Counter({
      name: "decima_requests_finished_total",
      help: "Requests (choices) that ended, by finish reason.",
      labelNames: ["finish_reason"],
      registers,
    });
    this.failed = new Counter({
      name: "decima_requests_failed_total",
      help: "HTTP requests that ended in an error, by status.",
      labelNames: ["status"],
      registers,
    });
    this.timeToFirstToken = new Histogram({
      name: "decima_time_to_first_token_seconds",
      help: "From the HTTP request's arrival to its first generated token.",
      buckets: TTFT_BUCKETS,
      registers,
    });
    this.interTokenLatency = new Histogram({
      name: "decima_inter_token_latency_seconds",
      help: "Between consecutive generated tokens of a request.",
      buckets: INTER_TOKEN_BUCKETS,
      registers,
    });
    this.e2eLatency = new Histogram({
      name: "decima_e2e_request_latency_seconds",
      help: "From the HTTP request's arrival to its last token.",
      buckets: E2E_BUCKETS,
      registers,
    });
    collectDefaultMetrics({ register: this.registry });
  }

  /** An observer of one choice's events, for a request that arrived at `arrival` (performance.now()). */
  choice(arrival: number): (event: GenerateEvent) => void {
    let last: number | null = null;
    return (event) => {
      const now = performance.now();
      if (event.type === "token") {
        if (last === null) this.timeToFirstToken.observe((now - arrival) / 1000);
        else this.interTokenLatency.observe((now - last) / 1000);
        last = now;
      } else if (event.type === "done") {
        this.e2eLatency.observe((now - arrival) / 1000);
        this.finished.inc({ finish_reason: event.finishReason });
        this.promptTokens.inc(event.promptTokens.length);
        this.generatedTokens.inc(event.tokens.length);
        this.cachedPromptTokens.inc(event.cachedPromptTokens);
      }
    };
  }

  requestFailed(status: number): void {
    this.failed.inc({ status: String(status) });
  }

  async text(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
