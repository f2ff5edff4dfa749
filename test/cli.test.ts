import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { cp, mkdtemp, readFile, rm, stat, truncate, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, it } from "node:test";
import { cudaDevice } from "../src/engine/cuda/native.js";
import { createModel } from "../src/model/create.js";

const MAIN = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));
const PROMPT = "def fib(n):";

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** The compiled CLI as a user runs it. */
function decima(...args: string[]): Promise<Run> {
  const env = { ...process.env };
  delete env.DECIMA_DEBUG;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (s: string) => (stdout += s));
    child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr += s));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

async function ok(...args: string[]): Promise<string> {
  const run = await decima(...args);
  assert.equal(run.code, 0, `decima ${args.join(" ")} failed: ${run.stderr}`);
  assert.equal(run.stderr, "");
  return run.stdout;
}

/** A failure a user caused: one line on stderr matching `pattern`, no stack, nothing on stdout. */
async function failsWith(pattern: RegExp, ...args: string[]): Promise<Run> {
  const run = await decima(...args);
  assert.notEqual(run.code, 0);
  assert.equal(run.stdout, "");
  assert.match(run.stderr, /^decima: [^\n]+\n$/, `not one line: ${JSON.stringify(run.stderr)}`);
  assert.match(run.stderr, pattern);
  assert.doesNotMatch(run.stderr, /\bat .+:\d+:\d+/);
  return run;
}

let root: string;
let model: string;

const progress: [number, number][] = [];

