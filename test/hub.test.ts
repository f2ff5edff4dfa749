import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { lstat, mkdir, mkdtemp, readFile, readdir, readlink, rm, symlink, writeFile } from "node:fs/promises";
import { type Server, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, afterEach, before, beforeEach, describe, test } from "node:test";
import { DecimaError } from "../src/errors.js";
import { parseModelConfig } from "../src/model/config.js";
import { fromFloat32 } from "../src/model/dtype.js";
import { hubCacheDir, hubSnapshot, locateModel, parseHubId } from "../src/model/hub.js";
import { loadWeights, resolveModel } from "../src/model/model-dir.js";
import { float32Source, packWeights } from "../src/model/pack.js";
import { randomWeights } from "../src/model/random.js";
import { safetensorsDType, writeSafetensors } from "../src/model/safetensors.js";
import { expectedShapes } from "../src/model/weights.js";

const ENV_KEYS = ["HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE"];
const savedEnv = Object.fromEntries(ENV_KEYS.map((k) => [k, process.env[k]]));

const COMMIT_MAIN = "0123456789abcdef0123456789abcdef01234567";
const COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98";

const configJson = {
  architectures: ["DeciCoderForCausalLM"],
  model_type: "llama",
  vocab_size: 16,
  hidden_size: 8,
  intermediate_size: 12,
  num_hidden_layers: 1,
  num_attention_heads: 2,
  num_key_value_heads: 1,
  torch_dtype: "float16",
};
const config = parseModelConfig(configJson);

