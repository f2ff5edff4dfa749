import { createWriteStream } from "node:fs";
import { mkdir, readFile, rm, stat, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { pipeline } from "node:stream/promises";
import cliProgress from "cli-progress";
import { DecimaError, fail, oneLine } from "../errors.js";
import { SAFETENSORS_FILE, SAFETENSORS_INDEX, readShardIndex } from "./checkpoint.js";
import { exists, writeAtomically } from "./files.js";

/**
 * `--model` names a local directory or a Hugging Face hub model. Hub models live in the cache layout that
 * huggingface_hub uses, so a model downloaded by Python is found here and the other way round:
 *   <cache>/models--Org--Name/refs/<revision>       the commit hash the revision points at
 *   <cache>/models--Org--Name/snapshots/<commit>/   the files, as symlinks into blobs/
 *   <cache>/models--Org--Name/blobs/<etag>          the contents
 * Written by hand: the official JavaScript client (@huggingface/hub) is not a dependency, and a few
 * files over HTTP with the cache layout is all that is needed.
 */

export interface HubId {
  repo: string;
  revision: string;
}

export interface DownloadOptions {
  /** Where the progress bars go (default stderr; drawn only on a terminal). */
  progress?: NodeJS.WritableStream;
}

/** Files fetched beside config.json, tokenizer.json and the weights when the repository has them. */
const OPTIONAL_FILES = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

// huggingface_hub's rules: word characters, '-' and '.', not at either end, no '--' or '..'.
const REPO_PART = /^\w(?:[\w.-]*\w)?$/;
const REVISION = /^[\w.-]+(?:\/[\w.-]+)*$/;
const COMMIT = /^[0-9a-f]{40}$/;

/** `org/name` or `org/name@revision`, else null. */
export function parseHubId(spec: string): HubId | null {
  const [repo, revision = "main", ...rest] = spec.split("@");
  const parts = repo.split("/");
  const validPart = (p: string) => REPO_PART.test(p) && !p.includes("--") && !p.includes("..");
  if (rest.length > 0 || parts.length !== 2 || !parts.every(validPart) || repo.length > 96) return null;
  if (!REVISION.test(revision) || revision.includes("..")) return null;
  return { repo, revision };
}

/** A local model directory, or a hub model from the cache (downloaded into it if need be). */
export async function locateModel(spec: string, options?: DownloadOptions): Promise<{ dir: string; source: string }> {
  const isDir = await stat(spec).then(
    (s) => s.isDirectory(),
    () => null,
  );
  if (isDir) return { dir: resolve(spec), source: resolve(spec) };
  if (isDir === false) fail("hub", `${spec}: is a file; a model is a directory or a Hugging Face id (org/name[@revision])`);
  const id = parseHubId(spec);
  if (!id) fail("hub", `${spec}: no such directory, and not a Hugging Face model id (org/name[@revision])`);
  const { dir, commit } = await hubSnapshot(id, options);
  return { dir, source: `${id.repo}@${commit}` };
}

/** `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, as huggingface_hub decides. */
export function hubCacheDir(): string {
  const env = process.env;
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  const home = env.HF_HOME || join(env.XDG_CACHE_HOME || join(os.homedir(), ".cache"), "huggingface");
  return join(home, "hub");
}

/** The snapshot directory of a hub model: from the cache when it has what decima needs, else downloaded. */
export async function hubSnapshot(id: HubId, options: DownloadOptions = {}): Promise<{ dir: string; commit: string }> {
  const repoDir = join(hubCacheDir(), `models--${id.repo.replace("/", "--")}`);
  const commit = await cachedCommit(repoDir, id.revision);
  if (commit) {
    const dir = join(repoDir, "snapshots", commit);
    if (await hasModelFiles(dir)) return { dir, commit };
  }
  return new SnapshotDownload(id, repoDir, options.progress ?? process.stderr).run();
}

async function cachedCommit(repoDir: string, revision: string): Promise<string | null> {
  if (COMMIT.test(revision)) return revision;
  const ref = (await readFile(join(repoDir, "refs", revision), "utf8").catch(() => "")).trim();
  return COMMIT.test(ref) ? ref : null;
}

/** config.json, tokenizer.json and every weights file (the optional files are not needed to run). */
async function hasModelFiles(dir: string): Promise<boolean> {
  for (const file of ["config.json", "tokenizer.json"]) if (!(await exists(join(dir, file)))) return false;
  if (await exists(join(dir, SAFETENSORS_FILE))) return true;
  const index = join(dir, SAFETENSORS_INDEX);
  if (!(await exists(index))) return false;
  for (const shard of new Set((await readShardIndex(index)).values())) {
    if (!(await exists(join(dir, shard)))) return false;
  }
  return true;
}

interface Fetched {
  res: Response;
  url: string;
  commit: string | null;
  etag: string | null;
  size: number | null;
}

/** One download of a model's files into the cache. */
class SnapshotDownload {
  private readonly endpoint = (process.env.HF_ENDPOINT || "https://huggingface.co").replace(/\/+$/, "");
  private readonly label: string;

  constructor(
    private readonly id: HubId,
    private readonly repoDir: string,
    private readonly progress: NodeJS.WritableStream,
  ) {
    this.label = id.revision === "main" ? id.repo : `${id.repo}@${id.revision}`;
  }

  async run(): Promise<{ dir: string; commit: string }> {
    if (/^(1|on|yes|true)$/i.test(process.env.HF_HUB_OFFLINE ?? "")) this.offline("HF_HUB_OFFLINE is set");
    // config.json at the revision tells its commit; every other file is fetched at that commit, so they match.
    const config = (await this.get(this.id.revision, "config.json", true))!;
    const commit = config.commit;
    if (!commit || !COMMIT.test(commit)) {
      await config.res.body?.cancel();
      fail(
        "hub",
        `cannot download ${this.label}: ${config.url} sent no commit hash (X-Repo-Commit); is HF_ENDPOINT a Hugging Face hub?`,
      );
    }
    if (commit !== this.id.revision) {
      const ref = join(this.repoDir, "refs", this.id.revision);
      await mkdir(dirname(ref), { recursive: true });
      await writeAtomically(ref, (tmp) => writeFile(tmp, commit));
    }
    const dir = join(this.repoDir, "snapshots", commit);
    await this.save(config, dir, "config.json");
    await this.fetch(commit, dir, "tokenizer.json", true);
    for (const file of OPTIONAL_FILES) await this.fetch(commit, dir, file, false);
    if (!(await this.fetch(commit, dir, SAFETENSORS_FILE, false))) {
      if (!(await this.fetch(commit, dir, SAFETENSORS_INDEX, false))) {
        fail(
          "hub",
          `cannot download ${this.label}: it has no ${SAFETENSORS_FILE} or ${SAFETENSORS_INDEX}; decima reads safetensors only: convert the checkpoint to safetensors`,
        );
      }
      const shards = new Set((await readShardIndex(join(dir, SAFETENSORS_INDEX))).values());
      for (const shard of shards) await this.fetch(commit, dir, shard, true);
    }
    return { dir, commit };
  }

  /** Bring `file` into the snapshot unless it is there already; false if the repository lacks it. */
  private async fetch(commit: string, dir: string, file: string, required: boolean): Promise<boolean> {
    if (await exists(join(dir, file))) return true;
    const got = await this.get(commit, file, required);
    if (!got) return false;
    await this.save(got, dir, file);
    return true;
  }

  /**
   * GET a file, following redirects by hand: the hub's own response carries the commit and the content's
   * etag, while large files are served by a CDN that must not see the token.
   */
  private async get(revision: string, file: string, required: boolean): Promise<Fetched | null> {
    const path = file.split("/").map(encodeURIComponent).join("/");
    let url = `${this.endpoint}/${this.id.repo}/resolve/${encodeURIComponent(revision)}/${path}`;
    let auth: Record<string, string> = process.env.HF_TOKEN ? { authorization: `Bearer ${process.env.HF_TOKEN}` } : {};
    let commit: string | null = null;
    let etag: string | null = null;
    let size: string | null = null;
    for (let hop = 0; hop < 10; hop++) {
      let res: Response;
      try {
        // Bytes as stored, so that sizes can be checked (fetch would undo a gzip transfer encoding).
        res = await fetch(url, { headers: { "accept-encoding": "identity", ...auth }, redirect: "manual" });
      } catch (err) {
        this.offline(innermost(err), err);
      }
      commit ??= res.headers.get("x-repo-commit");
      etag ??= cleanEtag(res.headers.get("x-linked-etag") ?? res.headers.get("etag"));
      size ??= res.headers.get("x-linked-size");
      const location = res.headers.get("location");
      if (res.status >= 300 && res.status < 400 && location) {
        await res.body?.cancel();
        const next = new URL(location, url);
        if (next.origin !== new URL(url).origin) auth = {};
        url = next.href;
        continue;
      }
      if (res.ok) {
        size ??= res.headers.get("content-length");
        return { res, url, commit, etag, size: size !== null && /^\d+$/.test(size) ? Number(size) : null };
      }
      await res.body?.cancel();
      if (res.status === 404 && !required) return null;
      this.httpFailure(res, url);
    }
    fail("hub", `cannot download ${this.label}: too many redirects for ${file}`);
  }

  /** Store a response as a blob (named by its etag) linked from the snapshot, as huggingface_hub does. */
  private async save(got: Fetched, dir: string, file: string): Promise<void> {
    const link = join(dir, file);
    await mkdir(dirname(link), { recursive: true });
    if (!got.etag) {
      // Not a hub that names contents (a plain file server): a plain file in the snapshot reads the same.
      await this.stream(got, link, file);
      return;
    }
    const blob = join(this.repoDir, "blobs", got.etag);
    await mkdir(dirname(blob), { recursive: true });
    if (await exists(blob)) await got.res.body?.cancel();
    else await this.stream(got, blob, file);
    await rm(link, { force: true });
    await symlink(relative(dirname(link), blob), link);
  }

  private async stream(got: Fetched, target: string, file: string): Promise<void> {
    const mb = (n: number) => (n / 1e6).toFixed(1);
    const bar = new cliProgress.SingleBar(
      { format: `${file} |{bar}| {percentage}% {done}/{size} MB`, stream: this.progress },
      cliProgress.Presets.shades_classic,
    );
    let done = 0;
    bar.start(got.size ?? 0, 0, { done: mb(0), size: got.size === null ? "?" : mb(got.size) });
    try {
      await writeAtomically(target, async (tmp) => {
        await pipeline(
          got.res.body!,
          async function* (chunks: AsyncIterable<Uint8Array>) {
            for await (const chunk of chunks) {
              done += chunk.byteLength;
              bar.update(done, { done: mb(done) });
              yield chunk;
            }
          },
          createWriteStream(tmp),
        );
        if (got.size !== null && done !== got.size) {
          fail("hub", `cannot download ${this.label}: ${file} ended after ${done} of ${got.size} bytes`);
        }
      });
    } catch (err) {
      if (err instanceof DecimaError) throw err;
      fail("hub", `cannot download ${this.label}: ${file}: ${innermost(err)}`, err);
    } finally {
      bar.stop();
    }
  }

  private offline(reason: string, cause?: unknown): never {
    fail(
      "hub",
      `cannot download ${this.label}: offline (${reason}); put the model in the Hugging Face cache or pass a local directory`,
      cause,
    );
  }

  private httpFailure(res: Response, url: string): never {
    const detail = res.headers.get("x-error-message");
    const hint =
      res.status === 401 || res.status === 403 || res.status === 404
        ? "; check the id and revision (private and gated models need HF_TOKEN)"
        : "";
    fail("hub", `cannot download ${this.label}: ${url}: HTTP ${res.status}${detail ? ` (${oneLine(detail)})` : ""}${hint}`);
  }
}

/** Normalized as huggingface_hub does (no W/, no quotes); null unless it is usable as a file name. */
function cleanEtag(etag: string | null): string | null {
  const bare = etag?.replace(/^W\//, "").replace(/"/g, "");
  return bare && /^[\w.-]+$/.test(bare) ? bare : null;
}

/** The root cause of a network failure: fetch wraps "getaddrinfo ENOTFOUND ..." in "fetch failed". */
function innermost(err: unknown): string {
  let e = err;
  for (let depth = 0; depth < 8; depth++) {
    if (e instanceof AggregateError && e.errors.length > 0) e = e.errors[0];
    else if (e instanceof Error && e.cause !== undefined) e = e.cause;
    else break;
  }
  return oneLine(e);
}
