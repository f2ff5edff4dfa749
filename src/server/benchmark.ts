import { randomInt } from "node:crypto";
import { fail, oneLine } from "../errors.js";
import { Rng } from "../model/random.js";
import { editorSession } from "./editor-session.js";

/**
 * The load benchmark behind `decima bench-serve`: concurrent streaming clients against a running server,
 * measured as the clients see it, plus what the server's /metrics say about its prefix cache, memory and
 * KV pool over the run. Plain fetch and a small SSE reader keep it free of client libraries. The clients
 * send random completions, or are editors sending /infill requests (editor-session.ts).
 */

export type Workload = "completions" | "infill";

export interface LoadOptions {
  /** The server's base URL, http://host:port. */
  url: string;
  apiKey?: string;
  clients: number;
  /** Default "completions". */
  workload?: Workload;
  /** Requests in all (an editor's warm-ups included); without it the clients go on for `durationS`. */
  requests?: number;
  durationS?: number;
  promptLen: number;
  genLen: number;
  /** Leading prompt tokens that every request shares (what the prefix cache can save); completions only. */
  sharedPrefix: number;
  /**
   * Spread the clients' first requests evenly over this many seconds (default 0: all at once). Clients that
   * start together with equal lengths stay in step, sending their prompts in bursts; editors don't.
   */
  rampUpS?: number;
  /** Read the server's memory and KV pool from /metrics this often during the run (seconds). */
  sampleEveryS?: number;
  /**
   * Seed of the random prompts (default: a new one each run). Runs with the same seed send the same
   * prompts, which the server's prefix cache then serves from earlier runs' blocks.
   */
  seed?: number;
}

/** The server's state at one moment of the run, from /metrics. */
export interface ServerSample {
  atS: number;
  rssBytes: number;
  kvBlocksUsed: number;
  running: number;
  waiting: number;
}

export interface Percentiles {
  p50: number;
  p99: number;
}

export interface LoadReport {
  model: string;
  workload: Workload;
  clients: number;
  promptLen: number;
  genLen: number;
  sharedPrefix: number;
  rampUpS: number;
  seed: number;
  /** Requests that completed. */
  requests: number;
  errors: number;
  /** The first few distinct error messages. */
  firstErrors: string[];
  outputTokens: number;
  durationS: number;
  requestsPerS: number;
  outputTokensPerS: number;
  timeToFirstTokenMs: Percentiles;
  /** Between consecutive streamed chunks of a request (tokens that come together arrive in one chunk burst). */
  interTokenLatencyMs: Percentiles;
  /** Per request: from its first token to its last, per token after the first. */
  timePerOutputTokenMs: Percentiles;
  /**
   * Over the run: full prompt blocks found cached, and prompt tokens not prefilled (near 0 without a shared
   * prefix: each run's prompts are its own).
   */
  prefixCache: { hitRate: number; prefillTokensSaved: number };
  samples: ServerSample[];
  /** KV blocks still held once every request has ended: 0 unless blocks leak. */
  kvBlocksUsedAtEnd: number;
  /** The editors' completions, as the server reported their prompts (infill only). */
  editor?: {
    /** Requests that only sent a new ring of chunks (n_predict 0); not in the figures above. */
    warmups: number;
    promptTokens: Percentiles;
    /** Of the completions' prompt tokens, the share the prefix cache held. */
    cachedShare: number;
    /** Completions whose prompt the server cut to fit the context. */
    truncated: number;
  };
}

// Ids every decima model has (vocabularies hold at least 1,000 tokens), past the special tokens at the start.
const TOKEN_IDS = { from: 100, to: 1000 };
const MAX_ERRORS_SHOWN = 5;

interface RequestResult {
  error?: string;
  /** A request for no tokens (an editor's warm-up): only its prompt counts. */
  warmup?: boolean;
  ttftMs?: number;
  gapsMs?: number[];
  /** From the first text to the last. */
  decodeMs?: number;
  outputTokens?: number;
  /** As /infill reports it. */
  prompt?: InfillPromptReport;
}

interface InfillPromptReport {
  tokens: number;
  cached: number;
  truncated: boolean;
}

