import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { dequantize } from "../src/engine/cpu/dequantize.js";
import { DecimaError } from "../src/errors.js";
import { parseModelConfig } from "../src/model/config.js";
import { type FloatDType, f16ToF32, f32ToF16, fromFloat32, toFloat32 } from "../src/model/dtype.js";
import { checkQuantization, quantizeHead, quantizeInt4, quantizeInt8, quantizeLayer } from "../src/model/quantize.js";
import { Rng } from "../src/model/random.js";
import type { DenseMatrix, Int4Matrix, Int8Matrix, LayerWeights } from "../src/model/weights.js";

function dense(rows: number, cols: number, values: Float32Array | number[], dtype: FloatDType = "float32"): DenseMatrix {
  return { format: "dense", rows, cols, dtype, data: fromFloat32(Float32Array.from(values), dtype) };
}

/** Values like a trained layer's: mostly small, a few large outliers per row (what makes scales matter). */
function randomMatrix(rows: number, cols: number, seed: number, dtype: FloatDType = "bfloat16"): DenseMatrix {
  const rng = new Rng(seed);
  const values = new Float32Array(rows * cols);
  rng.fillUniform(values, 0.05);
  for (let r = 0; r < rows; r++) values[r * cols + Math.floor(rng.uniform() * cols)] *= 10;
  return dense(rows, cols, values, dtype);
}

function scalesOf(m: Int8Matrix | Int4Matrix): Float32Array {
  return toFloat32(m.scales, m.scaleDtype);
}

function expectOneLine(fn: () => unknown, pattern: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof DecimaError, String(err));
    assert.doesNotMatch(err.message, /\n/);
    assert.match(err.message, pattern);
    return true;
  });
}

describe("quantizeInt8", () => {
  it("keeps every value within half a step of its row's fp16 scale", () => {
    for (const dtype of ["bfloat16", "float16", "float32"] as const) {
      const m = randomMatrix(24, 96, 1, dtype);
      const q = quantizeInt8(m, "w");
      assert.equal(q.scaleDtype, "float16");
      assert.equal(q.data.byteLength, 24 * 96);
      const w = toFloat32(m.data, m.dtype);
      const back = dequantize(q, "w").data;
      const scales = scalesOf(q);
      for (let r = 0; r < 24; r++) {
        let max = 0;
        for (let c = 0; c < 96; c++) max = Math.max(max, Math.abs(w[r * 96 + c]));
        assert.equal(q.scales[2 * r] | (q.scales[2 * r + 1] << 8), f32ToF16(max / 127), `row ${r} scale`);
        for (let c = 0; c < 96; c++) {
          const i = r * 96 + c;
          assert.ok(Math.abs(back[i] - w[i]) <= scales[r] / 2 + 1e-7 * Math.abs(w[i]), `${dtype} [${r}, ${c}]`);
        }
      }
    }
  });

  it("stores q = round(w / scale) per row, as int8 bytes", () => {
    const q = quantizeInt8(dense(2, 4, [127, -64, 0, 1, 2.54, -1.27, 0.5, 0]));
    assert.deepEqual(Array.from(scalesOf(q)), [1, f16ToF32(f32ToF16(2.54 / 127))]);
    assert.deepEqual(Array.from(new Int8Array(q.data.buffer, q.data.byteOffset, 8)), [127, -64, 0, 1, 127, -63, 25, 0]);
  });

  it("round-trips what it stores: quantizing the dequantized matrix gives the same bytes", () => {
    const q = quantizeInt8(randomMatrix(16, 64, 2));
    const again = quantizeInt8(dense(16, 64, dequantize(q, "w").data));
    assert.deepEqual(again.data, q.data);
    assert.deepEqual(again.scales, q.scales);
  });

  it("gives an all-zero row scale 0 and q 0, no NaN", () => {
    const q = quantizeInt8(dense(2, 3, [0, 0, 0, 1, -2, 3]));
    assert.deepEqual(Array.from(scalesOf(q)).slice(0, 1), [0]);
    assert.deepEqual(Array.from(dequantize(q, "w").data).slice(0, 3), [0, 0, 0]);
    assert.ok(dequantize(q, "w").data.every(Number.isFinite));
  });
});

