import assert from "node:assert/strict";
import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { DecimaError } from "../src/errors.js";
import { buildEngine } from "../src/model/build-engine.js";
import { Checkpoint, SAFETENSORS_FILE } from "../src/model/checkpoint.js";
import { parseModelConfig } from "../src/model/config.js";
import { createModel } from "../src/model/create.js";
import { f32ToF16 } from "../src/model/dtype.js";
import { readEngine } from "../src/model/engine-file.js";
import { gptqBase, readGptqLinear } from "../src/model/gptq.js";
import { loadWeights } from "../src/model/model-dir.js";
import { quantizeInt4, quantizeLayer } from "../src/model/quantize.js";
import { type TensorToWrite, writeSafetensors } from "../src/model/safetensors.js";
import { type Int4Matrix, expectedShapes, linearNames } from "../src/model/weights.js";

const GROUP = 16; // the tiny preset's 688-wide MLP takes groups of 16

let root: string;
let dense: string;

async function rejectsOneLine(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(err instanceof DecimaError, `not a DecimaError: ${String(err)}`);
    assert.doesNotMatch(err.message, /\n/);
    assert.match(err.message, pattern);
    return true;
  });
}

/**
 * The tensors AutoGPTQ writes for an int4 matrix (its `pack`: input 8k + j of output r in bits 4j of
 * qweight[k][r]; zero points minus one, eight outputs to a word; scales by group, then output).
 */