export async function runLoad(opts: LoadOptions): Promise<LoadReport> {
  const workload = opts.workload ?? "completions";
  if (opts.sharedPrefix > opts.promptLen) fail("input", `--shared-prefix ${opts.sharedPrefix} is longer than --prompt-len ${opts.promptLen}`);
  if (workload === "infill" && opts.sharedPrefix > 0) fail("input", "--shared-prefix: the infill workload's editors share no prefix");
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (opts.apiKey !== undefined) headers.authorization = `Bearer ${opts.apiKey}`;
  const server = new ServerView(opts.url, headers);
  const model = await server.modelId();

  const seed = opts.seed ?? randomInt(2 ** 31);
  const rng = new Rng(seed);
  const randomIds = (n: number) => Array.from({ length: n }, () => TOKEN_IDS.from + (rng.nextU32() % (TOKEN_IDS.to - TOKEN_IDS.from)));
  const prefix = randomIds(opts.sharedPrefix);
  const body = () => ({
    model,
    prompt: [...prefix, ...randomIds(opts.promptLen - opts.sharedPrefix)],
    max_tokens: opts.genLen,
    ignore_eos: true, // every request generates exactly genLen tokens
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  /** Client i's next request. */
  const requester = (): (() => Promise<RequestResult>) => {
    if (workload === "completions") return () => streamRequest(`${opts.url}/v1/completions`, headers, body(), completionChunk);
    const next = editorSession(new Rng(rng.nextU32()), opts.promptLen, opts.genLen);
    return () => {
      const { body, warmup } = next();
      return warmup ? warmupRequest(`${opts.url}/infill`, headers, body) : streamRequest(`${opts.url}/infill`, headers, body, infillChunk);
    };
  };

  const before = await server.metrics();
  const start = performance.now();
  const samples: ServerSample[] = [];
  const sample = async () => samples.push(sampleOf(await server.metrics(), (performance.now() - start) / 1000));
  await sample();
  const timer = opts.sampleEveryS ? setInterval(() => void sample().catch(() => {}), opts.sampleEveryS * 1000) : null;

  const deadline = opts.requests === undefined ? start + (opts.durationS ?? 60) * 1000 : Infinity;
  let issued = 0;
  const results: RequestResult[] = [];
  const client = async (i: number, request: () => Promise<RequestResult>) => {
    if (opts.rampUpS) await new Promise((resolve) => setTimeout(resolve, (i * opts.rampUpS! * 1000) / opts.clients));
    while ((opts.requests === undefined || issued < opts.requests) && performance.now() < deadline) {
      issued++;
      results.push(await request());
    }
  };
  await Promise.all(Array.from({ length: opts.clients }, (_, i) => client(i, requester())));
  const durationS = (performance.now() - start) / 1000;
  if (timer) clearInterval(timer);
  await sample();
  const after = await server.metrics();

  const ok = results.filter((r) => r.error === undefined && !r.warmup);
  const outputTokens = ok.reduce((sum, r) => sum + r.outputTokens!, 0);
  const delta = (name: string) => (after.get(name) ?? 0) - (before.get(name) ?? 0);
  const queries = delta("decima_prefix_cache_queries_total");
  const report: LoadReport = {
    model,
    workload,
    clients: opts.clients,
    promptLen: opts.promptLen,
    genLen: opts.genLen,
    sharedPrefix: opts.sharedPrefix,
    rampUpS: opts.rampUpS ?? 0,
    seed,
    requests: ok.length,
    errors: results.filter((r) => r.error !== undefined).length,
    firstErrors: [...new Set(results.flatMap((r) => (r.error === undefined ? [] : [r.error])))].slice(0, MAX_ERRORS_SHOWN),
    outputTokens,
    durationS,
    requestsPerS: ok.length / durationS,
    outputTokensPerS: outputTokens / durationS,
    timeToFirstTokenMs: percentiles(ok.map((r) => r.ttftMs!)),
    interTokenLatencyMs: percentiles(ok.flatMap((r) => r.gapsMs!)),
    timePerOutputTokenMs: percentiles(ok.filter((r) => r.outputTokens! > 1).map((r) => r.decodeMs! / (r.outputTokens! - 1))),
    prefixCache: {
      hitRate: queries > 0 ? delta("decima_prefix_cache_hits_total") / queries : 0,
      prefillTokensSaved: delta("decima_cached_prompt_tokens_total"),
    },
    samples,
    kvBlocksUsedAtEnd: await server.settledKvBlocks(),
  };
  if (workload === "infill") {
    const prompts = ok.flatMap((r) => (r.prompt ? [r.prompt] : []));
    const total = prompts.reduce((sum, p) => sum + p.tokens, 0);
    report.editor = {
      warmups: results.filter((r) => r.warmup && r.error === undefined).length,
      promptTokens: percentiles(prompts.map((p) => p.tokens)),
      cachedShare: total > 0 ? prompts.reduce((sum, p) => sum + p.cached, 0) / total : 0,
      truncated: prompts.filter((p) => p.truncated).length,
    };
  }
  return report;
}

/** What a streamed event says: its text, and where it has them, the output's size and the prompt's. */
interface ChunkReading {
  text?: string;
  outputTokens?: number;
  prompt?: InfillPromptReport;
}

/** OpenAI's completion chunks. */
function completionChunk(chunk: { usage?: { completion_tokens: number }; choices?: { text: string }[] }): ChunkReading {
  return { text: chunk.choices?.[0]?.text, outputTokens: chunk.usage?.completion_tokens };
}

/** llama.cpp's /infill events; the last (`stop`) holds the counts. */
function infillChunk(chunk: { content?: string; stop?: boolean; tokens_predicted?: number; tokens_evaluated?: number; tokens_cached?: number; truncated?: boolean }): ChunkReading {
  if (!chunk.stop) return { text: chunk.content };
  return {
    outputTokens: chunk.tokens_predicted,
    prompt: { tokens: chunk.tokens_evaluated ?? 0, cached: chunk.tokens_cached ?? 0, truncated: chunk.truncated === true },
  };
}

/** One streamed request, timed from sending it: time to the first text, gaps between the rest. */
async function streamRequest<C>(url: string, headers: Record<string, string>, body: object, read: (chunk: C) => ChunkReading): Promise<RequestResult> {
  const sent = performance.now();
  try {
    const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body) });
    if (!res.ok) return { error: await httpError(res) };
    let ttftMs: number | undefined;
    let last = 0;
    const gapsMs: number[] = [];
    let outputTokens = 0;
    let prompt: InfillPromptReport | undefined;
    for await (const data of sseData(res.body!)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data) as C & { error?: { message: string } };
      if (chunk.error) return { error: `stream: ${chunk.error.message}` };
      const reading = read(chunk);
      outputTokens = reading.outputTokens ?? outputTokens;
      prompt = reading.prompt ?? prompt;
      if (!reading.text) continue;
      const now = performance.now();
      if (ttftMs === undefined) ttftMs = now - sent;
      else gapsMs.push(now - last);
      last = now;
    }
    if (ttftMs === undefined) return { error: "stream: no text came" };
    return { ttftMs, gapsMs, decodeMs: last - sent - ttftMs, outputTokens, prompt };
  } catch (err) {
    return { error: oneLine(err) };
  }
}

