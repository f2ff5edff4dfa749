import { type Command, Option } from "commander";
import { fail } from "../../errors.js";
import { type LoadReport, type SoakVerdict, type Workload, runLoad, soakVerdict } from "../../server/benchmark.js";
import { CHUNK_LINES, RING_CHUNKS } from "../../server/editor-session.js";
import { integerOption, modelOption, numberOption } from "../options.js";
import { type ServingOptions, addServingOptions, startServing } from "./serve.js";

interface BenchServeOptions extends Omit<ServingOptions, "model"> {
  url?: string;
  model?: string;
  clients: number;
  workload: Workload;
  requests?: number;
  duration?: number;
  promptLen: number;
  genLen: number;
  sharedPrefix: number;
  rampUp: number;
  seed?: number;
  soak?: boolean;
  json?: boolean;
}

const SOAK_DURATION_S = 180;
const SOAK_SAMPLE_EVERY_S = 10;

export function register(program: Command): void {
  const command = program
    .command("bench-serve")
    .description("load-test the HTTP server with concurrent streaming clients: requests/s, tokens/s, latency percentiles")
    .addOption(new Option("--url <url>", "a running server (http://host:port)").conflicts("model"))
    .addOption(modelOption().makeOptionMandatory(false))
    .addOption(integerOption("--clients <n>", "concurrent clients", { min: 1 }).default(64))
    .addOption(
      new Option(
        "--workload <kind>",
        `completions: random prompts to /v1/completions; infill: editors sending /infill requests as llama.vscode does (the text around a cursor, a ring of ${RING_CHUNKS} chunks of ${CHUNK_LINES} lines of other files, now and then a new chunk sent ahead with n_predict 0)`,
      )
        .choices(["completions", "infill"])
        .default("completions"),
    )
    .addOption(integerOption("--requests <n>", "requests in all (default: 4 per client)", { min: 1 }))
    .addOption(numberOption("--duration <s>", "send requests for this long instead of a count", { above: 0 }).conflicts("requests"))
    .addOption(integerOption("--prompt-len <n>", "prompt tokens per request (random ids; infill: about this many around the cursor, besides the ring)", { min: 1 }).default(512))
    .addOption(integerOption("--gen-len <n>", "generated tokens per request (exactly: ignore_eos)", { min: 1 }).default(128))
    .addOption(integerOption("--shared-prefix <n>", "leading prompt tokens common to every request", { min: 0 }).default(0))
    .addOption(numberOption("--ramp-up <s>", "start the clients evenly over this many seconds instead of all at once", { min: 0 }).default(0))
    .addOption(integerOption("--seed <n>", "seed of the random prompts (default: a new one each run, so that no run finds another's prompts cached)", { min: 0 }))
    .option(
      "--soak",
      `run for --duration (default ${SOAK_DURATION_S} s), reading the server's memory and KV pool every ${SOAK_SAMPLE_EVERY_S} s; ` +
        "fails unless no request failed, RSS stayed flat after warm-up and every KV block came back " +
        "(with --model, give a small --num-blocks: RSS grows until the KV pool has been used through)",
    )
    .option("--json", "print JSON instead of a table");
  addServingOptions(command).action(benchServe);
}

async function benchServe(opts: BenchServeOptions): Promise<void> {
  if (opts.url === undefined && opts.model === undefined) fail("input", "give --url of a running server, or --model to start one");
  const durationS = opts.duration ?? (opts.soak && opts.requests === undefined ? SOAK_DURATION_S : undefined);
  const load = {
    apiKey: opts.apiKey,
    clients: opts.clients,
    workload: opts.workload,
    requests: opts.requests ?? (durationS === undefined ? 4 * opts.clients : undefined),
    durationS,
    promptLen: opts.promptLen,
    genLen: opts.genLen,
    sharedPrefix: opts.sharedPrefix,
    rampUpS: opts.rampUp,
    seed: opts.seed,
    sampleEveryS: opts.soak ? Math.min(SOAK_SAMPLE_EVERY_S, (durationS ?? SOAK_DURATION_S) / 10) : undefined,
  };
  let report: LoadReport;
  if (opts.url !== undefined) {
    report = await runLoad({ ...load, url: opts.url.replace(/\/+$/, "") });
  } else {
    const serving = await startServing({ ...opts, model: opts.model! }, "127.0.0.1", 0);
    try {
      report = await runLoad({ ...load, url: serving.url });
    } finally {
      await serving.close();
    }
  }
  const verdict = opts.soak ? soakVerdict(report) : null;
  process.stdout.write(opts.json ? `${JSON.stringify({ ...report, soak: verdict ?? undefined })}\n` : table(report, verdict));
  if (verdict && !verdict.passed) {
    process.stderr.write(`decima: soak failed: ${verdict.problems.join("; ")}\n`);
    process.exitCode = 1;
  }
}

function table(r: LoadReport, soak: SoakVerdict | null): string {
  const n = (x: number, digits = 1) => x.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  const rows: [string, string][] = [
    ["requests", `${r.requests} ok, ${r.errors} failed`],
    ["duration", `${n(r.durationS, 2)} s`],
    ["throughput", `${n(r.requestsPerS, 2)} requests/s, ${n(r.outputTokensPerS)} output tokens/s`],
    ["time to first token", `p50 ${n(r.timeToFirstTokenMs.p50)} ms, p99 ${n(r.timeToFirstTokenMs.p99)} ms`],
    ["inter-token latency", `p50 ${n(r.interTokenLatencyMs.p50, 2)} ms, p99 ${n(r.interTokenLatencyMs.p99, 2)} ms`],
    ["time per output token", `p50 ${n(r.timePerOutputTokenMs.p50, 2)} ms, p99 ${n(r.timePerOutputTokenMs.p99, 2)} ms`],
    ["prefix cache", `hit rate ${n(r.prefixCache.hitRate * 100)}%, ${n(r.prefixCache.prefillTokensSaved, 0)} prefill tokens saved`],
    ["KV blocks at the end", String(r.kvBlocksUsedAtEnd)],
  ];
  if (r.editor) {
    const e = r.editor;
    rows.push(["editors' prompts", `p50 ${n(e.promptTokens.p50, 0)} tokens, ${n(e.cachedShare * 100)}% cached, ${e.truncated} cut to fit`]);
    rows.push(["warm-ups", `${e.warmups} (n_predict 0, not counted above)`]);
  }
  if (soak) {
    const m = soak.rssMiB;
    rows.push(["RSS (MiB)", `first ${n(m.first, 0)}, after warm-up ${n(m.afterWarmup, 0)}, last ${n(m.last, 0)}, peak ${n(m.peak, 0)}`]);
    rows.push(["soak", soak.passed ? "passed" : `FAILED: ${soak.problems.join("; ")}`]);
  }
  for (const e of r.firstErrors) rows.push(["error", e]);
  const s = r.clients === 1 ? "" : "s";
  const what = r.workload === "infill" ? `editor${s} (/infill), about ${r.promptLen} tokens around the cursor` : `client${s}, ${r.promptLen} prompt`;
  const head = `${r.model}: ${r.clients} ${what} + ${r.genLen} generated tokens` +
    (r.sharedPrefix > 0 ? ` (${r.sharedPrefix} shared)` : "") +
    (r.rampUpS > 0 ? `, clients started over ${r.rampUpS} s` : "") +
    `, prompt seed ${r.seed}`;
  const width = Math.max(...rows.map(([k]) => k.length));
  return `${head}\n${rows.map(([k, v]) => `  ${k.padEnd(width)}  ${v}`).join("\n")}\n`;
}
