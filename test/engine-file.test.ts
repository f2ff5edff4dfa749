import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cp, mkdir, mkdtemp, readFile, readdir, rm, stat, truncate, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { CpuBackend } from "../src/engine/cpu/backend.js";
import { DecimaError } from "../src/errors.js";
import { buildEngine } from "../src/model/build-engine.js";
import { createModel } from "../src/model/create.js";
import { ALIGNMENT, ENGINE_FILE, WEIGHTS_FILE, engineTensors, readEngine } from "../src/model/engine-file.js";
import { loadWeights, resolveModel } from "../src/model/model-dir.js";
import type { ModelWeights } from "../src/model/weights.js";
import { Engine } from "../src/runtime/engine.js";
import { batchOf } from "./step-batch.js";

let root: string;
/** Source model directories, and engines built from them, by name. */
const models: Record<string, string> = {};
const engines: Record<string, string> = {};

before(async () => {
  root = await mkdtemp(join(os.tmpdir(), "decima-engine-"));
  models.tiny = (await createModel({ preset: "tiny", out: join(root, "tiny"), seed: 3 })).dir;
  // fp32 on disk: the engine's default becomes bfloat16.
  models.decilm = (await createModel({ preset: "decilm-tiny", out: join(root, "decilm"), seed: 4, dtype: "float32" })).dir;
  const build = async (name: string, model: string, quant: "none" | "int8" | "int4", groupSize?: number) => {
    engines[name] = join(root, `engine-${name}`);
    await buildEngine({ model, out: engines[name], quant, groupSize });
  };
  await build("tiny", models.tiny, "none");
  await build("tiny-int8", models.tiny, "int8");
  // tiny's MLP is 688 wide: groups of 16 divide it, the default 128 does not.
  await build("tiny-int4", models.tiny, "int4", 16);
  await build("decilm", models.decilm, "none");
  await build("decilm-int4", models.decilm, "int4");
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Every stored byte array of a ModelWeights, by engine name. */
function bytesByName(w: ModelWeights): Map<string, Uint8Array[]> {
  return new Map([...engineTensors(w)].map(([name, t]) => [name, "scales" in t ? [t.data, t.scales] : [t.data]]));
}

async function rejectsOneLine(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof DecimaError, String(err));
    assert.doesNotMatch(err.message, /\n/);
    assert.match(err.message, pattern);
    return true;
  });
}

