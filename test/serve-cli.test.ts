import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, it } from "node:test";
import { createModel } from "../src/model/create.js";

const MAIN = fileURLToPath(new URL("../src/cli/main.js", import.meta.url));

interface Child {
  process: ChildProcess;
  stdout: string;
  stderr: string;
  /** Resolves with the exit code. */
  exited: Promise<number | null>;
}

/** The compiled CLI in a child process; its output is collected as it comes. */
function decima(...args: string[]): Child {
  const env = { ...process.env };
  delete env.DECIMA_DEBUG;
  delete env.DECIMA_API_KEY;
  const child = spawn(process.execPath, [MAIN, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
  const run: Child = { process: child, stdout: "", stderr: "", exited: once(child, "close").then(([code]) => code as number | null) };
  child.stdout!.setEncoding("utf8").on("data", (s: string) => (run.stdout += s));
  child.stderr!.setEncoding("utf8").on("data", (s: string) => (run.stderr += s));
  return run;
}

async function firstLine(child: Child): Promise<string> {
  while (!child.stdout.includes("\n")) {
    if (child.process.exitCode !== null) assert.fail(`exited early: ${child.stderr}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return child.stdout.split("\n")[0];
}

describe("decima serve and bench-serve", () => {
  let root: string;
  let model: string;

  before(async () => {
    root = await mkdtemp(join(os.tmpdir(), "decima-serve-"));
    model = (await createModel({ preset: "tiny", out: join(root, "tiny") })).dir;
  });
  after(() => rm(root, { recursive: true, force: true }));

  it("serves on a free port of 127.0.0.1, prints the URL, and closes on SIGTERM", async () => {
    const child = decima("serve", "--model", model, "--device", "cpu", "--port", "0", "--served-model-name", "tiny", "--api-key", "k");
    const line = await firstLine(child);
    const url = /^decima: serving "tiny" at (http:\/\/127\.0\.0\.1:\d+) \(OpenAI API under \/v1, a playground at \1\/\)$/.exec(line)?.[1];
    assert.ok(url, line);
    assert.equal((await fetch(`${url}/health`)).status, 200);
    assert.equal((await fetch(`${url}/`)).status, 200);
    assert.equal((await fetch(`${url}/v1/models`)).status, 401);
    const res = await fetch(`${url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer k" },
      body: JSON.stringify({ model: "tiny", prompt: "def f(x):", max_tokens: 3, ignore_eos: true }),
    });
    assert.equal(((await res.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens, 3);
    child.process.kill("SIGTERM");
    assert.equal(await child.exited, 0);
    assert.equal(child.stderr, "");
  });

  it("says which flag is wrong in one line; --no-playground leaves / unserved", async () => {
    const busy = decima("serve", "--model", model, "--device", "cpu", "--port", "0", "--no-playground");
    const line = await firstLine(busy);
    assert.match(line, /\(OpenAI API under \/v1\)$/);
    const url = new URL(/at (\S+)/.exec(line)![1]);
    assert.equal((await fetch(`${url.origin}/`)).status, 404);
    const clash = decima("serve", "--model", model, "--device", "cpu", "--port", url.port);
    assert.equal(await clash.exited, 1);
    assert.match(clash.stderr, new RegExp(`^decima: --host 127\\.0\\.0\\.1 --port ${url.port}: .*EADDRINUSE.*\\n$`));
    busy.process.kill("SIGINT");
    assert.equal(await busy.exited, 0);

    const neither = decima("bench-serve", "--clients", "1");
    assert.equal(await neither.exited, 1);
    assert.equal(neither.stderr, "decima: give --url of a running server, or --model to start one\n");

    const origin = decima("serve", "--model", model, "--device", "cpu", "--allowed-origins", "https://a.example,localhost:3000");
    assert.equal(await origin.exited, 2);
    assert.equal(origin.stderr, 'decima: --allowed-origins: "localhost:3000" is not an origin (scheme://host[:port], as https://editor.example)\n');
  });

  it("bench-serve --model runs its clients against an in-process server and reports JSON", async () => {
    const child = decima(
      "bench-serve", "--model", model, "--device", "cpu", "--clients", "3", "--requests", "6",
      "--prompt-len", "40", "--gen-len", "4", "--shared-prefix", "32", "--no-async-scheduling", "--json",
    );
    assert.equal(await child.exited, 0, child.stderr);
    const report = JSON.parse(child.stdout);
    assert.equal(report.requests, 6);
    assert.equal(report.errors, 0);
    assert.equal(report.outputTokens, 24);
    assert.ok(report.prefixCache.prefillTokensSaved > 0);
    assert.equal(report.kvBlocksUsedAtEnd, 0);
    assert.equal(report.soak, undefined);
  });
});
