import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { type SeqRows, attention } from "../src/engine/cpu/attention.js";
import { dequantize } from "../src/engine/cpu/dequantize.js";
import { KvCache } from "../src/engine/cpu/kv-cache.js";
import { argmax, logSoftmax, matMul, rmsNorm, silu, softmax, swiGlu } from "../src/engine/cpu/ops.js";
import { Rope, ropeInvFreq } from "../src/engine/cpu/rope.js";
import { DecimaError } from "../src/errors.js";
import type { LayerSpec } from "../src/model/config.js";
import { fromFloat32 } from "../src/model/dtype.js";
import { Rng } from "../src/model/random.js";

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number): void {
  assert.equal(actual.length, expected.length);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(Math.abs(actual[i] - expected[i]) <= tol, `[${i}]: ${actual[i]} vs ${expected[i]} (tol ${tol})`);
  }
}

function random(n: number, rng: Rng): Float32Array {
  const out = new Float32Array(n);
  rng.fillUniform(out, 1);
  return out;
}

describe("primitive ops", () => {
  it("matMul computes W x for each row of a batch", () => {
    const w = { rows: 3, cols: 2, data: new Float32Array([1, 2, 3, 4, 5, 6]) };
    assert.deepEqual(matMul(new Float32Array([1, 1, 0, 2]), 2, w), new Float32Array([3, 7, 11, 4, 8, 12]));
  });

  it("rmsNorm scales each row by 1/rms and the weight", () => {
    const x = new Float32Array([3, 4, 1, 1]);
    const out = new Float32Array(4);
    rmsNorm(out, x, 2, new Float32Array([1, 2]), 0);
    const r = Math.sqrt(12.5);
    assertClose(out, [3 / r, 8 / r, 1, 2], 1e-6);
  });

  it("silu and swiGlu", () => {
    assert.equal(silu(0), 0);
    assert.ok(Math.abs(silu(1) - 1 / (1 + Math.exp(-1))) < 1e-12);
    const gate = new Float32Array([1, -2]);
    swiGlu(gate, new Float32Array([3, 0.5]));
    assertClose(gate, [3 * silu(1), 0.5 * silu(-2)], 1e-6);
  });

  it("softmax and logSoftmax subtract the max (no overflow at large logits)", () => {
    const p = new Float32Array([1000, 1001, 1002]);
    softmax(p);
    const z = 1 + Math.E + Math.E ** 2;
    assertClose(p, [1 / z, Math.E / z, Math.E ** 2 / z], 1e-6);
    const lp = new Float32Array(3);
    logSoftmax(lp, new Float32Array([1000, 1001, 1002]));
    assertClose(lp, [-Math.log(z), 1 - Math.log(z), 2 - Math.log(z)], 1e-5);
  });

  it("softmax over a prefix leaves the rest alone", () => {
    const x = new Float32Array([0, 0, 7]);
    softmax(x, 2);
    assert.deepEqual(x, new Float32Array([0.5, 0.5, 7]));
  });

  it("argmax: the lowest index wins ties", () => {
    assert.equal(argmax(new Float32Array([1, 5, 2, 5])), 1);
    assert.equal(argmax(new Float32Array([-3, -3])), 0);
    assert.equal(argmax(new Float32Array([1, 2, 9]), 2), 1);
  });
});