function asGptq(base: string, m: Int4Matrix, zeroWord = 0x77777777): TensorToWrite[] {
  const { rows, cols } = m;
  const groups = cols / m.groupSize;
  const qweight = new Int32Array((cols / 8) * rows);
  const bytes = new DataView(m.data.buffer, m.data.byteOffset, m.data.byteLength);
  for (let k = 0; k < cols / 8; k++) for (let r = 0; r < rows; r++) qweight[k * rows + r] = bytes.getInt32(r * (cols / 2) + 4 * k, true);
  const ours = new Uint16Array(m.scales.buffer, m.scales.byteOffset, rows * groups);
  const scales = new Uint16Array(groups * rows);
  for (let g = 0; g < groups; g++) for (let r = 0; r < rows; r++) scales[g * rows + r] = ours[r * groups + g];
  const bytesOf = (a: Int32Array | Uint16Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  return [
    { name: `${base}.qweight`, dtype: "I32", shape: [cols / 8, rows], data: bytesOf(qweight) },
    { name: `${base}.qzeros`, dtype: "I32", shape: [groups, rows / 8], data: bytesOf(new Int32Array(groups * (rows / 8)).fill(zeroWord)) },
    { name: `${base}.scales`, dtype: "F16", shape: [groups, rows], data: bytesOf(scales) },
    { name: `${base}.g_idx`, dtype: "I32", shape: [cols], data: bytesOf(Int32Array.from({ length: cols }, (_, c) => Math.floor(c / m.groupSize))) },
  ];
}

/**
 * The tiny model as a GPTQ checkpoint: its linear weights quantized by decima's own int4 (so the expected
 * result is known exactly) and written in GPTQ's layout. `edit` may change the config or a layer's tensors.
 */
async function gptqModel(name: string, edit: { config?: (q: Record<string, unknown>) => void; zeroWord?: number; gIdx?: boolean } = {}) {
  const dir = join(root, name);
  await cp(dense, dir, { recursive: true });
  const raw = JSON.parse(await readFile(join(dense, "config.json"), "utf8"));
  const config = parseModelConfig(raw);
  const quantization: Record<string, unknown> = { quant_method: "gptq", bits: 4, group_size: GROUP, desc_act: false, sym: true };
  edit.config?.(quantization);
  await writeFile(join(dir, "config.json"), JSON.stringify({ ...raw, quantization_config: quantization }));
  const checkpoint = await Checkpoint.open(dense);
  const linear = linearNames(config);
  const tensors: TensorToWrite[] = [];
  try {
    for (const [tensor, shape] of expectedShapes(config)) {
      const t = await checkpoint.read(tensor);
      if (!linear.has(tensor)) {
        tensors.push({ name: tensor, dtype: "F16", shape, data: t.data });
        continue;
      }
      const m = quantizeInt4({ format: "dense", rows: shape[0], cols: shape[1], dtype: t.dtype, data: t.data }, GROUP, tensor);
      const parts = asGptq(gptqBase(tensor), m, tensor.includes("layers.1.mlp.up") ? edit.zeroWord : undefined);
      if (edit.gIdx && tensor.includes("layers.0.self_attn.o_proj")) {
        const g = parts[3].data as Uint8Array;
        new Int32Array(g.buffer, g.byteOffset, g.byteLength / 4).reverse();
      }
      tensors.push(...parts);
    }
  } finally {
    await checkpoint.close();
  }
  await rm(join(dir, SAFETENSORS_FILE));
  await writeSafetensors(join(dir, SAFETENSORS_FILE), tensors);
  return dir;
}

before(async () => {
  root = await mkdtemp(join(os.tmpdir(), "decima-gptq-"));
  dense = join(root, "tiny");
  await createModel({ preset: "tiny", out: dense, dtype: "float16" });
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

describe("GPTQ checkpoints", () => {
  it("unpacks a qweight word as AutoGPTQ packs it: input j of eight in bits 4j, stored as q + 8", async () => {
    // One output row of 8 inputs (nibbles 1..8: q = -7..0), one group with scale 0.5; the other rows zero.
    const words: Record<string, Int32Array> = {
      "w.qweight": Int32Array.from([0x87654321, 0, 0, 0, 0, 0, 0, 0]),
      "w.qzeros": Int32Array.from([0x77777777]),
    };
    const scales = new Uint16Array(8).fill(f32ToF16(0.5));
    const source = {
      read: async () => ({ dtype: "float16" as const, shape: [1, 8], data: new Uint8Array(scales.buffer) }),
      readInt32: async (name: string) => words[name],
      has: (name: string) => name in words,
    };
    const m = await readGptqLinear(source, "w.weight", 8, 8, 8);
    assert.deepEqual(Array.from(m.data.subarray(0, 4)), [0x21, 0x43, 0x65, 0x87]);
    assert.deepEqual(Array.from(m.data.subarray(4)), new Array(28).fill(0));
    assert.deepEqual(Array.from(new Uint16Array(m.scales.buffer)), Array.from(scales));
  });

  it("loads as decima's int4 of the same values, and builds an engine equal to quantizing the 16-bit model", async () => {
    const dir = await gptqModel("gptq");
    const config = parseModelConfig(JSON.parse(await readFile(join(dir, "config.json"), "utf8")));
    assert.deepEqual(config.gptq, { groupSize: GROUP });
    const loaded = await loadWeights(dir, config);
    const reference = await loadWeights(dense, parseModelConfig(JSON.parse(await readFile(join(dense, "config.json"), "utf8"))));
    loaded.layers.forEach((layer, i) => {
      const want = quantizeLayer(reference.layers[i], { kind: "int4", groupSize: GROUP }, `layers.${i}`);
      for (const part of ["qkv", "o", "gateUp", "down"] as const) assert.deepEqual(layer[part], want[part], `layers.${i}.${part}`);
    });
    assert.deepEqual(loaded.lmHead, reference.lmHead);

    const fromGptq = await buildEngine({ model: dir, out: join(root, "engine-gptq") });
    assert.deepEqual(fromGptq.manifest.quant, { kind: "int4", groupSize: GROUP });
    await buildEngine({ model: dense, out: join(root, "engine-dense"), quant: "int4", groupSize: GROUP });
    const [a, b] = [await readEngine(join(root, "engine-gptq")), await readEngine(join(root, "engine-dense"))];
    assert.deepEqual(a.weights.layers, b.weights.layers);
    assert.deepEqual(a.weights.lmHead, b.weights.lmHead);
    await rejectsOneLine(
      buildEngine({ model: dir, out: join(root, "engine-int8"), quant: "int8" }),
      /a GPTQ checkpoint is int4 in groups of 16 already: build it with --quant int4 --group-size 16/,
    );
  });

  it("refuses what is not decima's int4: zero points, act-order, other bits, other methods", async () => {
    const load = async (dir: string) => loadWeights(dir, parseModelConfig(JSON.parse(await readFile(join(dir, "config.json"), "utf8"))));
    await rejectsOneLine(load(await gptqModel("zeros", { zeroWord: 0x77777778 })), /layers\.1\.mlp\.up_proj\.qzeros: zero points other than 8/);
    await rejectsOneLine(load(await gptqModel("act-order", { gIdx: true })), /layers\.0\.self_attn\.o_proj\.g_idx: inputs out of group order/);
    for (const [change, pattern] of [
      [(q: Record<string, unknown>) => (q.bits = 8), /GPTQ 8 bits is not supported/],
      [(q: Record<string, unknown>) => (q.sym = false), /GPTQ with zero points \(sym: false\) is not supported/],
      [(q: Record<string, unknown>) => (q.desc_act = true), /GPTQ with act-order \(desc_act: true\) is not supported/],
      [(q: Record<string, unknown>) => (q.group_size = -1), /GPTQ group_size -1 is not supported/],
      [(q: Record<string, unknown>) => (q.quant_method = "awq"), /a pre-quantized checkpoint \(quantization_config, method "awq"\) is not supported/],
    ] as const) {
      const raw = JSON.parse(await readFile(join(dense, "config.json"), "utf8"));
      const q: Record<string, unknown> = { quant_method: "gptq", bits: 4, group_size: GROUP, sym: true };
      change(q);
      assert.throws(() => parseModelConfig({ ...raw, quantization_config: q }), pattern);
    }
  });
});
