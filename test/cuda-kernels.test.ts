// Each CUDA kernel against the CPU reference, on fresh random inputs, at several sizes including ragged
// ones, in float16 and bfloat16. Skips (saying so) where there is no GPU.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { LayerSpec } from "../src/model/config.js";
import { fromFloat32, toFloat32 } from "../src/model/dtype.js";
import { Rng } from "../src/model/random.js";
import { type SeqRows, attention } from "../src/engine/cpu/attention.js";
import { KvCache } from "../src/engine/cpu/kv-cache.js";
import { matMul, rmsNorm, silu } from "../src/engine/cpu/ops.js";
import { Rope } from "../src/engine/cpu/rope.js";
import { sampleSequence } from "../src/engine/cpu/sampler.js";
import { dequantize } from "../src/engine/cpu/dequantize.js";
import { quantizeInt4, quantizeInt8 } from "../src/model/quantize.js";
import { penaltyEntries } from "../src/engine/cuda/backend.js";
import type { SamplingBatch } from "../src/engine/backend.js";
import { DTYPES, type HalfDType, addon, dtypeCode, f32, gpuSkip, i32, permutation, randomF32, randomHalf, relErr, tol } from "./gpu.js";

const seed = Date.now() >>> 0; // fresh inputs every run; printed so a failure can be replayed
console.log(`# kernel test seed ${seed}`);
const rng = new Rng(Number(process.env.DECIMA_TEST_SEED ?? seed));
const round = (v: Float32Array, d: HalfDType) => toFloat32(fromFloat32(v, d), d);

function cpuRmsNorm(x: Float32Array, rows: number, gain: Float32Array, eps: number): Float32Array {
  const out = new Float32Array(x.length);
  rmsNorm(out, x, rows, gain, eps);
  return out;
}

/** A matrix in decima's int8 or int4 storage (src/model/quantize.ts), and the values it stands for. */
function quantized(bytes: Uint8Array, rows: number, cols: number, dtype: HalfDType, kind: "int8" | "int4") {
  const dense = { format: "dense" as const, rows, cols, dtype, data: bytes };
  const group = cols % 128 === 0 ? 128 : cols % 32 === 0 ? 32 : 0;
  if (kind === "int4" && group === 0) return null; // int4 needs groups of 32 columns or more
  if (kind === "int8" && cols % 16) return null;
  const m = kind === "int8" ? quantizeInt8(dense) : quantizeInt4(dense, group);
  return { data: m.data, scales: m.scales, group, values: dequantize(m, "test").data };
}

