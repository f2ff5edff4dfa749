import { readFile } from "node:fs/promises";
import { type Command, Option } from "commander";
import { fail, oneLine } from "../../errors.js";
import type { DoneEvent, Engine, GenerateRequest } from "../../runtime/engine.js";
import type { SamplingOptions } from "../../runtime/sampling-params.js";
import { type ModelOptions, deviceOption, dtypeOption, integerOption, modelOption, samplerOptions, withEngine } from "../options.js";

/** Commander names each flag as its SamplingOptions field (--top-p: topP), so they pass straight through. */
interface GenerateOptions extends ModelOptions, SamplingOptions {
  prompt?: string;
  promptFile?: string;
  suffix?: string;
  json?: boolean;
  verbose?: boolean;
}

export function register(program: Command): void {
  const command = program
    .command("generate")
    .description("continue a prompt (or fill in the middle with --suffix), streaming the text to stdout")
    .addOption(modelOption())
    .addOption(new Option("-p, --prompt <text>", "the prompt").conflicts("promptFile"))
    .option("--prompt-file <file>", "read the prompt from a file")
    .option("--suffix <text>", "fill in the middle: the text after the gap")
    .addOption(integerOption("--max-tokens <n>", "most tokens to generate", { min: 1 }).default(256));
  for (const option of samplerOptions()) command.addOption(option);
  command
    .addOption(integerOption("--seed <s>", "sampling seed (default: random)", { min: 0, max: 0xffffffff }))
    .option("--stop <text>", "stop before this text (repeatable)", (s: string, all: string[] = []) => [...all, s])
    .option("--ignore-eos", "go on past the end-of-sequence token")
    .addOption(deviceOption())
    .addOption(dtypeOption())
    .option("--json", "print one JSON object at the end: text, tokens, prompt_tokens, finish_reason, timings")
    .option("-v, --verbose", "print timings to stderr")
    .action(generate);
}

async function generate(opts: GenerateOptions): Promise<void> {
  const prompt = await readPrompt(opts); // before the (slow) model load
  const start = performance.now();
  await withEngine(opts, async (engine) => {
    const loadMs = performance.now() - start;
    const done = await stream(engine, { ...opts, prompt }, opts.json ? null : process.stdout);
    const totalMs = performance.now() - start;
    process.stdout.write(opts.json ? `${JSON.stringify(jsonResult(done, loadMs, totalMs))}\n` : "\n");
    if (opts.verbose) {
      const t = done.timings;
      process.stderr.write(
        `${engine.device}: ${done.promptTokens.length} prompt tokens, ${done.tokens.length} generated (${done.finishReason}); ` +
          `load ${loadMs.toFixed(0)} ms, first token ${t.timeToFirstTokenMs.toFixed(1)} ms, ` +
          `${t.tokensPerSecond.toFixed(1)} tokens/s, total ${totalMs.toFixed(0)} ms\n`,
      );
    }
    // Stopped by Ctrl-C: what was generated is out; the status says it was interrupted.
    if (done.finishReason === "abort") process.exitCode = 130;
  });
}

/** `--json`'s object: the done event in snake_case, times in ms rounded to 0.01. */
function jsonResult(done: DoneEvent, loadMs: number, totalMs: number) {
  const t = done.timings;
  const timings = {
    load_ms: loadMs,
    time_to_first_token_ms: t.timeToFirstTokenMs,
    decode_ms: t.decodeMs,
    tokens_per_second: t.tokensPerSecond,
    total_ms: totalMs,
  };
  return {
    text: done.text,
    tokens: done.tokens,
    prompt_tokens: done.promptTokens,
    finish_reason: done.finishReason,
    timings: Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, Math.round(v * 100) / 100])),
  };
}

async function readPrompt(opts: GenerateOptions): Promise<string> {
  if (opts.prompt !== undefined) return opts.prompt;
  if (opts.promptFile === undefined) fail("input", "no prompt: give --prompt TEXT or --prompt-file FILE");
  try {
    return await readFile(opts.promptFile, "utf8");
  } catch (err) {
    const why = (err as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : oneLine(err);
    fail("input", `--prompt-file ${opts.promptFile}: ${why}`, err);
  }
}

/** Run the request, writing its text to `out` as it comes; Ctrl-C ends it (a second one kills the process). */
async function stream(engine: Engine, request: GenerateRequest, out: NodeJS.WritableStream | null): Promise<DoneEvent> {
  const abort = new AbortController();
  const onInterrupt = () => abort.abort();
  process.once("SIGINT", onInterrupt);
  try {
    let done: DoneEvent | undefined;
    for await (const event of engine.generate({ ...request, signal: abort.signal })) {
      if (event.type === "done") done = event;
      else if (event.type !== "prompt" && event.text) out?.write(event.text);
    }
    return done!; // every request ends with one
  } finally {
    process.off("SIGINT", onInterrupt);
  }
}
