import type { Command } from "commander";
import { cudaDevice } from "../../engine/cuda/native.js";
import { fail } from "../../errors.js";
import { Rng } from "../../model/random.js";
import { Engine } from "../../runtime/engine.js";
import type { SamplingOptions } from "../../runtime/sampling-params.js";
import type { SchedulingSettings } from "../../runtime/scheduler.js";
import {
  asyncSchedulingOptions,
  deviceOption,
  dtypeOption,
  integerOption,
  modelOption,
  type ModelOptions,
  numberOption,
  samplerOptions,
} from "../options.js";

type Sampler = Pick<
  SamplingOptions,
  "temperature" | "topP" | "topK" | "minP" | "repetitionPenalty" | "frequencyPenalty" | "presencePenalty"
>;

interface BenchOptions extends ModelOptions, Sampler {
  batch: string;
  promptLen: number;
  genLen: number;
  repeat: number;
  decodeSteps?: number;
  maxCallMs?: number;
  asyncScheduling?: boolean;
  json?: boolean;
}

export interface BenchRow {
  batch: number;
  promptLen: number;
  genLen: number;
  /** Median over runs of the median request's time to first token (prefill of the whole batch included). */
  ttftMs: number;
  /** Per decode step, after the first token. */
  stepMs: number;
  /** Decode throughput: batch / step time. */
  decodeTokensPerS: number;
  /** All output tokens over the whole run's wall time, prefill included. */
  outputTokensPerS: number;
  /** The weight-bandwidth floor of one decode step over the measured step time. */
  floorFraction: number | null;
}

export function register(program: Command): void {
  const command = program
    .command("bench")
    .description("measure time to first token, per-step latency, tokens/s and the fraction of the bandwidth floor")
    .addOption(modelOption())
    .addOption(deviceOption())
    .addOption(dtypeOption())
    .option("--batch <sizes>", "batch sizes, comma-separated", "1")
    .addOption(integerOption("--prompt-len <n>", "prompt tokens per request", { min: 1 }).default(128))
    .addOption(integerOption("--gen-len <n>", "new tokens per request", { min: 1 }).default(256))
    .addOption(integerOption("--repeat <n>", "timed runs per batch size (the median is reported)", { min: 1 }).default(3))
    .addOption(integerOption("--decode-steps <n>", "decode steps per backend call (default: the engine's)", { min: 1 }))
    .addOption(numberOption("--max-call-ms <ms>", "the longest a multi-step call may take (default: the engine's)", { above: 0 }))
    .option("--json", "print JSON instead of a table");
  for (const option of [...samplerOptions(), ...asyncSchedulingOptions()]) command.addOption(option);
  command.action(async (opts: BenchOptions) => {
    const batches = opts.batch.split(",").map((b) => Number(b));
    if (batches.some((b) => !Number.isInteger(b) || b < 1)) fail("input", `--batch must list positive integers (got "${opts.batch}")`);
    const engine = await Engine.load({
      model: opts.model,
      device: opts.device,
      dtype: opts.dtype,
      maxBatchTokens: Math.max(4096, ...batches),
      maxBatchSeqs: Math.max(256, Math.max(...batches)),
      decodeSteps: opts.decodeSteps,
      maxCallMs: opts.maxCallMs,
      asyncScheduling: opts.asyncScheduling,
    });
    try {
      const bandwidth = engine.device === "cuda" ? measureBandwidth() : null;
      const rows = [];
      for (const batch of batches) rows.push(await benchBatch(engine, batch, opts, bandwidth));
      const info = engine.backendInfo;
      if (opts.json) {
        const report = { model: opts.model, backend: info.description, weightBytes: info.weightBytes, bandwidth, scheduling: engine.scheduling, rows };
        process.stdout.write(`${JSON.stringify(report)}\n`);
      } else {
        printTable(opts.model, info, engine.scheduling, bandwidth, rows);
      }
    } finally {
      await engine.close();
    }
  });
}

/** Bytes per second the GPU reads from its memory (best of 10 passes over 1 GiB). */
function measureBandwidth(): number {
  const dev = cudaDevice();
  if (!dev.ok) fail("device", dev.reason);
  return dev.addon.measureBandwidth(2 ** 30, 10);
}