let root: string;
let home: string;
before(async () => {
  root = await mkdtemp(join(os.tmpdir(), "decima-hub-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});
beforeEach(async () => {
  for (const k of ENV_KEYS) delete process.env[k];
  home = await mkdtemp(join(root, "hf-home-"));
  process.env.HF_HOME = home;
});
afterEach(() => {
  for (const k of ENV_KEYS) {
    if (savedEnv[k] === undefined) delete process.env[k];
    else process.env[k] = savedEnv[k];
  }
});

async function rejectsWith(promise: Promise<unknown>, ...parts: string[]): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof DecimaError, `not a DecimaError: ${err}`);
    assert.ok(!err.message.includes("\n"), `not one line: ${err.message}`);
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`);
    return true;
  });
}

/** A model's files: config, tokenizer and fp16 weights (one file, or two shards with an index). */
async function modelFiles(sharded: boolean): Promise<Map<string, Buffer>> {
  const dir = await mkdtemp(join(root, "files-"));
  const weights = randomWeights(config, 3);
  const list = [...expectedShapes(config)].map(([name, shape]) => ({
    name,
    dtype: safetensorsDType("float16"),
    shape,
    data: fromFloat32(weights.get(name)!, "float16"),
  }));
  const files = new Map<string, Buffer>([
    ["config.json", Buffer.from(JSON.stringify(configJson))],
    ["tokenizer.json", Buffer.from('{"version":"1.0"}')],
    ["tokenizer_config.json", Buffer.from('{"model_max_length":2048}')],
  ]);
  const shards = sharded ? [list.slice(0, 4), list.slice(4)] : [list];
  const weightMap: Record<string, string> = {};
  for (const [i, shard] of shards.entries()) {
    const name = sharded ? `model-0000${i + 1}-of-00002.safetensors` : "model.safetensors";
    await writeSafetensors(join(dir, name), shard);
    files.set(name, await readFile(join(dir, name)));
    for (const t of shard) weightMap[t.name] = name;
  }
  if (sharded) files.set("model.safetensors.index.json", Buffer.from(JSON.stringify({ metadata: {}, weight_map: weightMap })));
  return files;
}

/** Lays out a snapshot by hand as huggingface_hub would: refs, snapshots/<commit>, plain files. */
async function cacheSnapshot(repo: string, commit: string, files: Map<string, Buffer>, ref?: string): Promise<string> {
  const repoDir = join(home, "hub", `models--${repo.replace("/", "--")}`);
  const snapshot = join(repoDir, "snapshots", commit);
  await mkdir(snapshot, { recursive: true });
  for (const [name, data] of files) await writeFile(join(snapshot, name), data);
  if (ref) {
    await mkdir(join(repoDir, "refs"), { recursive: true });
    await writeFile(join(repoDir, "refs", ref), commit);
  }
  return snapshot;
}

describe("hub ids and the cache directory", () => {
  test("parses org/name and org/name@revision", () => {
    assert.deepEqual(parseHubId("Deci/DeciCoder-1b"), { repo: "Deci/DeciCoder-1b", revision: "main" });
    assert.deepEqual(parseHubId("Deci/DeciCoder-1b@v1.0"), { repo: "Deci/DeciCoder-1b", revision: "v1.0" });
    assert.deepEqual(parseHubId(`a/b@${COMMIT_V1}`), { repo: "a/b", revision: COMMIT_V1 });
    assert.deepEqual(parseHubId("a/b@refs/pr/1"), { repo: "a/b", revision: "refs/pr/1" });
    for (const bad of ["gpt2", "a/b/c", "a/b@", "a/b@x@y", "-a/b", "a--b/c", "a/b.", "./model", "/abs/path", "a/b@../../x", ""]) {
      assert.equal(parseHubId(bad), null, bad);
    }
  });

  test("follows HF_HUB_CACHE, then HF_HOME, then XDG_CACHE_HOME, then ~/.cache", () => {
    delete process.env.HF_HOME;
    assert.equal(hubCacheDir(), join(os.homedir(), ".cache", "huggingface", "hub"));
    process.env.XDG_CACHE_HOME = "/x";
    assert.equal(hubCacheDir(), "/x/huggingface/hub");
    process.env.HF_HOME = "/h";
    assert.equal(hubCacheDir(), "/h/hub");
    process.env.HF_HUB_CACHE = "/c";
    assert.equal(hubCacheDir(), "/c");
  });
});

describe("resolving from the cache", () => {
  test("a hub id resolves through refs to its snapshot, and so does a revision or a commit", async () => {
    process.env.HF_HUB_OFFLINE = "1";
    const files = await modelFiles(false);
    const main = await cacheSnapshot("Org/Model", COMMIT_MAIN, files, "main");
    const v1 = await cacheSnapshot("Org/Model", COMMIT_V1, files, "v1");
    const resolved = await resolveModel("Org/Model");
    assert.equal(resolved.dir, main);
    assert.equal(resolved.source, `Org/Model@${COMMIT_MAIN}`);
    assert.equal(resolved.config.vocabSize, 16);
    assert.equal(resolved.config.architecture, "DeciCoderForCausalLM");
    assert.equal((await resolveModel("Org/Model@v1")).dir, v1);
    assert.equal((await resolveModel(`Org/Model@${COMMIT_V1}`)).dir, v1);
    const weights = await loadWeights(resolved.dir, resolved.config);
    assert.equal(weights.dtype, "float16");
  });

  test("a sharded snapshot of symlinks into blobs is used as it is", async () => {
    process.env.HF_HUB_OFFLINE = "1";
    const files = await modelFiles(true);
    const snapshot = await cacheSnapshot("Org/Sharded", COMMIT_MAIN, new Map(), "main");
    const blobs = join(home, "hub", "models--Org--Sharded", "blobs");
    await mkdir(blobs);
    for (const [name, data] of files) {
      const etag = createHash("sha256").update(data).digest("hex");
      await writeFile(join(blobs, etag), data);
      await symlink(`../../blobs/${etag}`, join(snapshot, name));
    }
    assert.equal((await hubSnapshot({ repo: "Org/Sharded", revision: "main" })).dir, snapshot);
  });

  test("a local directory is used as it is; a file or a non-id is one clear line", async () => {
    const dir = await mkdtemp(join(root, "local-"));
    await writeFile(join(dir, "config.json"), JSON.stringify(configJson));
    const resolved = await resolveModel(dir);
    assert.equal(resolved.dir, dir);
    assert.equal(resolved.source, dir);
    await rejectsWith(locateModel(join(dir, "config.json")), "config.json: is a file");
    await rejectsWith(locateModel(join(dir, "no", "such")), "no/such: no such directory, and not a Hugging Face model id");
    await rejectsWith(locateModel("gpt2"), "gpt2: no such directory, and not a Hugging Face model id (org/name[@revision])");
  });

  test("a bad config.json is one line naming the file", async () => {
    const dir = await mkdtemp(join(root, "local-"));
    await rejectsWith(resolveModel(dir), `${join(dir, "config.json")}: no such file`);
    await writeFile(join(dir, "config.json"), "{");
    await rejectsWith(resolveModel(dir), `${join(dir, "config.json")}: not valid JSON`);
    await writeFile(join(dir, "config.json"), JSON.stringify({ ...configJson, hidden_size: "big" }));
    await rejectsWith(resolveModel(dir), `${join(dir, "config.json")}: hidden_size:`);
  });
});

describe("offline", () => {
  test("a model missing from the cache with HF_HUB_OFFLINE=1 is one line", async () => {
    process.env.HF_HUB_OFFLINE = "1";
    await rejectsWith(
      resolveModel("Deci/DeciCoder-1b"),
      "cannot download Deci/DeciCoder-1b: offline (HF_HUB_OFFLINE is set); put the model in the Hugging Face cache or pass a local directory",
    );
  });

  test("an incomplete snapshot (no weights) needs the network", async () => {
    process.env.HF_HUB_OFFLINE = "1";
    const files = await modelFiles(false);
    files.delete("model.safetensors");
    await cacheSnapshot("Org/Partial", COMMIT_MAIN, files, "main");
    await rejectsWith(resolveModel("Org/Partial@main"), "cannot download Org/Partial: offline");
  });

  test("an unreachable endpoint is one line with the reason", async () => {
    // A port that was just free: nothing listens there. (fetch refuses port 9 itself, as a "bad port".)
    const server = await listen(() => {});
    const { port } = server.address() as AddressInfo;
    await new Promise((done) => server.close(done));
    process.env.HF_ENDPOINT = `http://127.0.0.1:${port}`;
    await rejectsWith(
      resolveModel("Org/Model@v2"),
      `cannot download Org/Model@v2: offline (connect ECONNREFUSED 127.0.0.1:${port}); put the model in the Hugging Face cache or pass a local directory`,
    );
  });
});