describe("building an engine", () => {
  it("without quantization holds exactly the bytes loadWeights packs from the source", async () => {
    for (const [model, engine] of [
      [models.tiny, engines.tiny],
      [models.decilm, engines.decilm],
    ]) {
      const { config } = await resolveModel(model);
      const { weights, manifest, stats } = await readEngine(engine);
      assert.equal(manifest.dtype, "bfloat16");
      const expected = await loadWeights(model, config, "bfloat16");
      assert.deepEqual(bytesByName(weights), bytesByName(expected));
      assert.equal(weights.dtype, "bfloat16");
      assert.equal(stats.bytes, [...bytesByName(weights).values()].flat().reduce((n, b) => n + b.byteLength, 0));
      assert.ok(stats.ms >= 0);
    }
  });

  it("writes a manifest naming its source, tokenizer files and aligned tensor table", async () => {
    const { manifest } = await readEngine(engines["tiny-int4"]);
    assert.equal(manifest.format, "decima-engine");
    assert.equal(manifest.version, 2);
    assert.deepEqual(manifest.quant, { kind: "int4", groupSize: 16 });
    assert.deepEqual(manifest.config, JSON.parse(await readFile(join(models.tiny, "config.json"), "utf8")));
    assert.deepEqual(manifest.tokenizerFiles, ["tokenizer.json", "tokenizer_config.json"]);
    for (const name of ["config.json", ...manifest.tokenizerFiles]) {
      assert.deepEqual(await readFile(join(engines["tiny-int4"], name)), await readFile(join(models.tiny, name)));
    }
    assert.deepEqual(
      manifest.source.files.map((f) => f.name),
      ["config.json", "model.safetensors"],
    );
    for (const f of manifest.source.files) {
      const bytes = await readFile(join(models.tiny, f.name));
      assert.equal(f.bytes, bytes.byteLength);
      assert.equal(f.sha256, createHash("sha256").update(bytes).digest("hex"));
    }
    // 2 layers of 6 tensors, embed, norm, LM head (untied).
    assert.equal(manifest.tensors.length, 15);
    const names = manifest.tensors.map((t) => t.name);
    assert.deepEqual(names.slice(0, 3), ["embed", "layers.0.inputNorm", "layers.0.qkv"]);
    assert.deepEqual(names.slice(-2), ["norm", "lmHead"]);
    const formats = Object.fromEntries(manifest.tensors.map((t) => [t.name, t.format]));
    assert.deepEqual([formats.embed, formats["layers.1.down"], formats["layers.1.postNorm"], formats.lmHead], ["dense", "int4", "vector", "int8"]);
    for (const t of manifest.tensors) {
      assert.equal(t.offset % ALIGNMENT, 0, t.name);
      if ("scalesOffset" in t) assert.equal(t.scalesOffset % ALIGNMENT, 0, t.name);
    }
    const end = Math.max(...manifest.tensors.map((t) => ("scalesOffset" in t ? t.scalesOffset + t.scalesBytes : t.offset + t.bytes)));
    assert.equal((await stat(join(engines["tiny-int4"], WEIGHTS_FILE))).size, end);
  });

  it("stores a tied LM head once, as the embedding", async () => {
    const tied = join(root, "tied");
    await cp(models.tiny, tied, { recursive: true });
    const config = JSON.parse(await readFile(join(tied, "config.json"), "utf8"));
    await writeFile(join(tied, "config.json"), JSON.stringify({ ...config, tie_word_embeddings: true }));
    const out = join(root, "engine-tied");
    const { manifest } = await buildEngine({ model: tied, out, quant: "int8" });
    assert.deepEqual(manifest.tensors.map((t) => t.name).slice(-2), ["layers.1.down", "norm"]);
    const { weights } = await readEngine(out);
    assert.equal(weights.lmHead, weights.embed);
  });

  it("is what resolveModel and Engine.load take as a model", async () => {
    const source = await resolveModel(models.decilm);
    const engine = await resolveModel(engines.decilm);
    assert.deepEqual(engine.config, { ...source.config, dtype: "bfloat16" });

    const prompt = "def fib(n):";
    const outputs = [];
    for (const model of [models.tiny, engines.tiny]) {
      const e = await Engine.load({ model, device: "cpu", dtype: model === models.tiny ? "bfloat16" : undefined });
      try {
        outputs.push(await e.complete({ prompt, maxTokens: 8, ignoreEos: true }));
      } finally {
        await e.close();
      }
    }
    assert.equal(outputs[1].tokens.length, 8);
    // The same bytes, so the same greedy continuation.
    assert.deepEqual(outputs[1].tokens, outputs[0].tokens);
    assert.deepEqual(outputs[1].promptTokens, outputs[0].promptTokens);
  });

  it("leaves nothing behind when it fails", async () => {
    const out = join(root, "failed");
    await rejectsOneLine(
      buildEngine({ model: models.tiny, out, quant: "int4" }),
      /^layers\.0\.down: 688 columns are not an even multiple of the int4 group size 128$/,
    );
    let written = 0;
    const stopAtThree = () => {
      if (++written === 3) throw new Error("interrupted");
    };
    await assert.rejects(buildEngine({ model: models.tiny, out, quant: "int8", onProgress: stopAtThree }), /interrupted/);
    assert.equal(written, 3);
    assert.deepEqual((await readdir(root)).filter((n) => n.startsWith("failed")), []);
  });

  it("refuses a used output directory, an engine as source, float32 and a group size without int4", async () => {
    const busy = join(root, "busy");
    await mkdir(busy);
    await writeFile(join(busy, "x"), "");
    await rejectsOneLine(buildEngine({ model: models.tiny, out: busy }), /busy: already exists and is not empty$/);
    const out = join(root, "never");
    await rejectsOneLine(buildEngine({ model: engines.tiny, out }), /engine-tiny: is a decima engine already/);
    await rejectsOneLine(buildEngine({ model: models.tiny, out, dtype: "float32" }), /--dtype float32: an engine stores 16-bit weights/);
    await rejectsOneLine(buildEngine({ model: models.tiny, out, quant: "int8", groupSize: 64 }), /group size is for int4 only/);
  });
});

describe("quantized engines on the CPU backend", () => {
  const tokens = Array.from({ length: 64 }, (_, i) => (i * 131 + 7) % 1024);

  async function logits(engine: string): Promise<Float32Array> {
    const backend = new CpuBackend((await readEngine(engine)).weights, { numBlocks: 4, blockSize: 16 });
    const result = await backend.step(batchOf([{ tokens, blocks: [0, 1, 2, 3] }], "all"));
    return result.logits!;
  }

  /** Per position: relative L2 error of the logits, and whether the top token agrees. */
  function compare(got: Float32Array, want: Float32Array, vocab: number) {
    const errors = [];
    let agree = 0;
    for (let p = 0; p < tokens.length; p++) {
      const [g, w] = [got.subarray(p * vocab, (p + 1) * vocab), want.subarray(p * vocab, (p + 1) * vocab)];
      let [diff, norm] = [0, 0];
      for (let i = 0; i < vocab; i++) {
        diff += (g[i] - w[i]) ** 2;
        norm += w[i] ** 2;
      }
      errors.push(Math.sqrt(diff / norm));
      if (argmax(g) === argmax(w)) agree++;
    }
    return { maxError: Math.max(...errors), meanError: errors.reduce((a, b) => a + b) / errors.length, top1: agree / tokens.length };
  }

  it("int8 stays within 3e-2 relative L2 of the 16-bit engine at every position; int4 within looser bounds", async () => {
    const reference = await logits(engines.tiny);
    const int8 = compare(await logits(engines["tiny-int8"]), reference, 1024);
    const int4 = compare(await logits(engines["tiny-int4"]), reference, 1024);
    const decilm = compare(await logits(engines["decilm-int4"]), await logits(engines.decilm), 1024);
    const show = (r: typeof int8) =>
      `relative L2 max ${r.maxError.toFixed(4)} mean ${r.meanError.toFixed(4)}, top-1 agreement ${(100 * r.top1).toFixed(1)}%`;
    console.log(`int8 (tiny): ${show(int8)}`);
    console.log(`int4 groups of 16 (tiny): ${show(int4)}`);
    console.log(`int4 groups of 128 (decilm-tiny): ${show(decilm)}`);
    assert.ok(int8.maxError < 3e-2, show(int8));
    assert.ok(int8.top1 >= 0.95, show(int8));
    // int4 of these uniform random weights is off by 6.5% per weight (step / sqrt(12) against the spread),
    // and the logits by about twice that: the bounds leave room for seeds, not for a broken quantizer.
    assert.ok(int4.maxError < 0.25 && int4.meanError < 0.15 && int4.top1 >= 0.6, show(int4));
    assert.ok(decilm.maxError < 0.25 && decilm.meanError < 0.2 && decilm.top1 >= 0.5, show(decilm));
  });
});