async function benchBatch(engine: Engine, batch: number, opts: BenchOptions, bandwidth: number | null): Promise<BenchRow> {
  const rng = new Rng(batch);
  const vocab = Math.min(engine.config.vocabSize, engine.tokenizer.vocabSize);
  const prompts = Array.from({ length: batch }, () => Array.from({ length: opts.promptLen }, () => 19 + Math.floor(rng.uniform() * (vocab - 19))));
  // The first run compiles what the shapes need (cuBLAS plans, the batch's CUDA graph) and is not counted.
  const { temperature, topP, topK, minP, repetitionPenalty, frequencyPenalty, presencePenalty } = opts;
  const sampler: Sampler = { temperature, topP, topK, minP, repetitionPenalty, frequencyPenalty, presencePenalty };
  await runOnce(engine, prompts, Math.min(opts.genLen, 32), sampler);
  const runs = [];
  for (let r = 0; r < opts.repeat; r++) runs.push(await runOnce(engine, prompts, opts.genLen, sampler));
  const ttftMs = median(runs.map((r) => r.ttftMs));
  const stepMs = median(runs.map((r) => r.stepMs));
  const wallMs = median(runs.map((r) => r.wallMs));
  const info = engine.backendInfo;
  return {
    batch,
    promptLen: opts.promptLen,
    genLen: opts.genLen,
    ttftMs,
    stepMs,
    decodeTokensPerS: stepMs > 0 ? (batch * 1000) / stepMs : 0,
    outputTokensPerS: (batch * opts.genLen * 1000) / wallMs,
    floorFraction: bandwidth && stepMs > 0 ? ((info.weightBytes / bandwidth) * 1000) / stepMs : null,
  };
}

async function runOnce(engine: Engine, prompts: number[][], genLen: number, sampler: Sampler) {
  const start = performance.now();
  const times = await Promise.all(
    prompts.map(async (prompt) => {
      let first = 0;
      let last = 0;
      for await (const e of engine.generate({ ...sampler, prompt, maxTokens: genLen, ignoreEos: true })) {
        if (e.type !== "token") continue;
        last = performance.now();
        if (first === 0) first = last;
      }
      return { first, last };
    }),
  );
  const end = performance.now();
  const firsts = times.map((t) => t.first);
  const decodeMs = Math.max(...times.map((t) => t.last)) - Math.max(...firsts);
  return {
    ttftMs: median(firsts) - start,
    stepMs: genLen > 1 ? decodeMs / (genLen - 1) : 0,
    wallMs: end - start,
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function printTable(
  model: string,
  info: { description: string; weightBytes: number },
  scheduling: SchedulingSettings,
  bandwidth: number | null,
  rows: BenchRow[],
): void {
  const gb = (b: number) => (b / 1e9).toFixed(2);
  const { asyncScheduling, decodeSteps, maxCallMs } = scheduling;
  const lines = [
    `model ${model} (${info.description})`,
    `weights read per decode step ${gb(info.weightBytes)} GB`,
    `calls of up to ${decodeSteps} decode steps and ${maxCallMs} ms, async scheduling ${asyncScheduling ? "on" : "off"}`,
  ];
  if (bandwidth) {
    const floor = (info.weightBytes / bandwidth) * 1000;
    lines.push(`measured read bandwidth ${(bandwidth / 1e9).toFixed(0)} GB/s: floor ${floor.toFixed(3)} ms per step (${(1000 / floor).toFixed(0)} tokens/s at batch 1)`);
  }
  const header = ["batch", "prompt", "gen", "TTFT ms", "step ms", "decode tok/s", "output tok/s", "of floor"];
  const cells = rows.map((r) => [
    String(r.batch),
    String(r.promptLen),
    String(r.genLen),
    r.ttftMs.toFixed(2),
    r.stepMs.toFixed(3),
    r.decodeTokensPerS.toFixed(0),
    r.outputTokensPerS.toFixed(0),
    r.floorFraction === null ? "-" : `${(r.floorFraction * 100).toFixed(0)}%`,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i].length)));
  const fmt = (c: string[]) => c.map((x, i) => x.padStart(widths[i])).join("  ");
  lines.push("", fmt(header), ...cells.map(fmt));
  process.stdout.write(`${lines.join("\n")}\n`);
}