describe("RoPE", () => {
  it("inv_freq is 1 / theta^(2i/d) rounded to fp32", () => {
    assert.deepEqual(ropeInvFreq(8, 10000), new Float32Array([1, 0.1, 0.01, 0.001]));
  });

  it("pairs dimension i with i + d/2 (rotate_half), over every head", () => {
    const rope = new Rope(4, { theta: 100, linearFactor: 1 });
    const x = new Float32Array([1, 0, 0, 0, 0, 1, 0, 0]);
    rope.apply(x, 0, 2, 3);
    const a0 = 3;
    const a1 = 3 * Math.fround(0.1);
    assertClose(x, [Math.cos(a0), 0, Math.sin(a0), 0, 0, Math.cos(a1), 0, Math.sin(a1)], 1e-6);
  });

  it("matches the float64 formula at short positions", () => {
    const d = 32;
    const rng = new Rng(1);
    for (const pos of [0, 1, 5, 31, 200]) {
      const x = random(d, rng);
      const out = x.slice();
      new Rope(d, { theta: 10000, linearFactor: 1 }).apply(out, 0, 1, pos);
      const expected = Array.from(x, (_, i) => {
        const j = i % (d / 2);
        const angle = pos * 10000 ** ((-2 * j) / d);
        const pair = i < d / 2 ? -x[i + d / 2] : x[i - d / 2];
        return x[i] * Math.cos(angle) + pair * Math.sin(angle);
      });
      // fp32 angles drift from exact ones by about pos * 2^-23 radians.
      assertClose(out, expected, 1e-6 + pos * 3e-7);
    }
  });

  it("follows PyTorch's fp32 angles at long positions (numpy fp32 fixture)", () => {
    const url = new URL("../../test/fixtures/rope-fp32.json", import.meta.url);
    const fx = JSON.parse(readFileSync(url, "utf8")) as {
      headDim: number;
      theta: number;
      x: number[];
      positions: number[];
      out: number[][];
    };
    const rope = new Rope(fx.headDim, { theta: fx.theta, linearFactor: 1 });
    const half = fx.headDim / 2;
    fx.positions.forEach((pos, p) => {
      const out = Float32Array.from(fx.x);
      rope.apply(out, 0, 1, pos);
      assertClose(out, fx.out[p], 3e-7);
      // Exact (float64) angles drift away from fp32 ones as positions grow: the fixture tells them apart.
      const exact = fx.x.map((x, i) => {
        const angle = pos * fx.theta ** (-(2 * (i % half)) / fx.headDim);
        return x * Math.cos(angle) + (i < half ? -fx.x[i + half] : fx.x[i - half]) * Math.sin(angle);
      });
      const drift = Math.max(...exact.map((v, i) => Math.abs(v - fx.out[p][i])));
      if (pos >= 4095) assert.ok(drift > 1e-4, `float64 math drifts by ${drift} at position ${pos}`);
    });
  });

  it("divides positions by the linear scaling factor", () => {
    const rng = new Rng(2);
    const x = random(16, rng);
    const scaled = x.slice();
    const plain = x.slice();
    new Rope(16, { theta: 10000, linearFactor: 4 }).apply(scaled, 0, 1, 4 * 37);
    new Rope(16, { theta: 10000, linearFactor: 1 }).apply(plain, 0, 1, 37);
    assert.deepEqual(scaled, plain);
  });
});

const spec: LayerSpec = { numHeads: 4, numKvHeads: 2, headDim: 8, intermediateSize: 16 };

describe("paged KV cache", () => {
  it("sizes each layer by its own KV heads", () => {
    const layers = [1, 2, 4].map((kv) => ({ ...spec, numKvHeads: kv }));
    const cache = new KvCache(layers, 5, 4);
    assert.deepEqual(
      cache.k.map((k) => k.length),
      [5 * 1 * 4 * 8, 5 * 2 * 4 * 8, 5 * 4 * 4 * 8],
    );
    assert.deepEqual(
      cache.v.map((v) => v.length),
      cache.k.map((k) => k.length),
    );
  });

  it("writes position p into block table[p / blockSize], slot p % blockSize, [block][head][slot][dim]", () => {
    const cache = new KvCache([spec], 4, 4);
    const k = Float32Array.from({ length: 16 }, (_, i) => i + 1);
    const v = Float32Array.from({ length: 16 }, (_, i) => -(i + 1));
    cache.write(0, new Int32Array([3, 1]), 5, k, v, 0);
    // Position 5: block 1 (the table's second entry), slot 1; head h at ((1 * 2 + h) * 4 + 1) * 8.
    for (let h = 0; h < 2; h++) {
      const at = ((1 * 2 + h) * 4 + 1) * 8;
      assert.deepEqual(cache.k[0].subarray(at, at + 8), k.subarray(h * 8, h * 8 + 8));
      assert.deepEqual(cache.v[0].subarray(at, at + 8), v.subarray(h * 8, h * 8 + 8));
    }
    const written = cache.k[0].reduce((n, x) => n + (x !== 0 ? 1 : 0), 0);
    assert.equal(written, 16);
  });
});