describe("quantizeInt4", () => {
  it("keeps every value within half a step of its group's fp16 scale", () => {
    const [rows, cols, groupSize] = [8, 256, 64];
    const m = randomMatrix(rows, cols, 3);
    const q = quantizeInt4(m, groupSize, "w");
    assert.equal(q.data.byteLength, (rows * cols) / 2);
    assert.equal(q.scales.byteLength, rows * (cols / groupSize) * 2);
    const w = toFloat32(m.data, m.dtype);
    const back = dequantize(q, "w").data;
    const scales = scalesOf(q);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const i = r * cols + c;
        const scale = scales[r * (cols / groupSize) + Math.floor(c / groupSize)];
        assert.ok(Math.abs(back[i] - w[i]) <= scale / 2 + 1e-7 * Math.abs(w[i]), `[${r}, ${c}]`);
      }
    }
  });

  it("packs column 2j in the low nibble and 2j+1 in the high one, as q + 8", () => {
    const q = quantizeInt4(dense(1, 8, [7, -7, 1, 0, 14, 2, -6, -14]), 4);
    assert.deepEqual(Array.from(scalesOf(q)), [1, 2]);
    // q: [7, -7, 1, 0] and [7, 1, -3, -7]; nibbles q + 8.
    assert.deepEqual(Array.from(q.data), [15 | (1 << 4), 9 | (8 << 4), 15 | (9 << 4), 5 | (1 << 4)]);
  });

  it("round-trips what it stores", () => {
    const q = quantizeInt4(randomMatrix(8, 128, 4), 32);
    const again = quantizeInt4(dense(8, 128, dequantize(q, "w").data), 32);
    assert.deepEqual(again.data, q.data);
    assert.deepEqual(again.scales, q.scales);
  });

  it("gives an all-zero group scale 0 and q 0, beside a non-zero one", () => {
    const q = quantizeInt4(dense(1, 4, [0, 0, 0.5, -0.25]), 2);
    assert.deepEqual(Array.from(scalesOf(q)), [0, f16ToF32(f32ToF16(0.5 / 7))]);
    assert.equal(q.data[0], 8 | (8 << 4));
    assert.deepEqual(Array.from(dequantize(q, "w").data).slice(0, 2), [0, 0]);
  });

  it("refuses group sizes the columns do not divide into, naming the matrix and sizes", () => {
    const m = randomMatrix(2, 48, 5);
    expectOneLine(() => quantizeInt4(m, 32, "layers.1.down"), /^layers\.1\.down: 48 columns are not an even multiple of the int4 group size 32$/);
    expectOneLine(() => quantizeInt4(m, 0, "w"), /group size 0 must be a positive integer/);
    expectOneLine(() => quantizeInt4(m, 1.5, "w"), /group size 1.5 must be a positive integer/);
    expectOneLine(() => quantizeInt4(randomMatrix(2, 3, 6), 1, "odd"), /odd: 3 columns/);
    expectOneLine(() => quantizeInt4(m), /matrix: 48 columns .* group size 128/);
  });
});

describe("which tensors are quantized", () => {
  const config = parseModelConfig({
    architectures: ["LlamaForCausalLM"],
    vocab_size: 64,
    hidden_size: 32,
    intermediate_size: 48,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    num_key_value_heads: 2,
  });

  it("quantizes a layer's four linear weights and keeps its norms", () => {
    const norm = { dtype: "bfloat16" as const, length: 32, data: new Uint8Array(64) };
    const layer: LayerWeights = {
      inputNorm: norm,
      qkv: randomMatrix(64, 32, 7),
      o: randomMatrix(32, 32, 8),
      postNorm: norm,
      gateUp: randomMatrix(96, 32, 9),
      down: randomMatrix(32, 48, 10),
    };
    const q8 = quantizeLayer(layer, { kind: "int8" }, "layers.0");
    assert.deepEqual([q8.qkv, q8.o, q8.gateUp, q8.down].map((w) => w.format), ["int8", "int8", "int8", "int8"]);
    assert.equal(q8.inputNorm, norm);
    assert.equal(q8.postNorm, norm);
    const q4 = quantizeLayer(layer, { kind: "int4", groupSize: 16 }, "layers.0");
    assert.deepEqual([q4.qkv, q4.o, q4.gateUp, q4.down].map((w) => w.format), ["int4", "int4", "int4", "int4"]);
    assert.equal(quantizeLayer(layer, { kind: "none" }, "layers.0"), layer);
    expectOneLine(() => quantizeLayer(layer, { kind: "int4", groupSize: 32 }, "layers.0"), /^layers\.0\.down: 48 columns/);
  });

  it("quantizes the LM head to int8 per channel whatever the layers' kind, and leaves it alone unquantized", () => {
    const head = randomMatrix(40, 32, 11);
    for (const quant of [{ kind: "int8" as const }, { kind: "int4" as const, groupSize: 16 }]) {
      const q = quantizeHead(head, quant);
      assert.equal(q.format, "int8");
      assert.deepEqual(q, quantizeInt8(head, "lmHead"));
    }
    assert.equal(quantizeHead(head, { kind: "none" }), head);
    expectOneLine(() => quantizeHead(quantizeInt8(head), { kind: "int8" }), /^lmHead: is already int8/);
  });

  it("checks a quantization against the model's shapes before any weight is read", () => {
    checkQuantization(config, { kind: "int4", groupSize: 16 });
    checkQuantization(config, { kind: "int8" });
    expectOneLine(() => checkQuantization(config, { kind: "int4", groupSize: 32 }), /^layers\.0\.down: 48 columns .* group size 32$/);
    expectOneLine(() => checkQuantization(config, { kind: "int4" }), /^layers\.0\.qkv: 32 columns .* group size 128$/);
    expectOneLine(() => checkQuantization(config, { kind: "int8", groupSize: 16 }), /group size is for int4 only/);
  });
});