describe("reading an engine refuses", () => {
  let n = 0;
  /** A copy of the int8 engine, changed by `edit`. */
  async function corrupted(edit: (dir: string, manifest: Record<string, unknown>) => Promise<void> | void): Promise<string> {
    const dir = join(root, `corrupt-${n++}`);
    await cp(engines["tiny-int8"], dir, { recursive: true });
    const manifest = JSON.parse(await readFile(join(dir, ENGINE_FILE), "utf8"));
    await edit(dir, manifest);
    await writeFile(join(dir, ENGINE_FILE), JSON.stringify(manifest));
    return dir;
  }
  const tensors = (m: Record<string, unknown>) => m.tensors as { offset: number; bytes: number }[];

  it("a truncated weights.bin", async () => {
    const dir = await corrupted(async (d) => {
      const { size } = await stat(join(d, WEIGHTS_FILE));
      await truncate(join(d, WEIGHTS_FILE), size - 100);
    });
    await rejectsOneLine(readEngine(dir), /weights\.bin: \d+ bytes, .*engine\.json lays out \d+: the file is truncated$/);
    await rejectsOneLine(resolveModel(dir), /truncated/);
  });

  it("an engine of another version", async () => {
    const dir = await corrupted((_, m) => {
      m.version = 1;
      delete m.tensors; // another version may lay things out any way
    });
    await rejectsOneLine(readEngine(dir), /engine\.json: engine version 1; this decima reads version 2 \(rebuild the engine/);
  });

  it("a tensor offset past the end of weights.bin", async () => {
    const dir = await corrupted((_, m) => {
      tensors(m)[3].offset = 1 << 30;
    });
    await rejectsOneLine(readEngine(dir), /engine\.json: tensor layers\.0\.o: data at \[1073741824, \d+\) runs past the end of .*weights\.bin/);
  });

  it("a tensor out of its place in the layout, or of the wrong size", async () => {
    const moved = await corrupted((_, m) => {
      tensors(m)[1].offset += ALIGNMENT;
    });
    await rejectsOneLine(readEngine(moved), /tensor layers\.0\.inputNorm: data at \[\d+, \d+\): the layout puts it at \d+$/);
    const resized = await corrupted((_, m) => {
      tensors(m)[0].bytes -= 2;
    });
    await rejectsOneLine(readEngine(resized), /tensor embed: data \d+ bytes, its shape needs \d+$/);
  });

  it("a missing field, a missing file, a missing tensor", async () => {
    const noQuant = await corrupted((_, m) => {
      delete m.quant;
    });
    await rejectsOneLine(readEngine(noQuant), /engine\.json: quant: /);
    const noWeights = await corrupted((d) => rm(join(d, WEIGHTS_FILE)));
    await rejectsOneLine(readEngine(noWeights), /weights\.bin: no such file$/);
    const noNorm = await corrupted((_, m) => {
      m.tensors = (m.tensors as { name: string }[]).filter((t) => t.name !== "norm");
    });
    await rejectsOneLine(readEngine(noNorm), /engine\.json: tensor norm is missing$/);
    const badConfig = await corrupted((_, m) => {
      (m.config as Record<string, unknown>).hidden_size = 512;
    });
    await rejectsOneLine(readEngine(badConfig), /tensor embed: shape \[1024,256\], the config needs \[1024,512\]$/);
  });

  it("another dtype than it was built with", async () => {
    const { config } = await resolveModel(engines.tiny);
    await rejectsOneLine(
      loadWeights(engines.tiny, config, "float16"),
      /engine-tiny: the engine was built with bfloat16 weights, float16 was asked for; .*rebuild/,
    );
    assert.equal((await loadWeights(engines.tiny, config, "bfloat16")).dtype, "bfloat16");
  });
});

function argmax(v: Float32Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}