/** An editor's request for no tokens: it only has to succeed. */
async function warmupRequest(url: string, headers: Record<string, string>, body: object): Promise<RequestResult> {
  try {
    const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body) });
    if (!res.ok) return { warmup: true, error: await httpError(res) };
    await res.json();
    return { warmup: true };
  } catch (err) {
    return { warmup: true, error: oneLine(err) };
  }
}

async function httpError(res: Response): Promise<string> {
  const reply = (await res.json().catch(() => null)) as { error?: { message?: string } } | null;
  return `HTTP ${res.status}: ${reply?.error?.message ?? res.statusText}`;
}

/**
 * The data of each server-sent event. Written out here because an SSE reader is a few lines over fetch's
 * byte stream, and the server only ever sends single-line `data:` events.
 */
async function* sseData(body: AsyncIterable<Uint8Array>): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const bytes of body) {
    buffer += decoder.decode(bytes, { stream: true });
    for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ")) yield event.slice("data: ".length);
    }
  }
}

/** The server as the benchmark reads it: its model and its /metrics. */
class ServerView {
  constructor(
    private readonly url: string,
    private readonly headers: Record<string, string>,
  ) {}

  async modelId(): Promise<string> {
    const models = (await this.get("/v1/models")) as { data?: { id: string }[] };
    const id = models.data?.[0]?.id;
    if (id === undefined) fail("input", `${this.url}/v1/models: lists no model`);
    return id;
  }

