import assert from "node:assert/strict";
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DecimaError } from "../src/errors.js";
import { PRESETS, createModel, presetConfigJson } from "../src/model/create.js";
import { parseModelConfig } from "../src/model/config.js";
import type { FloatDType } from "../src/model/dtype.js";
import { loadWeights, resolveModel } from "../src/model/model-dir.js";
import { float32Source, packWeights } from "../src/model/pack.js";
import { randomDraws, randomWeights } from "../src/model/random.js";
import { SafetensorsFile } from "../src/model/safetensors.js";
import { type ModelWeights, expectedShapes, tensorNames } from "../src/model/weights.js";

let root: string;
before(async () => {
  root = await mkdtemp(join(os.tmpdir(), "decima-create-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** The weights packed straight from randomWeights: what a created model must load as. */
async function expectedWeights(weights: ModelWeights, seed: number, dtype: FloatDType): Promise<ModelWeights> {
  const { config } = weights;
  return packWeights(float32Source(randomWeights(config, seed), expectedShapes(config)), config, dtype);
}

function assertSameWeights(actual: ModelWeights, expected: ModelWeights): void {
  const bytes = (w: ModelWeights) => [
    w.embed.data,
    w.norm.data,
    w.lmHead.data,
    ...w.layers.flatMap((l) => [l.inputNorm.data, l.qkv.data, l.o.data, l.postNorm.data, l.gateUp.data, l.down.data]),
  ];
  const [a, e] = [bytes(actual), bytes(expected)];
  assert.equal(a.length, e.length);
  a.forEach((data, i) => assert.ok(Buffer.from(data).equals(Buffer.from(e[i])), `tensor ${i} differs`));
}

test("tiny: a DeciCoder-format directory that reloads to the same fp32 weights", async () => {
  const out = join(root, "tiny-f32");
  const created = await createModel({ preset: "tiny", out, seed: 5, dtype: "float32" });
  assert.equal(created.dir, out);
  assert.deepEqual((await readdir(out)).sort(), [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]);

  const raw = JSON.parse(await readFile(join(out, "config.json"), "utf8"));
  assert.deepEqual(raw.architectures, ["DeciCoderForCausalLM"]);
  assert.equal(raw.model_type, "llama");
  assert.equal(raw.torch_dtype, "float32");
  assert.equal(raw.naive_attention_prefill, false);
  assert.equal(raw.pretraining_tp, 1);
  assert.equal(raw.tie_word_embeddings, false);
  assert.equal(raw.num_key_value_heads, 2);

  const { config, source } = await resolveModel(out);
  assert.equal(source, out);
  assert.equal(config.vocabSize, 1024);
  assert.equal(config.hiddenSize, 256);
  assert.deepEqual(config.layers, [
    { numHeads: 4, numKvHeads: 2, headDim: 64, intermediateSize: 688 },
    { numHeads: 4, numKvHeads: 2, headDim: 64, intermediateSize: 688 },
  ]);
  assert.equal(config.bosTokenId, 0);
  assert.deepEqual(config.eosTokenIds, [0]);
  assert.equal(config.maxPositionEmbeddings, 2048);
  assert.equal(config.rmsNormEps, 1e-5);
  assert.equal(config.rope.theta, 10000);
  assert.equal(config.dtype, "float32");

  const weights = await loadWeights(out, config);
  assert.equal(weights.dtype, "float32");
  assertSameWeights(weights, await expectedWeights(weights, 5, "float32"));

  const tokenizer = JSON.parse(await readFile(join(out, "tokenizer.json"), "utf8"));
  assert.equal(tokenizer.added_tokens[0].content, "<|endoftext|>");
  assert.equal(tokenizer.added_tokens[0].id, 0);
  assert.ok(Object.keys(tokenizer.model.vocab).length <= config.vocabSize, "the tokenizer fits in the model's vocabulary");

  const file = await SafetensorsFile.open(join(out, "model.safetensors"));
  assert.deepEqual(file.metadata, { format: "pt" });
  await file.close();
});

test("bf16 by default: the same draws, rounded", async () => {
  const out = join(root, "tiny-bf16");
  await createModel({ preset: "tiny", out, seed: 5 });
  const { config } = await resolveModel(out);
  assert.equal(config.dtype, "bfloat16");
  const weights = await loadWeights(out, config);
  assert.equal(weights.dtype, "bfloat16");
  assertSameWeights(weights, await expectedWeights(weights, 5, "bfloat16"));
  // Widened to fp32, the bf16 model holds the fp32 model's values to bf16 precision.
  const f32 = await loadWeights(join(root, "tiny-f32"), config, "float32");
  const wide = await loadWeights(out, config, "float32");
  const [a, b] = [new Float32Array(f32.embed.data.buffer), new Float32Array(wide.embed.data.buffer)];
  for (let i = 0; i < a.length; i += 997) assert.ok(Math.abs(a[i] - b[i]) <= Math.abs(a[i]) / 256, `embed[${i}]`);
});

test("sharded: a valid index over several files, and the same weights", async () => {
  const out = join(root, "tiny-sharded");
  await createModel({ preset: "tiny", out, seed: 5, dtype: "float16", shardBytes: 1_000_000 });
  const files = await readdir(out);
  assert.ok(!files.includes("model.safetensors"));
  const index = JSON.parse(await readFile(join(out, "model.safetensors.index.json"), "utf8"));
  const shards = [...new Set(Object.values(index.weight_map) as string[])].sort();
  assert.ok(shards.length >= 3, `${shards.length} shards`);
  assert.deepEqual(shards, shards.map((_, i) => `model-${String(i + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`));
  assert.deepEqual(files.filter((f) => f.endsWith(".safetensors")).sort(), shards);
  const { config } = await resolveModel(out);
  assert.deepEqual(Object.keys(index.weight_map).sort(), [...expectedShapes(config).keys()].sort());

  let total = 0;
  for (const shard of shards) {
    const file = await SafetensorsFile.open(join(out, shard));
    const bytes = [...file.tensors.values()].reduce((n, t) => n + t.byteLength, 0);
    // A shard is over the limit only when a single tensor is (the 1024 x 256 embedding is 512 KB).
    assert.ok(bytes <= 1_000_000 || file.tensors.size === 1, `${shard} holds ${bytes} bytes`);
    for (const name of file.tensors.keys()) assert.equal(index.weight_map[name], shard);
    total += bytes;
    await file.close();
  }
  assert.equal(index.metadata.total_size, total);

  const weights = await loadWeights(out, config);
  assertSameWeights(weights, await expectedWeights(weights, 5, "float16"));
});

test("decilm-tiny: DeciLM's config with KV heads per layer", async () => {
  const out = join(root, "decilm");
  await createModel({ preset: "decilm-tiny", out });
  const raw = JSON.parse(await readFile(join(out, "config.json"), "utf8"));
  assert.deepEqual(raw.architectures, ["DeciLMForCausalLM"]);
  assert.equal(raw.model_type, "deci");
  assert.deepEqual(raw.num_key_value_heads_per_layer, [1, 2, 4]);
  assert.equal(raw.num_key_value_heads, undefined);
  const { config } = await resolveModel(out);
  assert.deepEqual(config.layers.map((l) => l.numKvHeads), [1, 2, 4]);
  assert.deepEqual(config.layers.map((l) => l.intermediateSize), [512, 512, 512]);
  const weights = await loadWeights(out, config);
  assert.deepEqual(weights.layers.map((l) => l.qkv.rows), [(4 + 2) * 64, (4 + 4) * 64, (4 + 8) * 64]);
  const file = await SafetensorsFile.open(join(out, "model.safetensors"));
  assert.deepEqual(file.tensors.get(tensorNames.layer(2).k)!.shape, [256, 256]);
  await file.close();
  assertSameWeights(weights, await expectedWeights(weights, 0, "bfloat16"));
});

test("random weights drawn in pieces are randomWeights' values; drawing out of order is refused", () => {
  const config = parseModelConfig(presetConfigJson(PRESETS["decilm-tiny"], "float32"));
  const whole = randomWeights(config, 9);
  for (const t of randomDraws(config, 9)) {
    const values = new Float32Array(whole.get(t.name)!.length);
    for (let at = 0; at < values.length; at += 1000) t.draw(values.subarray(at, Math.min(at + 1000, values.length)));
    assert.deepEqual(values, whole.get(t.name), t.name);
  }
  const draws = randomDraws(config, 9);
  assert.throws(() => draws[1].draw(new Float32Array(1)), /drawn out of order/);
  assert.throws(() => draws[0].draw(new Float32Array(1024 * 256 + 1)), /drawn out of order/);
});

test("decicoder-1b's config is DeciCoder-1b's", () => {
  const raw = presetConfigJson(PRESETS["decicoder-1b"], "bfloat16");
  const config = parseModelConfig(raw);
  assert.equal(config.vocabSize, 49152);
  assert.equal(config.layers.length, 20);
  assert.deepEqual(config.layers[0], { numHeads: 32, numKvHeads: 4, headDim: 64, intermediateSize: 5888 });
  const params = [...expectedShapes(config).values()].reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0);
  assert.equal(params, 1_113_671_680);
  assert.deepEqual(Object.keys(raw), Object.keys(raw).sort(), "keys sorted, as transformers writes them");
});

test("bad options and a non-empty output directory are refused, leaving nothing behind", async () => {
  const rejects = (promise: Promise<unknown>, text: string) =>
    assert.rejects(promise, (err: unknown) => {
      assert.ok(err instanceof DecimaError);
      assert.equal(err.kind, "input");
      assert.ok(err.message.includes(text), err.message);
      return true;
    });
  const busy = join(root, "busy");
  await mkdir(busy);
  await writeFile(join(busy, "notes.txt"), "mine");
  await rejects(createModel({ preset: "tiny", out: busy }), `${busy}: already exists and is not empty`);
  await rejects(createModel({ preset: "huge" as "tiny", out: join(root, "x") }), "--preset huge: unknown preset (tiny, decilm-tiny, decicoder-1b)");
  await rejects(createModel({ preset: "toString" as "tiny", out: join(root, "x") }), "unknown preset");
  await rejects(createModel({ preset: "tiny", out: join(root, "x"), seed: -1 }), "--seed -1: must be an integer");
  await rejects(createModel({ preset: "tiny", out: join(root, "x"), dtype: "int8" as FloatDType }), "--dtype int8");
  assert.deepEqual(await readdir(busy), ["notes.txt"]);
  const empty = join(root, "empty");
  await mkdir(empty);
  await createModel({ preset: "tiny", out: empty, shardBytes: 100_000 });
  assert.ok((await readdir(empty)).includes("model.safetensors.index.json"), "an empty directory is filled");
  assert.deepEqual((await readdir(root)).filter((f) => f.includes("incomplete")), []);
});