before(async () => {
  root = await mkdtemp(join(os.tmpdir(), "decima-cli-"));
  model = join(root, "tiny");
  await createModel({ preset: "tiny", out: model, dtype: "float32", onProgress: (n, total) => progress.push([n, total]) });
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** A copy of the tiny model with config.json changed by `edit`. */
async function variant(name: string, edit: (config: Record<string, unknown>) => void): Promise<string> {
  const dir = join(root, name);
  await cp(model, dir, { recursive: true });
  const file = join(dir, "config.json");
  const config = JSON.parse(await readFile(file, "utf8"));
  edit(config);
  await writeFile(file, JSON.stringify(config));
  return dir;
}

describe("decima generate", () => {
  it("streams a greedy continuation, the same on every run", async () => {
    const first = await ok("generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "16");
    assert.ok(first.endsWith("\n"));
    assert.ok(first.length > 1, "no continuation");
    assert.equal(await ok("generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "16"), first);
  });

  it("--json: the text, token ids, prompt ids (as tokenize gives them) and timings", async () => {
    const args = ["generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "12", "--device", "cpu"];
    const [json, text, ids] = await Promise.all([
      ok(...args, "--json"),
      ok(...args),
      ok("tokenize", "--model", model, "--json", "--", PROMPT),
    ]);
    const result = JSON.parse(json);
    assert.deepEqual(Object.keys(result).sort(), ["finish_reason", "prompt_tokens", "text", "timings", "tokens"]);
    assert.equal(result.text, text.slice(0, -1));
    assert.equal(result.finish_reason, "length");
    assert.equal(result.tokens.length, 12);
    assert.ok(result.tokens.every((id: number) => Number.isInteger(id) && id >= 0 && id < 1024));
    assert.deepEqual(result.prompt_tokens, JSON.parse(ids));
    assert.equal(await ok("detokenize", "--model", model, result.tokens.join(",")), `${result.text}\n`);
    const t = result.timings;
    assert.deepEqual(Object.keys(t).sort(), ["decode_ms", "load_ms", "time_to_first_token_ms", "tokens_per_second", "total_ms"]);
    for (const v of Object.values(t)) assert.ok(typeof v === "number" && v >= 0);
    assert.ok(t.tokens_per_second > 0);
    assert.ok(t.total_ms + 0.02 >= t.load_ms + t.time_to_first_token_ms + t.decode_ms); // rounded to 0.01
  });

  it("--stop ends the text before the stop string", async () => {
    const full = JSON.parse(await ok("generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "32", "--json"));
    const stop = /[a-z]{3}/.exec(full.text.slice(2))?.[0];
    assert.ok(stop, `no word to stop at in ${JSON.stringify(full.text)}`);
    const args = ["generate", "--model", model, "--prompt", PROMPT, "--max-tokens", "32", "--stop", "@@@", "--stop", stop];
    const result = JSON.parse(await ok(...args, "--json"));
    assert.equal(result.finish_reason, "stop");
    assert.equal(result.text, full.text.slice(0, full.text.indexOf(stop)));
  });
});

describe("decima create-model", () => {
  it("reports progress up to every weight byte, and says what it wrote", async () => {
    const weights = (await stat(join(model, "model.safetensors"))).size;
    const [last, total] = progress.at(-1)!;
    assert.equal(last, total);
    assert.ok(total > 0.99 * weights && total < weights, `${total} of a ${weights}-byte file`);
    assert.ok(progress.every(([n, t], i) => t === total && (i === 0 || n > progress[i - 1][0])));

    const out = join(root, "created");
    const line = await ok("create-model", "--preset", "decilm-tiny", "--out", out, "--seed", "3", "--dtype", "float16");
    assert.equal(line, `created ${out}: DeciLMForCausalLM, 3 layers, hidden 256, vocab 1024, 2.3M parameters in float16\n`);
    assert.equal(JSON.parse(await readFile(join(out, "config.json"), "utf8")).torch_dtype, "float16");
    await failsWith(/created: already exists and is not empty/, "create-model", "--preset", "tiny", "--out", out);
  });
});

describe("decima tokenize / detokenize / logits", () => {
  it("tokenize and detokenize round-trip non-ASCII text", async () => {
    const text = "naïve café — 日本語 ✓ 🚀";
    const ids = (await ok("tokenize", "--model", model, text)).trim();
    assert.match(ids, /^\d+(,\d+)*$/);
    assert.equal(await ok("detokenize", "--model", model, ids), `${text}\n`);
  });

  it("logits prints one row of vocab-size floats per token", async () => {
    const result = JSON.parse(await ok("logits", "--model", model, "--tokens", "5,17,300"));
    assert.deepEqual(result.tokens, [5, 17, 300]);
    assert.equal(result.logits.length, 3);
    for (const row of result.logits) {
      assert.equal(row.length, 1024);
      assert.ok(row.every(Number.isFinite));
    }
    assert.notDeepEqual(result.logits[0], result.logits[1]);
  });
});

describe("decima bench", () => {
  it("times greedy decoding, or sampling with the generate command's sampler flags", async () => {
    for (const sampler of [[], ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--min-p", "0.01", "--repetition-penalty", "1.1"]]) {
      const args = ["bench", "--model", model, "--device", "cpu", "--batch", "1,2", "--prompt-len", "4", "--gen-len", "4", "--repeat", "1"];
      const result = JSON.parse(await ok(...args, ...sampler, "--json"));
      assert.deepEqual(
        result.rows.map((r: { batch: number; genLen: number }) => [r.batch, r.genLen]),
        [
          [1, 4],
          [2, 4],
        ],
      );
      for (const row of result.rows) assert.ok(row.stepMs > 0 && row.decodeTokensPerS > 0, JSON.stringify(row));
      // The CPU backend's defaults: no async scheduling, so 10 ms calls.
      assert.deepEqual(result.scheduling, { asyncScheduling: false, decodeSteps: 16, maxCallMs: 10 });
    }
    const queued = JSON.parse(await ok("bench", "--model", model, "--device", "cpu", "--gen-len", "4", "--repeat", "1", "--async-scheduling", "--json"));
    assert.deepEqual(queued.scheduling, { asyncScheduling: true, decodeSteps: 16, maxCallMs: 5 });
    const longer = JSON.parse(await ok("bench", "--model", model, "--device", "cpu", "--gen-len", "4", "--repeat", "1", "--max-call-ms", "2.5", "--json"));
    assert.equal(longer.scheduling.maxCallMs, 2.5);
  });
});

describe("bad input: one line, no stack, non-zero exit", { concurrency: true }, () => {
  it("a missing --model (usage: exit 2)", async () => {
    const run = await failsWith(/required option '-m, --model/, "generate", "--prompt", "x");
    assert.equal(run.code, 2);
  });

  it("a model directory that doesn't exist", async () => {
    const dir = join(root, "missing");
    const run = await failsWith(new RegExp(`${dir}: no such directory`), "generate", "--model", dir, "--prompt", "x");
    assert.equal(run.code, 1);
  });

  it("a truncated safetensors file", async () => {
    const dir = await variant("truncated", () => {});
    const file = join(dir, "model.safetensors");
    await truncate(file, 100_000);
    await failsWith(new RegExp(`${file}: .*truncated or corrupt`), "generate", "--model", dir, "--prompt", "x");
  });

  it("an unknown architecture in config.json", async () => {
    const dir = await variant("gpt2", (c) => (c.architectures = ["GPT2LMHeadModel"]));
    await failsWith(/config\.json: unknown architecture "GPT2LMHeadModel"/, "generate", "--model", dir, "--prompt", "x");
  });

  it("a pre-quantized checkpoint (quantization_config in config.json)", async () => {
    const dir = await variant("awq", (c) => (c.quantization_config = { quant_method: "awq", bits: 4, group_size: 128, zero_point: true }));
    await failsWith(/config\.json: a pre-quantized checkpoint \(quantization_config, method "awq"\) is not supported; quantize a 16-bit one with decima build --quant int8\|int4/, "generate", "--model", dir, "--prompt", "x");
  });

  it("weights whose shapes disagree with config.json", async () => {
    const dir = await variant("wide", (c) => (c.hidden_size = 512));
    const shape = /tensor model\.embed_tokens\.weight has shape \[1024, 256\], the config needs \[1024, 512\]/;
    await failsWith(shape, "logits", "--model", dir, "--tokens", "1");
  });

  it("a token id outside the vocabulary", async () => {
    await failsWith(/token id 1024 is outside the vocabulary \(0\.\.1023\)/, "logits", "--model", model, "--tokens", "1,1024");
  });

  it("a bad flag value, and an unknown flag (usage: exit 2)", async () => {
    const [bad, unknown] = await Promise.all([
      failsWith(/^decima: --max-tokens must be a positive integer \(got "abc"\)\n$/, "generate", "--model", model, "--prompt", "x", "--max-tokens", "abc"),
      failsWith(/unknown option '--temprature'/, "generate", "--model", model, "--prompt", "x", "--temprature", "1"),
    ]);
    assert.equal(bad.code, 2);
    assert.equal(unknown.code, 2);
  });

  it("a prompt longer than the context", async () => {
    const dir = await variant("short", (c) => (c.max_position_embeddings = 64));
    const prompt = "x = 1\n".repeat(50);
    const ids = (await ok("tokenize", "--model", dir, "--", prompt)).trim().split(",");
    assert.ok(ids.length >= 200, `only ${ids.length} tokens`);
    const run = await failsWith(
      new RegExp(`prompt has ${ids.length} tokens; the model's context length is 64`),
      "generate",
      "--model",
      dir,
      "--prompt",
      prompt,
    );
    assert.equal(run.code, 1);
  });

  it("--device cuda without a GPU", { skip: cudaDevice().ok && "there is a GPU here" }, async () => {
    await failsWith(/--device cuda: the CUDA backend is unavailable: /, "generate", "--model", model, "--prompt", "x", "--device", "cuda");
  });
});
