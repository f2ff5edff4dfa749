import assert from "node:assert/strict";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { DecimaError } from "../src/errors.js";
import { Checkpoint, checkTensorShapes } from "../src/model/checkpoint.js";
import { parseModelConfig } from "../src/model/config.js";
import { type FloatDType, fromFloat32, toFloat32 } from "../src/model/dtype.js";
import { loadWeights } from "../src/model/model-dir.js";
import { float32Source, packWeights } from "../src/model/pack.js";
import { randomWeights } from "../src/model/random.js";
import { type TensorToWrite, safetensorsDType, writeSafetensors } from "../src/model/safetensors.js";
import { expectedShapes, tensorNames } from "../src/model/weights.js";

// One layer, 2 query heads and 1 KV head of size 4.
const config = parseModelConfig({
  architectures: ["LlamaForCausalLM"],
  vocab_size: 16,
  hidden_size: 8,
  intermediate_size: 12,
  num_hidden_layers: 1,
  num_attention_heads: 2,
  num_key_value_heads: 1,
});
const shapes = expectedShapes(config);
const weights = randomWeights(config, 7);

let root: string;
before(async () => {
  root = await mkdtemp(join(os.tmpdir(), "decima-checkpoint-"));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

let dirs = 0;
async function modelDir(): Promise<string> {
  const dir = join(root, `m${dirs++}`);
  await mkdir(dir);
  return dir;
}

function tensors(dtype: FloatDType, names = [...shapes.keys()]): TensorToWrite[] {
  return names.map((name) => ({
    name,
    dtype: safetensorsDType(dtype),
    shape: shapes.get(name)!,
    data: fromFloat32(weights.get(name)!, dtype),
  }));
}

/** Writes the tensors as two shards plus an index; returns the index's weight map. */
async function writeSharded(dir: string, list: TensorToWrite[]): Promise<Record<string, string>> {
  const half = Math.ceil(list.length / 2);
  const shards = [list.slice(0, half), list.slice(half)];
  const weightMap: Record<string, string> = {};
  for (const [i, shard] of shards.entries()) {
    const file = `model-0000${i + 1}-of-00002.safetensors`;
    await writeSafetensors(join(dir, file), shard);
    for (const t of shard) weightMap[t.name] = file;
  }
  await writeIndex(dir, weightMap);
  return weightMap;
}

async function writeIndex(dir: string, weightMap: Record<string, string>): Promise<void> {
  await writeFile(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }));
}

async function rejectsWith(promise: Promise<unknown> | (() => void), ...parts: string[]): Promise<void> {
  const check = (err: unknown) => {
    assert.ok(err instanceof DecimaError, `not a DecimaError: ${err}`);
    assert.equal(err.kind, "checkpoint");
    assert.ok(!err.message.includes("\n"), `not one line: ${err.message}`);
    for (const p of parts) assert.ok(err.message.includes(p), `"${err.message}" lacks "${p}"`);
    return true;
  };
  if (typeof promise === "function") assert.throws(promise, check);
  else await assert.rejects(promise, check);
}

/** Open file descriptors of this process (Linux), to see that handles are closed. */
async function openFds(): Promise<number> {
  return (await readdir("/proc/self/fd")).length;
}

for (const dtype of ["float32", "float16", "bfloat16"] as const) {
  test(`reads a ${dtype} model.safetensors as a TensorSource`, async () => {
    const dir = await modelDir();
    await writeSafetensors(join(dir, "model.safetensors"), tensors(dtype));
    const fds = await openFds();
    const checkpoint = await Checkpoint.open(dir);
    checkTensorShapes(checkpoint, config);
    assert.equal(checkpoint.dtype, dtype);
    const q = await checkpoint.read(tensorNames.layer(0).q);
    assert.equal(q.dtype, dtype);
    assert.deepEqual(q.shape, [8, 8]);
    const expected = toFloat32(fromFloat32(weights.get(tensorNames.layer(0).q)!, dtype), dtype);
    assert.deepEqual(toFloat32(q.data, dtype), expected);
    await checkpoint.close();
    assert.equal(await openFds(), fds);
  });
}