describe("CUDA kernels", { skip: gpuSkip }, () => {
  for (const dtype of DTYPES) {
    const code = dtypeCode(dtype);

    test(`gemv ${dtype}: 16-bit, int8 and int4 weights (int8 and int4 up to 8 rows); plain, residual, logits and SiLU epilogues; with and without the RMSNorm prologue`, () => {
      const cases = [
        { rows: 64, cols: 256, batch: 1 },
        { rows: 250, cols: 688, batch: 2 },
        { rows: 1376, cols: 688, batch: 1 },
        { rows: 2560, cols: 2048, batch: 1 },
        { rows: 2048, cols: 5888, batch: 2 },
        { rows: 1000, cols: 2048, batch: 2 },
        // int8 at one row or in columns not a multiple of 64, and int4 in groups of 32 (columns not a
        // multiple of 128): the CUDA-core kernel; the rest go to the tensor cores.
        { rows: 96, cols: 352, batch: 1 },
        { rows: 80, cols: 352, batch: 2 },
        // Up to 8 rows: int8 and int4 alone (the tensor-core kernel). Four rows of 5,888 columns take just
        // under 48 KB of shared memory, past the default limit once the kernel's static shared memory is
        // counted.
        { rows: 1000, cols: 2048, batch: 5 },
        { rows: 2048, cols: 5888, batch: 4 },
        { rows: 2048, cols: 5888, batch: 8 },
        // Long rows (16,384 columns: 128 tensor-core steps), and 24 and 40 rows, which leave a tile's last
        // rows past the matrix.
        { rows: 24, cols: 16384, batch: 1 },
        { rows: 40, cols: 16384, batch: 3 },
      ];
      for (const { rows, cols, batch } of cases) {
        for (const norm of [0, 1]) {
          // One reference product per case serves every kernel and epilogue.
          const w = randomHalf(rng, rows * cols, 1 / Math.sqrt(cols), dtype);
          const gain = randomHalf(rng, cols, 1, dtype);
          const resid = randomF32(rng, batch * cols, 2);
          const xh = randomHalf(rng, batch * cols, 1, dtype);
          const x = norm ? round(cpuRmsNorm(resid, batch, gain.values, 1e-5), dtype) : xh.values;
          const y = matMul(x, batch, { rows, cols, data: w.values });
          for (const quant of ["none", "int8", "int4"] as const) {
            // Quantized weights: the reference product uses their dequantized values.
            const stored = quant === "none" ? null : quantized(w.bytes, rows, cols, dtype, quant);
            // More than 2 rows: the tensor-core kernel's formats alone.
            const mma = (quant === "int4" && stored?.group === 128) || (quant === "int8" && cols % 64 === 0);
            if ((quant !== "none" && !stored) || (batch > 2 && !mma)) continue;
            const yq = stored ? matMul(x, batch, { rows, cols, data: stored.values }) : y;
            for (const mode of [0, 1, 2, 3]) {
              const init = randomF32(rng, batch * rows, 1);
              const inputs: Record<string, ArrayBufferView> = { w: stored?.data ?? w.bytes, x: norm ? resid : xh.bytes, gain: gain.bytes };
              if (stored) inputs.scales = stored.scales;
              if (mode === 1) inputs.resid_out = init;
              const params = { dtype: code, rows, cols, batch, mode, norm, eps: 1e-5, quant: ["none", "int8", "int4"].indexOf(quant), group: stored?.group ?? 0 };
              const out = addon().testKernel("gemv", inputs, params);
              const y = yq;
              let got: Float32Array;
              let want: Float32Array;
              if (mode === 0) {
                got = toFloat32(out.y, dtype);
                want = y;
              } else if (mode === 1) {
                got = f32(out.y);
                want = y.map((v, i) => v + init[i]);
              } else if (mode === 2) {
                got = f32(out.y);
                want = y;
              } else {
                const inter = rows / 2;
                got = toFloat32(out.y, dtype);
                want = new Float32Array(batch * inter);
                const yr = round(y, dtype); // the kernel rounds gate and up as the unfused path stores them
                for (let b = 0; b < batch; b++)
                  for (let i = 0; i < inter; i++) want[b * inter + i] = silu(yr[b * rows + i]) * yr[b * rows + inter + i];
              }
              const err = relErr(got, want);
              // fp32 outputs: only the summation order differs (fp32 sums of up to 5888 products), and with the
              // RMSNorm prologue the normalised activations, rounded to 16 bits after an fp32 reduction in
              // another order: an element on a rounding boundary moves by one 16-bit step (bfloat16: 0.4%),
              // measured at 1.0e-4 on 250 x 688.
              const limit = mode === 0 || mode === 3 ? tol(dtype) : norm ? tol(dtype) / 20 : 1e-4;
              assert.ok(err < limit, `${quant} rows ${rows} cols ${cols} batch ${batch} norm ${norm} mode ${mode}: error ${err}`);
              if (stored && mode === 0) {
                assert.ok(relErr(toFloat32(out.dequantized, dtype), stored.values) < tol(dtype), `${quant} ${rows}x${cols}: dequantization`);
              }
            }
          }
        }
      }
    });

    test(`fused MLP ${dtype}: int4 weights, 1 to 8 rows, against RMSNorm, gate/up, SiLU x up and down on the CPU`, () => {
      const cases = [
        { hidden: 256, inter: 512, batch: 1 },
        { hidden: 256, inter: 512, batch: 3 },
        { hidden: 512, inter: 384, batch: 2 }, // three chunks
        { hidden: 1024, inter: 256, batch: 5 }, // a block's down tiles outnumber its warps
        { hidden: 2048, inter: 5888, batch: 1 }, // eight gate/up steps per warp
        { hidden: 2048, inter: 5888, batch: 8 },
      ];
      for (const { hidden, inter, batch } of cases) {
        const gu = randomHalf(rng, 2 * inter * hidden, 1 / Math.sqrt(hidden), dtype);
        const down = randomHalf(rng, hidden * inter, 1 / Math.sqrt(inter), dtype);
        const gain = randomHalf(rng, hidden, 1, dtype);
        const resid = randomF32(rng, batch * hidden, 2);
        const x = round(cpuRmsNorm(resid, batch, gain.values, 1e-5), dtype);
        const g = quantized(gu.bytes, 2 * inter, hidden, dtype, "int4")!;
        const d = quantized(down.bytes, hidden, inter, dtype, "int4")!;
        // The unfused path's roundings: gate and up stored as 16-bit, then their product.
        const y = round(matMul(x, batch, { rows: 2 * inter, cols: hidden, data: g.values }), dtype);
        const act = new Float32Array(batch * inter);
        for (let b = 0; b < batch; b++)
          for (let i = 0; i < inter; i++) act[b * inter + i] = silu(y[b * 2 * inter + i]) * y[b * 2 * inter + inter + i];
        const want = matMul(round(act, dtype), batch, { rows: hidden, cols: inter, data: d.values });
        const inputs = { w_gate_up: g.data, scales_gate_up: g.scales, w_down: d.data, scales_down: d.scales, x: resid, gain: gain.bytes };
        const params = { dtype: code, hidden, inter, batch, group: 128, eps: 1e-5 };
        const out = f32(addon().testKernel("mlp", inputs, params).y);
        const got = out.map((v, i) => v - resid[i]);
        const err = relErr(got, want);
        // An activation on a 16-bit rounding boundary may round the other way after fp32 sums in another order.
        assert.ok(err < tol(dtype), `hidden ${hidden} inter ${inter} batch ${batch}: error ${err}`);
      }
    });

    for (const hd of [64, 128]) {
      test(`QKV + RoPE + KV-cache write ${dtype} head ${hd}: fused GEMV epilogue and the GEMM path`, () => {
        const heads = 8, kv = 2, hidden = 512, bs = 16, blocks = 8, theta = 10000, maxPos = 2048;
        const rows = (heads + 2 * kv) * hd;
        for (const [fused, n] of [[1, 1], [1, 2], [0, 3], [0, 37]]) {
          const w = randomHalf(rng, rows * hidden, 1 / Math.sqrt(hidden), dtype);
          const gain = randomHalf(rng, hidden, 1, dtype);
          const x = randomF32(rng, n * hidden, 1);
          const positions = Int32Array.from({ length: n }, () => Math.floor(rng.uniform() * 1500));
          const slots = Int32Array.from(permutation(rng, blocks * bs).slice(0, n));
          const kc = randomHalf(rng, blocks * kv * bs * hd, 1, dtype);
          const vc = randomHalf(rng, blocks * kv * bs * hd, 1, dtype);
          const out = addon().testKernel(
            "qkv",
            { w: w.bytes, x, gain: gain.bytes, positions, slots, k_cache: kc.bytes, v_cache: vc.bytes },
            { dtype: code, heads, kv_heads: kv, head_dim: hd, block_size: bs, tokens: n, hidden, theta, factor: 1, max_pos: maxPos, eps: 1e-5, fused },
          );
          const xn = round(cpuRmsNorm(x, n, gain.values, 1e-5), dtype);
          const qkv = round(matMul(xn, n, { rows, cols: hidden, data: w.values }), dtype);
          const rope = new Rope(hd, { theta, linearFactor: 1 });
          const wantQ = new Float32Array(n * heads * hd);
          const wantK = kc.values.slice();
          const wantV = vc.values.slice();
          for (let t = 0; t < n; t++) {
            const row = qkv.subarray(t * rows, (t + 1) * rows).slice();
            rope.apply(row, 0, heads + kv, positions[t]);
            wantQ.set(row.subarray(0, heads * hd), t * heads * hd);
            const block = Math.floor(slots[t] / bs), off = slots[t] % bs;
            for (let g = 0; g < kv; g++) {
              const at = ((block * kv + g) * bs + off) * hd;
              wantK.set(row.subarray((heads + g) * hd, (heads + g + 1) * hd), at);
              wantV.set(row.subarray((heads + kv + g) * hd, (heads + kv + g + 1) * hd), at);
            }
          }
          const label = `fused ${fused} tokens ${n}`;
          assert.ok(relErr(toFloat32(out.q, dtype), wantQ) < tol(dtype), `${label}: q`);
          assert.ok(relErr(toFloat32(out.k_cache, dtype), wantK) < tol(dtype), `${label}: k cache`);
          assert.ok(relErr(toFloat32(out.v_cache, dtype), wantV) < tol(dtype), `${label}: v cache`);
        }
      });

      // Decode runs with the device's cluster size (0), one block per sequence and KV head (every chunk in
      // one block, as on GPUs without clusters) and the largest cluster.
      test(`attention ${dtype} head ${hd}: decode (clusters of 1, 8, 16) and prefill (causal, with past), GQA, scrambled blocks`, () => {
        for (const [heads, kv] of [[32, 4], [8, 8], [16, 2]]) {
          for (const prefill of [0, 1]) {
            const bs = 16, maxPos = 2048;
            const contexts = prefill ? [5, 64, 130, 300, 77] : [1, 17, 64, 65, 300, 513, 1000, 1600];
            const queryLens = prefill ? [5, 64, 65, 100, 1] : contexts.map(() => 1);
            const seqs = contexts.length;
            const width = Math.ceil(Math.max(...contexts) / bs);
            const numBlocks = seqs * width;
            const order = permutation(rng, numBlocks);
            const tables = Int32Array.from(order);
            const queryStarts = new Int32Array(seqs + 1);
            queryLens.forEach((q, i) => (queryStarts[i + 1] = queryStarts[i] + q));
            const tokens = queryStarts[seqs];
            const q = randomHalf(rng, tokens * heads * hd, 1, dtype);
            const kc = randomHalf(rng, numBlocks * kv * bs * hd, 1, dtype);
            const vc = randomHalf(rng, numBlocks * kv * bs * hd, 1, dtype);
            const layer: LayerSpec = { numHeads: heads, numKvHeads: kv, headDim: hd, intermediateSize: 0 };
            const cache = new KvCache([layer], numBlocks, bs);
            cache.k[0].set(kc.values);
            cache.v[0].set(vc.values);
            const want = new Float32Array(tokens * heads * hd);
            const scores = new Float32Array(maxPos);
            for (let s = 0; s < seqs; s++) {
              const seq: SeqRows = { firstRow: queryStarts[s], queryLen: queryLens[s], contextLen: contexts[s], blockTable: tables.subarray(s * width, (s + 1) * width) };
              attention(want, q.values, seq, cache, 0, scores);
            }
            for (const cluster of prefill ? [0] : [0, 1, 16]) {
              const out = addon().testKernel(
                "attention",
                { q: q.bytes, k_cache: kc.bytes, v_cache: vc.bytes, query_starts: queryStarts, context_lens: Int32Array.from(contexts), block_tables: tables },
                { dtype: code, heads, kv_heads: kv, head_dim: hd, block_size: bs, seqs, table_width: width, tokens, prefill, max_query_len: Math.max(...queryLens), cluster },
              );
              const err = relErr(toFloat32(out.out, dtype), want);
              assert.ok(err < tol(dtype), `heads ${heads}/${kv} prefill ${prefill} cluster ${cluster}: error ${err}`);
            }
          }
        }
      });
    }

    // The int4 O projection fused into decode attention (the device's cluster): each sequence's residual row
    // and its copy gain O times the attention output, rounded to 16 bits as the unfused path stores it.
    test(`decode attention with the O projection fused in ${dtype}: int4, GQA, several sequences`, () => {
      const cases = [
        { heads: 32, kv: 4, hd: 64, hidden: 2048 }, // DeciCoder-1b: two row tiles and four steps per lane
        { heads: 16, kv: 4, hd: 128, hidden: 1024 },
        { heads: 8, kv: 4, hd: 64, hidden: 512 }, // one step per KV head; half the warps without a tile
      ];
      for (const { heads, kv, hd, hidden } of cases) {
        const bs = 16, contexts = [1, 17, 300, 1000], seqs = contexts.length;
        const width = Math.ceil(Math.max(...contexts) / bs), numBlocks = seqs * width;
        const tables = Int32Array.from(permutation(rng, numBlocks));
        const queryStarts = Int32Array.from({ length: seqs + 1 }, (_, i) => i);
        const q = randomHalf(rng, seqs * heads * hd, 1, dtype);
        const kc = randomHalf(rng, numBlocks * kv * bs * hd, 1, dtype);
        const vc = randomHalf(rng, numBlocks * kv * bs * hd, 1, dtype);
        const wo = randomHalf(rng, hidden * heads * hd, 1 / Math.sqrt(heads * hd), dtype);
        const o = quantized(wo.bytes, hidden, heads * hd, dtype, "int4")!;
        const resid = randomF32(rng, seqs * hidden, 2);
        const cache = new KvCache([{ numHeads: heads, numKvHeads: kv, headDim: hd, intermediateSize: 0 }], numBlocks, bs);
        cache.k[0].set(kc.values);
        cache.v[0].set(vc.values);
        const attn = new Float32Array(seqs * heads * hd);
        const scores = new Float32Array(1024);
        for (let s = 0; s < seqs; s++) {
          const seq: SeqRows = { firstRow: s, queryLen: 1, contextLen: contexts[s], blockTable: tables.subarray(s * width, (s + 1) * width) };
          attention(attn, q.values, seq, cache, 0, scores);
        }
        const want = matMul(round(attn, dtype), seqs, { rows: hidden, cols: heads * hd, data: o.values });
        // The cluster of several sequences (0: the device's choice), and of one (16).
        for (const cluster of [0, 16]) {
          const out = addon().testKernel(
            "attention",
            { q: q.bytes, k_cache: kc.bytes, v_cache: vc.bytes, query_starts: queryStarts, context_lens: Int32Array.from(contexts), block_tables: tables, w_o: o.data, scales_o: o.scales, resid },
            { dtype: code, heads, kv_heads: kv, head_dim: hd, block_size: bs, seqs, table_width: width, tokens: seqs, prefill: 0, max_query_len: 1, cluster, hidden, group: 128 },
          );
          for (const name of ["resid", "copy"]) {
            const got = f32(out[name]).map((v, i) => v - resid[i]);
            const err = relErr(got, want);
            assert.ok(err < tol(dtype), `heads ${heads}/${kv} head ${hd} hidden ${hidden} cluster ${cluster} ${name}: error ${err}`);
          }
        }
      }
    });

    test(`embedding, RMSNorm (gathered rows), SiLU x up, cuBLASLt GEMM ${dtype}`, () => {
      const vocab = 300, hidden = 264, n = 7;
      const embed = randomHalf(rng, vocab * hidden, 1, dtype);
      const tokens = Int32Array.from({ length: n }, () => Math.floor(rng.uniform() * vocab));
      const e = f32(addon().testKernel("embedding", { embed: embed.bytes, tokens }, { dtype: code, tokens: n, hidden }).resid);
      const wantE = new Float32Array(n * hidden);
      tokens.forEach((t, i) => wantE.set(embed.values.subarray(t * hidden, (t + 1) * hidden), i * hidden));
      assert.deepEqual(e, wantE);

      const x = randomF32(rng, n * hidden, 3);
      const gain = randomHalf(rng, hidden, 1, dtype);
      const gather = Int32Array.from([6, 0, 3]);
      const y = toFloat32(addon().testKernel("rmsnorm", { x, gain: gain.bytes, gather }, { dtype: code, rows: 3, hidden, eps: 1e-5 }).y, dtype);
      const normed = cpuRmsNorm(x, n, gain.values, 1e-5);
      const wantN = new Float32Array(3 * hidden);
      gather.forEach((r, i) => wantN.set(normed.subarray(r * hidden, (r + 1) * hidden), i * hidden));
      assert.ok(relErr(y, wantN) < tol(dtype), "rmsnorm");

      const inter = 344;
      const gu = randomHalf(rng, n * 2 * inter, 2, dtype);
      const act = toFloat32(addon().testKernel("silu_mul", { gate_up: gu.bytes }, { dtype: code, tokens: n, inter }).y, dtype);
      const wantA = new Float32Array(n * inter);
      for (let t = 0; t < n; t++)
        for (let i = 0; i < inter; i++) wantA[t * inter + i] = silu(gu.values[t * 2 * inter + i]) * gu.values[t * 2 * inter + inter + i];
      assert.ok(relErr(act, wantA) < tol(dtype), "silu_mul");

      for (const [m, nn, k, yFp32, acc] of [[37, 520, 256, 1, 1], [300, 264, 688, 0, 0], [9, 49152, 512, 1, 0]]) {
        const w = randomHalf(rng, nn * k, 1 / Math.sqrt(k), dtype);
        const xx = randomHalf(rng, m * k, 1, dtype);
        const init = randomF32(rng, m * nn, 1);
        const yIn = yFp32 ? init : fromFloat32(new Float32Array(m * nn), dtype);
        const out = addon().testKernel("gemm", { w: w.bytes, x: xx.bytes, y: yIn }, { dtype: code, m, n: nn, k, y_fp32: yFp32, accumulate: acc });
        const prod = matMul(xx.values, m, { rows: nn, cols: k, data: w.values });
        const want = acc ? prod.map((v, i) => v + init[i]) : prod;
        const got = yFp32 ? f32(out.y) : toFloat32(out.y, dtype);
        assert.ok(relErr(got, want) < (yFp32 ? 1e-4 : tol(dtype)), `gemm ${m}x${nn}x${k}`);
      }
    });
  }

  test("sampling: greedy, temperature with top-k / top-p / min-p, penalties, log-probs, seeded", () => {
    const vocab = 49152, seqs = 12, topN = 5;
    const logits = randomF32(rng, seqs * vocab, 3);
    const history = [3, 3, 17, 99, 3, 42, 17];
    // Rows 8 to 11: the thresholds' edges (top-k of 1 and of all but one, top-p near 1, top-k then top-p).
    const s: SamplingBatch = {
      temperature: Float32Array.from([0, 0, 0.8, 1, 1.2, 0.7, 1, 1, 0.8, 1, 0.5, 0.8]),
      topK: Int32Array.from([0, 0, 0, 50, 0, 0, 20, 0, 1, vocab - 1, 0, 40]),
      topP: Float32Array.from([1, 1, 1, 1, 0.9, 1, 0.5, 1, 1, 1, 0.999, 0.95]),
      minP: Float32Array.from([0, 0, 0, 0, 0, 0.05, 0, 0, 0, 0, 0, 0]),
      repetitionPenalty: Float32Array.from([1, 1.3, 1, 1, 1, 1, 1, 1.1, 1, 1, 1, 1]),
      frequencyPenalty: Float32Array.from([0, 0.5, 0, 0, 0, 0, 0, 0.2, 0, 0, 0, 0]),
      presencePenalty: Float32Array.from([0, 0.4, 0, 0, 0, 0, 0, 0.3, 0, 0, 0, 0]),
      seed: Uint32Array.from({ length: seqs }, () => rng.nextU32()),
      counter: Uint32Array.from({ length: seqs }, (_, i) => i * 7),
      history: Int32Array.from([...history, ...history]),
      historyStarts: Int32Array.from([0, 0, 7, 7, 7, 7, 7, 7, 14, 14, 14, 14, 14]),
      promptLens: Int32Array.from([0, 3, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]),
      topLogprobs: topN,
    };
    // Boost a penalised token to the top of row 1 so the penalty decides the greedy pick.
    logits[1 * vocab + 3] = 50;
    logits[1 * vocab + 17] = 49.9;
    const pen = penaltyEntries(s, seqs);
    const sample = new Uint8Array(seqs).fill(1);
    const out = addon().testKernel(
      "sample",
      {
        logits, temperature: s.temperature, top_k: s.topK, top_p: s.topP, min_p: s.minP, repetition: s.repetitionPenalty,
        frequency: s.frequencyPenalty, presence: s.presencePenalty, seed: s.seed, counter: s.counter, sample,
        pen_starts: pen.starts, pen_tokens: pen.tokens, pen_counts: pen.counts,
      },
      { seqs, vocab, top_n: topN },
    );
    const tokens = i32(out.tokens), lps = f32(out.logprobs), topIds = i32(out.top_ids), topLps = f32(out.top_logprobs);
    for (let i = 0; i < seqs; i++) {
      const row = logits.subarray(i * vocab, (i + 1) * vocab);
      const want = sampleSequence(row, {
        temperature: s.temperature[i], topK: s.topK[i], topP: s.topP[i], minP: s.minP[i], repetitionPenalty: s.repetitionPenalty[i],
        frequencyPenalty: s.frequencyPenalty[i], presencePenalty: s.presencePenalty[i], seed: s.seed[i], counter: s.counter[i],
        history: s.history.subarray(s.historyStarts[i], s.historyStarts[i + 1]), promptLen: s.promptLens[i],
      }, topN);
      assert.equal(tokens[i], want.token, `row ${i}: token`);
      assert.ok(Math.abs(lps[i] - want.logprob) < 1e-4, `row ${i}: logprob ${lps[i]} vs ${want.logprob}`);
      assert.deepEqual(Array.from(topIds.subarray(i * topN, (i + 1) * topN)), Array.from(want.topTokens), `row ${i}: top ids`);
      for (let j = 0; j < topN; j++) assert.ok(Math.abs(topLps[i * topN + j] - want.topLogprobs[j]) < 1e-4, `row ${i}: top logprob ${j}`);
    }
  });
});