  /** Every unlabelled sample of /metrics, and labelled ones under their full name. */
  async metrics(): Promise<Map<string, number>> {
    const text = (await this.get("/metrics", "text")) as string;
    const values = new Map<string, number>();
    for (const line of text.split("\n")) {
      if (line === "" || line.startsWith("#")) continue;
      const at = line.lastIndexOf(" ");
      values.set(line.slice(0, at), Number(line.slice(at + 1)));
    }
    return values;
  }

  /** KV blocks in use once the server has settled (blocks come back as each request ends; give it 5 s). */
  async settledKvBlocks(): Promise<number> {
    const until = performance.now() + 5000;
    for (;;) {
      const used = (await this.metrics()).get("decima_kv_blocks_used") ?? NaN;
      if (used === 0 || performance.now() > until) return used;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  private async get(path: string, as: "json" | "text" = "json"): Promise<unknown> {
    let res: Response;
    try {
      res = await fetch(this.url + path, { headers: this.headers });
    } catch (err) {
      fail("input", `${this.url}${path}: ${oneLine(err)}`, err);
    }
    if (!res.ok) fail("input", `${this.url}${path}: HTTP ${res.status}`);
    return as === "json" ? res.json() : res.text();
  }
}

function sampleOf(metrics: Map<string, number>, atS: number): ServerSample {
  return {
    atS,
    rssBytes: metrics.get("process_resident_memory_bytes") ?? NaN,
    kvBlocksUsed: metrics.get("decima_kv_blocks_used") ?? NaN,
    running: metrics.get("decima_requests_running") ?? NaN,
    waiting: metrics.get("decima_requests_waiting") ?? NaN,
  };
}

/** Linear interpolation between closest ranks (NaN for no values). */
export function percentiles(values: number[]): Percentiles {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (p: number) => {
    if (sorted.length === 0) return NaN;
    const x = (sorted.length - 1) * p;
    const lo = Math.floor(x);
    return sorted[lo] + (sorted[Math.min(lo + 1, sorted.length - 1)] - sorted[lo]) * (x - lo);
  };
  return { p50: at(0.5), p99: at(0.99) };
}

export interface SoakVerdict {
  passed: boolean;
  /** What failed, one line each. */
  problems: string[];
  rssMiB: { first: number; afterWarmup: number; last: number; peak: number };
}

/**
 * A soak run passes with no failed request, every KV block back in the pool at the end, and RSS flat: the
 * last sample within 10% (or 32 MiB, for small processes) of the first one taken after warm-up (the first
 * quarter of the run, while caches and JIT settle). RSS also grows while the KV pool fills: the CPU
 * backend's pool is allocated zeroed, its pages resident only once a block is first written, and the
 * prefix cache's index grows with the blocks it holds. So a soak needs a pool that warm-up cycles through
 * (a small --num-blocks), or growth up to the pool's size is no leak.
 */
export function soakVerdict(report: LoadReport): SoakVerdict {
  const mib = (b: number) => b / 2 ** 20;
  const rss = report.samples.map((s) => s.rssBytes);
  const rssMiB = {
    first: mib(rss[0]),
    afterWarmup: mib(rss[Math.floor(rss.length / 4)]),
    last: mib(rss.at(-1)!),
    peak: mib(Math.max(...rss)),
  };
  const problems: string[] = [];
  if (report.errors > 0) problems.push(`${report.errors} requests failed (first: ${report.firstErrors[0]})`);
  if (report.kvBlocksUsedAtEnd !== 0) problems.push(`${report.kvBlocksUsedAtEnd} KV blocks still held at the end`);
  const allowed = Math.max(rssMiB.afterWarmup * 0.1, 32);
  if (!(rssMiB.last - rssMiB.afterWarmup <= allowed)) {
    const grew = `${rssMiB.afterWarmup.toFixed(0)} to ${rssMiB.last.toFixed(0)} MiB`;
    problems.push(`RSS grew after warm-up from ${grew} (allowed ${allowed.toFixed(0)} MiB)`);
  }
  return { passed: problems.length === 0, problems, rssMiB };
}