describe("attention", () => {
  /** Causal GQA over contiguous K and V ([pos][kvHead][dim]) in float64: the definition, nothing paged. */
  function naiveAttention(
    q: Float32Array,
    keys: Float32Array,
    values: Float32Array,
    contextLen: number,
    queryLen: number,
  ): Float64Array {
    const { numHeads, numKvHeads, headDim } = spec;
    const out = new Float64Array(queryLen * numHeads * headDim);
    for (let j = 0; j < queryLen; j++) {
      const pos = contextLen - queryLen + j;
      for (let h = 0; h < numHeads; h++) {
        const kvh = Math.floor(h / (numHeads / numKvHeads));
        const qv = q.subarray((j * numHeads + h) * headDim, (j * numHeads + h + 1) * headDim);
        const kv = (t: number) => (t * numKvHeads + kvh) * headDim;
        const s = Array.from({ length: pos + 1 }, (_, t) => {
          let dot = 0;
          for (let i = 0; i < headDim; i++) dot += qv[i] * keys[kv(t) + i];
          return dot / Math.sqrt(headDim);
        });
        const m = Math.max(...s);
        const e = s.map((x) => Math.exp(x - m));
        const z = e.reduce((a, b) => a + b, 0);
        for (let t = 0; t <= pos; t++) {
          for (let i = 0; i < headDim; i++) out[(j * numHeads + h) * headDim + i] += (e[t] / z) * values[kv(t) + i];
        }
      }
    }
    return out;
  }

  it("matches naive contiguous attention, over scrambled block tables, two sequences in one cache", () => {
    const rng = new Rng(3);
    const blockSize = 4;
    const cache = new KvCache([spec], 16, blockSize);
    const kvWidth = spec.numKvHeads * spec.headDim;
    const qWidth = spec.numHeads * spec.headDim;
    // Sequence A: 11 tokens, 3 of them new; sequence B: 6 tokens, all new, rows after A's.
    const seqs: SeqRows[] = [
      { firstRow: 0, queryLen: 3, contextLen: 11, blockTable: new Int32Array([9, 2, 14]) },
      { firstRow: 3, queryLen: 6, contextLen: 6, blockTable: new Int32Array([5, 0, 99]) },
    ];
    const q = random(9 * qWidth, rng);
    const contiguous = seqs.map((seq) => {
      const keys = random(seq.contextLen * kvWidth, rng);
      const values = random(seq.contextLen * kvWidth, rng);
      for (let t = 0; t < seq.contextLen; t++) cache.write(0, seq.blockTable, t, keys, values, t * kvWidth);
      return { keys, values };
    });
    const out = new Float32Array(q.length);
    const scores = new Float32Array(16);
    for (const seq of seqs) attention(out, q, seq, cache, 0, scores);
    seqs.forEach((seq, s) => {
      const rows = q.subarray(seq.firstRow * qWidth, (seq.firstRow + seq.queryLen) * qWidth);
      const expected = naiveAttention(rows, contiguous[s].keys, contiguous[s].values, seq.contextLen, seq.queryLen);
      assertClose(out.subarray(seq.firstRow * qWidth, (seq.firstRow + seq.queryLen) * qWidth), expected, 1e-5);
    });
  });
});

describe("dequantize", () => {
  it("dense float16 and bfloat16 widen exactly", () => {
    const values = new Float32Array([1.5, -0.25, 3, 65504]);
    for (const dtype of ["float16", "bfloat16"] as const) {
      const m = dequantize({ format: "dense", rows: 2, cols: 2, dtype, data: fromFloat32(values, dtype) }, "w");
      // 65504 (the largest fp16) is not a bf16 value: it rounds to 65536.
      const expected = dtype === "float16" ? values : new Float32Array([1.5, -0.25, 3, 65536]);
      assert.deepEqual(m, { rows: 2, cols: 2, data: expected });
    }
  });

  it("int8: q * the row's scale", () => {
    const q = new Int8Array([1, -2, 127, -128, 0, 5]);
    for (const scaleDtype of ["float32", "float16"] as const) {
      const m = dequantize(
        {
          format: "int8",
          rows: 2,
          cols: 3,
          data: new Uint8Array(q.buffer),
          scales: fromFloat32(new Float32Array([0.5, 2]), scaleDtype),
          scaleDtype,
        },
        "w",
      );
      assert.deepEqual(m.data, new Float32Array([0.5, -1, 63.5, -256, 0, 10]));
    }
  });

  it("int4: low nibble first, stored as q + 8, one scale per group of columns", () => {
    // Row 0: q = [-8, 7, 0, 1], row 1: q = [3, -3, -1, 2]; groups of 2 columns.
    const data = new Uint8Array([0x0 | (0xf << 4), 0x8 | (0x9 << 4), 0xb | (0x5 << 4), 0x7 | (0xa << 4)]);
    const m = dequantize(
      {
        format: "int4",
        rows: 2,
        cols: 4,
        groupSize: 2,
        data,
        scales: fromFloat32(new Float32Array([1, 0.5, 2, 0.25]), "bfloat16"),
        scaleDtype: "bfloat16",
      },
      "w",
    );
    assert.deepEqual(m.data, new Float32Array([-8, 7, 0, 0.5, 6, -6, -0.25, 0.5]));
  });

  it("refuses data of the wrong size, naming the weight", () => {
    const data = new Uint8Array(5);
    const scales = new Uint8Array(8);
    assert.throws(
      () => dequantize({ format: "int8", rows: 2, cols: 3, data, scales, scaleDtype: "float32" }, "layers.1.o"),
      (e: unknown) =>
        e instanceof DecimaError && e.kind === "engine" && /^layers\.1\.o: data has 5 bytes/.test(e.message),
    );
  });
});
