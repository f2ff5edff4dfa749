// The server's host side under load, with the GPU simulated: how much output a given device speed allows
// once the engine loop, detokenization and the HTTP streams take their share of the one JavaScript thread.
//
//   node dist/bench/serve-host.js [--decode-ms 1.3] [--per-seq-ms 0.023] [--prefill-us 4.5] [--no-async-scheduling]
//     [--max-call-ms MS] -- BENCH-SERVE ARGS
//
// The simulated device takes (decode-ms + per-seq-ms x sequences) per decode step plus prefill-us per prompt
// token, off the main thread (a worker sleeps that long, one step after another, as a GPU stream runs
// them), the way the CUDA backend's native call does; its tokens are arbitrary ids. The defaults are the
// H100 figures of BENCHMARKS.md. The server runs here and `decima bench-serve --url` in a child process, as
// on the GPU machine. The report ends with what the device was busy for, and how often and how long it
// waited for the host between steps (the rest of the wall time lies before the first request and after the
// last: the client's start, its ramp-up and its tail).
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import type { Backend, StepBatch, StepResult } from "../src/engine/backend.js";
import { parseModelConfig } from "../src/model/config.js";
import { PRESETS, presetConfigJson } from "../src/model/create.js";
import { Engine } from "../src/runtime/engine.js";
import { buildServer } from "../src/server/app.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";

interface DeviceModel {
  decodeMs: number;
  perSeqMs: number;
  prefillUs: number;
}

const SLEEPER = `
const { parentPort } = require("node:worker_threads");
const cell = new Int32Array(new SharedArrayBuffer(4));
parentPort.on("message", (ms) => { Atomics.wait(cell, 0, 0, ms); parentPort.postMessage(ms); });
`;

/** A backend that computes nothing and takes the time the device model says, on another thread. */
class SimulatedDevice implements Backend {
  readonly device = "cuda" as const;
  readonly description = "simulated device";
  readonly weightBytes = 0;
  readonly maxSteps = 64;
  /** Its tokens are arbitrary, so a row carried from the step before needs nothing but the call's place in the queue. */
  readonly carries = true;
  readonly maxBatchTokens = 2048;
  readonly maxBatchSeqs = 256;
  readonly kv = { blockSize: 16, numBlocks: 8192 };
  busyMs = 0;
  /** Times, and milliseconds in all, that a step was asked for after the one before had finished. */
  waits = 0;
  waitedMs = 0;
  /** When the last queued step finished (null while one is queued, or before the first). */
  private idleSince: number | null = null;
  private readonly worker = new Worker(SLEEPER, { eval: true });
  /** The steps asked for and not done, oldest first: the sleeper answers them in order. */
  private readonly pending: (() => void)[] = [];

  constructor(
    readonly config: ReturnType<typeof parseModelConfig>,
    private readonly model: DeviceModel,
  ) {
    this.worker.on("message", () => {
      this.pending.shift()?.();
      if (this.pending.length === 0) this.idleSince = performance.now();
    });
  }

  async step(batch: StepBatch): Promise<StepResult> {
    const seqs = batch.contextLens.length;
    const steps = batch.steps ?? 1;
    const prefillTokens = batch.tokens.length - seqs;
    const ms = steps * (this.model.decodeMs + this.model.perSeqMs * seqs) + (prefillTokens * this.model.prefillUs) / 1000;
    this.busyMs += ms;
    if (this.idleSince !== null) {
      this.waits++;
      this.waitedMs += performance.now() - this.idleSince;
      this.idleSince = null;
    }
    await new Promise<void>((resolve) => {
      this.pending.push(resolve);
      this.worker.postMessage(ms);
    });
    const n = seqs * steps;
    const tokens = new Int32Array(n);
    for (let i = 0; i < n; i++) tokens[i] = batch.sample[i % seqs] ? 300 + ((i * 7919) % 600) : -1;
    const width = batch.sampling.topLogprobs;
    return { tokens, logprobs: new Float32Array(n), topTokens: new Int32Array(n * width), topLogprobs: new Float32Array(n * width) };
  }

  async close(): Promise<void> {
    await this.worker.terminate();
  }
}

function flag(args: string[], name: string, fallback: number): number {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : fallback;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const split = argv.indexOf("--");
  const own = split >= 0 ? argv.slice(0, split) : argv;
  const loadArgs = split >= 0 ? argv.slice(split + 1) : [];
  const model = { decodeMs: flag(own, "--decode-ms", 1.3), perSeqMs: flag(own, "--per-seq-ms", 0.023), prefillUs: flag(own, "--prefill-us", 4.5) };

  const config = parseModelConfig(presetConfigJson(PRESETS["decicoder-1b"], "bfloat16"));
  const files = buildTokenizerFiles({ vocabSize: config.vocabSize });
  const tokenizer = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
  const backend = new SimulatedDevice(config, model);
  const asyncScheduling = !own.includes("--no-async-scheduling");
  const maxCallMs = own.includes("--max-call-ms") ? flag(own, "--max-call-ms", 0) : undefined;
  const engine = new Engine({ backend, tokenizer, modelId: "simulated", asyncScheduling, maxCallMs });
  const app = buildServer(engine);
  const address = await app.listen({ host: "127.0.0.1", port: 0 });

  const cli = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
  const started = performance.now();
  const elu = performance.eventLoopUtilization();
  const child = spawn(process.execPath, [cli, "bench-serve", "--url", address, ...loadArgs], { stdio: "inherit" });
  const code = await new Promise<number | null>((resolve) => child.on("exit", resolve));
  const wallMs = performance.now() - started;
  const busy = performance.eventLoopUtilization(elu);
  process.stdout.write(
    `device model: ${model.decodeMs} ms + ${model.perSeqMs} ms per sequence per decode step, ${model.prefillUs} µs per prompt token\n` +
      `device busy ${(backend.busyMs / 1000).toFixed(2)} s of ${(wallMs / 1000).toFixed(2)} s (${((100 * backend.busyMs) / wallMs).toFixed(1)}%); ` +
      `it waited for the host ${backend.waits} times between steps, ${backend.waitedMs.toFixed(0)} ms in all; ` +
      `server event loop busy ${(100 * busy.utilization).toFixed(1)}%\n`,
  );
  await app.close();
  await engine.close();
  process.exitCode = code ?? 1;
}

await main();