test("reads a sharded checkpoint, ignoring extra tensors, and loads the same weights as the tensors themselves", async () => {
  const dir = await modelDir();
  const inv_freq: TensorToWrite = { name: "model.layers.0.self_attn.rotary_emb.inv_freq", dtype: "F32", shape: [2], data: fromFloat32(new Float32Array([1, 0.01]), "float32") };
  await writeSharded(dir, [...tensors("bfloat16"), inv_freq]);
  const fds = await openFds();
  const loaded = await loadWeights(dir, config);
  assert.equal(await openFds(), fds, "shards are closed after loading");
  const reference = await packWeights(float32Source(weights, shapes), config, "bfloat16");
  assert.equal(loaded.dtype, "bfloat16");
  assert.deepEqual(loaded.layers[0].qkv, reference.layers[0].qkv);
  assert.deepEqual(loaded.embed, reference.embed);
  assert.deepEqual(loaded.lmHead, reference.lmHead);
  assert.deepEqual(loaded.norm, reference.norm);
  // The checkpoint's own type is used when neither the caller nor the config names one; a caller's wins.
  assert.equal((await loadWeights(dir, config, "float32")).dtype, "float32");
});

test("a missing shard names the index and the shard, and closes the shards already open", async () => {
  const dir = await modelDir();
  await writeSharded(dir, tensors("float16"));
  await rm(join(dir, "model-00002-of-00002.safetensors"));
  const fds = await openFds();
  await rejectsWith(Checkpoint.open(dir), join(dir, "model.safetensors.index.json"), "shard model-00002-of-00002.safetensors", "is missing");
  assert.equal(await openFds(), fds);
});

test("an index that maps a tensor to a shard without it is refused", async () => {
  const dir = await modelDir();
  const weightMap = await writeSharded(dir, tensors("float16"));
  const other = weightMap[tensorNames.embed].startsWith("model-00001") ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
  weightMap[tensorNames.embed] = other;
  await writeIndex(dir, weightMap);
  await rejectsWith(Checkpoint.open(dir), `tensor model.embed_tokens.weight is mapped to ${other}, which does not hold it`);
});

test("an index that is not JSON, or has no weight_map, names the index", async () => {
  const dir = await modelDir();
  const index = join(dir, "model.safetensors.index.json");
  await writeFile(index, "{ not json");
  await rejectsWith(Checkpoint.open(dir), `${index}: not valid JSON`);
  await writeFile(index, JSON.stringify({ metadata: {} }));
  await rejectsWith(Checkpoint.open(dir), `${index}: weight_map:`);
});

test("pytorch_model.bin alone is refused with a hint to convert", async () => {
  const dir = await modelDir();
  await writeFile(join(dir, "pytorch_model.bin"), "not really");
  await writeFile(join(dir, "config.json"), "{}");
  await rejectsWith(Checkpoint.open(dir), dir, "pytorch_model.bin", "convert the checkpoint to safetensors");
});

test("a directory without weights says so", async () => {
  const dir = await modelDir();
  await rejectsWith(Checkpoint.open(dir), `${dir}: no weights (model.safetensors or model.safetensors.index.json)`);
  await rejectsWith(Checkpoint.open(join(dir, "absent")), "absent: cannot read the model directory");
});

test("a missing tensor fails the shape check before any weight is read", async () => {
  const dir = await modelDir();
  const file = join(dir, "model.safetensors");
  await writeSafetensors(file, tensors("float16").filter((t) => t.name !== tensorNames.layer(0).down));
  const checkpoint = await Checkpoint.open(dir);
  await rejectsWith(() => checkTensorShapes(checkpoint, config), `${file}: tensor model.layers.0.mlp.down_proj.weight is missing`);
  await checkpoint.close();
  await rejectsWith(loadWeights(dir, config), "tensor model.layers.0.mlp.down_proj.weight is missing");
});

test("a tensor of the wrong shape, or not a float, names the file and the tensor", async () => {
  const dir = await modelDir();
  const file = join(dir, "model.safetensors");
  const list = tensors("float16");
  const k = list.find((t) => t.name === tensorNames.layer(0).k)!;
  k.shape = [2, 16];
  await writeSafetensors(file, list);
  await rejectsWith(loadWeights(dir, config), `${file}: tensor model.layers.0.self_attn.k_proj.weight has shape [2, 16], the config needs [4, 8]`);

  k.shape = [4, 8];
  k.dtype = "I8";
  k.data = new Uint8Array(32);
  await rm(file);
  await writeSafetensors(file, list);
  await rejectsWith(loadWeights(dir, config), `${file}: tensor model.layers.0.self_attn.k_proj.weight is I8, not a float type`);
});

test("a corrupt model.safetensors is reported through the checkpoint", async () => {
  const dir = await modelDir();
  const file = join(dir, "model.safetensors");
  await writeFile(file, Buffer.from([200, 0, 0, 0, 0, 0, 0, 0, 123]));
  await rejectsWith(Checkpoint.open(dir), `${file}: header length 200 runs past the end of the file (9 bytes)`);
});