/** A fake hub: the resolve endpoint, with large files redirected to a CDN on another origin (as for LFS). */
class FakeHub {
  readonly requests: { server: string; url: string; auth: string | undefined; encoding: string | undefined }[] = [];
  private hub!: Server;
  private cdn!: Server;

  constructor(
    private readonly repo: string,
    private readonly files: Map<string, Buffer>,
  ) {}

  async start(): Promise<string> {
    this.cdn = await listen((req, res) => {
      this.requests.push({ server: "cdn", url: req.url!, auth: req.headers.authorization, encoding: req.headers["accept-encoding"] });
      const data = [...this.files.values()].find((d) => `/blobs/${sha256(d)}` === req.url);
      if (!data) return void res.writeHead(404).end();
      res.writeHead(200, { "content-length": data.length }).end(data);
    });
    const cdnUrl = `http://127.0.0.1:${(this.cdn.address() as AddressInfo).port}`;
    this.hub = await listen((req, res) => {
      this.requests.push({ server: "hub", url: req.url!, auth: req.headers.authorization, encoding: req.headers["accept-encoding"] });
      const m = /^\/(.+?)\/resolve\/([^/]+)\/(.+)$/.exec(req.url!);
      if (!m || m[1] !== this.repo) {
        return void res.writeHead(401, { "x-error-message": "Repository not found" }).end("no");
      }
      if (m[2] !== "main" && m[2] !== COMMIT_MAIN) return void res.writeHead(404).end();
      const data = this.files.get(decodeURIComponent(m[3]));
      const commit = { "x-repo-commit": COMMIT_MAIN };
      if (!data) return void res.writeHead(404, { ...commit, "x-error-code": "EntryNotFound" }).end();
      if (m[3].endsWith(".safetensors")) {
        return void res
          .writeHead(302, { ...commit, location: `${cdnUrl}/blobs/${sha256(data)}`, "x-linked-etag": `"${sha256(data)}"`, "x-linked-size": data.length })
          .end();
      }
      const etag = createHash("sha1").update(data).digest("hex");
      res.writeHead(200, { ...commit, etag: `"${etag}"`, "content-length": data.length }).end(data);
    });
    return `http://127.0.0.1:${(this.hub.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    await Promise.all([this.hub, this.cdn].map((s) => new Promise((done) => s.close(done))));
  }
}

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

function listen(handler: Parameters<typeof createServer>[1]): Promise<Server> {
  const server = createServer(handler);
  return new Promise((done) => server.listen(0, "127.0.0.1", () => done(server)));
}

/** Stands in for a terminal, so the progress bars are drawn. */
class FakeTerminal extends Writable {
  readonly isTTY = true;
  readonly columns = 120;
  text = "";
  override _write(chunk: Buffer, _encoding: string, done: () => void): void {
    this.text += chunk.toString();
    done();
  }
}

async function allFiles(dir: string): Promise<string[]> {
  return (await readdir(dir, { recursive: true })).map(String);
}

describe("downloading", () => {
  test("downloads a sharded model into the cache layout, then finds it there", async () => {
    const files = await modelFiles(true);
    const hub = new FakeHub("Org/Remote", files);
    process.env.HF_ENDPOINT = await hub.start();
    process.env.HF_TOKEN = "hf_secret";
    try {
      const terminal = new FakeTerminal();
      const resolved = await resolveModel("Org/Remote", { progress: terminal });
      const repoDir = join(home, "hub", "models--Org--Remote");
      assert.equal(resolved.dir, join(repoDir, "snapshots", COMMIT_MAIN));
      assert.equal(resolved.source, `Org/Remote@${COMMIT_MAIN}`);
      assert.equal((await readFile(join(repoDir, "refs", "main"), "utf8")).trim(), COMMIT_MAIN);

      // Every file is a relative symlink to a blob named by its etag, with the served contents.
      const names = (await readdir(resolved.dir)).sort();
      assert.deepEqual(names, [...files.keys()].sort());
      for (const [name, data] of files) {
        const link = join(resolved.dir, name);
        assert.ok((await lstat(link)).isSymbolicLink(), name);
        const etag = name.endsWith(".safetensors") ? sha256(data) : createHash("sha1").update(data).digest("hex");
        assert.equal(await readlink(link), `../../blobs/${etag}`);
        assert.deepEqual(await readFile(link), data);
      }
      assert.deepEqual(
        (await allFiles(repoDir)).filter((f) => f.includes("incomplete")),
        [],
        "no temporary files are left",
      );

      // The revision is resolved once; the rest is fetched at its commit. The token goes to the hub only.
      const hubRequests = hub.requests.filter((r) => r.server === "hub");
      assert.equal(hubRequests[0].url, "/Org/Remote/resolve/main/config.json");
      assert.ok(hubRequests.slice(1).every((r) => r.url.includes(`/resolve/${COMMIT_MAIN}/`)));
      assert.ok(hubRequests.every((r) => r.auth === "Bearer hf_secret"));
      const cdnRequests = hub.requests.filter((r) => r.server === "cdn");
      assert.equal(cdnRequests.length, 2);
      assert.ok(cdnRequests.every((r) => r.auth === undefined));
      assert.ok(hub.requests.every((r) => r.encoding === "identity"), "sizes are of the bytes as stored");
      assert.ok(terminal.text.includes("model-00002-of-00002.safetensors"), "a progress bar is drawn per file");

      const weights = await loadWeights(resolved.dir, resolved.config);
      const reference = await packWeights(float32Source(randomWeights(config, 3), expectedShapes(config)), config, "float16");
      assert.deepEqual(weights.layers[0].gateUp, reference.layers[0].gateUp);

      // Now it is in the cache: no request at all.
      const count = hub.requests.length;
      assert.equal((await resolveModel("Org/Remote")).dir, resolved.dir);
      assert.equal(hub.requests.length, count);
    } finally {
      await hub.stop();
    }
  });

  test("fetches only what an incomplete snapshot lacks", async () => {
    const files = await modelFiles(false);
    const partial = new Map(files);
    partial.delete("model.safetensors");
    await cacheSnapshot("Org/Remote", COMMIT_MAIN, partial, "main");
    const hub = new FakeHub("Org/Remote", files);
    process.env.HF_ENDPOINT = await hub.start();
    try {
      const resolved = await resolveModel("Org/Remote", { progress: new FakeTerminal() });
      assert.deepEqual(await readFile(join(resolved.dir, "model.safetensors")), files.get("model.safetensors"));
      const fetched = hub.requests.filter((r) => r.server === "hub").map((r) => r.url.split("/").pop());
      // config.json names the commit; the optional files it lacks are asked for, and the weights.
      assert.deepEqual(fetched, ["config.json", "special_tokens_map.json", "generation_config.json", "model.safetensors"]);
    } finally {
      await hub.stop();
    }
  });

  test("an unknown repository or a repository without safetensors is one line", async () => {
    const files = await modelFiles(false);
    const hub = new FakeHub("Org/Remote", files);
    process.env.HF_ENDPOINT = await hub.start();
    try {
      await rejectsWith(resolveModel("Org/Other"), "cannot download Org/Other:", "HTTP 401 (Repository not found)", "HF_TOKEN");
      files.delete("model.safetensors");
      files.set("pytorch_model.bin", Buffer.from("pickle"));
      await rejectsWith(resolveModel("Org/Remote"), "cannot download Org/Remote: it has no model.safetensors", "convert the checkpoint to safetensors");
    } finally {
      await hub.stop();
    }
  });
});
