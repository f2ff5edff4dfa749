// The whole model on the GPU against the CPU reference (fp32): logits at every position within 1e-2
// (relative L2) in float16 and bfloat16; greedy decoding that makes the reference's choice at every one of
// 64 steps, 4 requests at once, except where the reference itself sees a near-tie (two logits closer than
// the 16-bit noise); and the multi-step decode loop (graph replays with on-device token feedback) equal to
// single steps. Skips where there is no GPU.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import type { Backend } from "../src/engine/backend.js";
import { CpuBackend } from "../src/engine/cpu/backend.js";
import { CudaBackend } from "../src/engine/cuda/backend.js";
import { parseModelConfig } from "../src/model/config.js";
import { buildEngine } from "../src/model/build-engine.js";
import { PRESETS, type PresetName, createModel, presetConfigJson } from "../src/model/create.js";
import { readEngine } from "../src/model/engine-file.js";
import { float32Source, packWeights } from "../src/model/pack.js";
import { quantizeHead, quantizeLayer } from "../src/model/quantize.js";
import { randomWeights } from "../src/model/random.js";
import { expectedShapes } from "../src/model/weights.js";
import { Engine } from "../src/runtime/engine.js";
import { DTYPES, type HalfDType, gpuSkip, relErr } from "./gpu.js";
import { batchOf } from "./step-batch.js";
import { promptOf, testTokenizer } from "./tiny-engine.js";

const opened: Backend[] = [];
after(async () => {
  for (const b of opened) await b.close();
});

async function backends(preset: PresetName, dtype: HalfDType, cudaOpts: { graphs?: boolean; warmupSeqs?: number } = {}) {
  const config = parseModelConfig(presetConfigJson(PRESETS[preset], dtype));
  const weights = await packWeights(float32Source(randomWeights(config, 11), expectedShapes(config)), config, dtype);
  const cpu = new CpuBackend(weights, { numBlocks: 128 });
  const cuda = await CudaBackend.create(weights, { numBlocks: 128, maxBatchTokens: 512, maxBatchSeqs: 32, ...cudaOpts });
  opened.push(cpu, cuda);
  return { config, cpu, cuda };
}

const blocks = (n: number, first = 0) => Array.from({ length: n }, (_, i) => first + i);

/** A near-tie: the two logits differ by less than what 16-bit arithmetic moves a logit (4% of the row's RMS). */
function nearTie(row: Float32Array, a: number, b: number): boolean {
  let ss = 0;
  for (const v of row) ss += v * v;
  return Math.abs(row[a] - row[b]) < 0.04 * Math.sqrt(ss / row.length);
}

function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

describe("CUDA backend against the CPU reference", { skip: gpuSkip }, () => {
  for (const preset of ["tiny", "decilm-tiny"] as const) {
    for (const dtype of DTYPES) {
      test(`${preset} ${dtype}: teacher-forced logits at every position, prefill then decode`, async () => {
        const { config, cpu, cuda } = await backends(preset, dtype);
        const vocab = config.vocabSize;
        const prompt = promptOf(100, 3);
        const prefill = batchOf([{ tokens: prompt, blocks: blocks(8), sample: false }], "all");
        const decode = batchOf([{ tokens: [prompt[5]], past: 100, blocks: blocks(8) }], "last");
        const a = { prefill: await cpu.step(prefill), decode: await cpu.step(decode) };
        const g = { prefill: await cuda.step(prefill), decode: await cuda.step(decode) };
        let worst = 0;
        for (let t = 0; t < prompt.length; t++) {
          const row = (r: typeof a.prefill) => r.logits!.subarray(t * vocab, (t + 1) * vocab);
          worst = Math.max(worst, relErr(row(g.prefill), row(a.prefill)));
        }
        console.log(`# ${preset} ${dtype}: worst relative L2 error of the prefill logits ${worst.toExponential(2)}`);
        assert.ok(worst < 1e-2, `prefill logits: relative error ${worst}`);
        assert.ok(relErr(g.decode.logits!, a.decode.logits!) < 1e-2, "decode logits");
      });

      test(`${preset} ${dtype}: greedy decoding makes the CPU engine's choices for 64 tokens, 4 requests at once`, async () => {
        const { cpu, cuda } = await backends(preset, dtype);
        const prompts = [promptOf(12, 1), promptOf(40, 2), promptOf(5, 3), promptOf(70, 4)];
        const engine = new Engine({ backend: cuda, tokenizer: testTokenizer(), modelId: preset });
        const reference = new Engine({ backend: cpu, tokenizer: testTokenizer(), modelId: preset });
        try {
          const generated = await Promise.all(prompts.map(async (prompt) => (await engine.complete({ prompt, maxTokens: 64, ignoreEos: true })).tokens));
          let nearTies = 0;
          for (const [i, prompt] of prompts.entries()) {
            // The reference's logits along the GPU's path: every decision is checked, none derails the rest.
            const rows = await reference.logits([...prompt, ...generated[i]]);
            for (let s = 0; s < 64; s++) {
              const row = rows[prompt.length - 1 + s];
              const want = argmax(row);
              if (generated[i][s] === want) continue;
              assert.ok(nearTie(row, want, generated[i][s]), `request ${i} step ${s}: GPU chose ${generated[i][s]}, the reference ${want}`);
              nearTies++;
            }
          }
          console.log(`# ${preset} ${dtype}: ${nearTies} near-ties decided the other way in ${4 * 64} steps`);
          assert.ok(nearTies <= 6, `${nearTies} near-ties decided the other way in ${4 * 64} steps`);
        } finally {
          await engine.close();
          await reference.close();
        }
      });
    }
  }

  // decilm-tiny, and one layer of DeciCoder-1b's shape (a small vocabulary and MLP) for int4's fused kernels at
  // the sizes they were tuned for.
  const oneLayer1b = { ...PRESETS["decicoder-1b"], numLayers: 1, vocabSize: 1024, intermediateSize: 512 };
  for (const [kind, name, preset] of [
    ["int8", "decilm-tiny", PRESETS["decilm-tiny"]],
    ["int4", "decilm-tiny", PRESETS["decilm-tiny"]],
    ["int4", "one layer of decicoder-1b", oneLayer1b],
  ] as const) {
    test(`${name} with ${kind} weights: logits within 1e-2 of the CPU reference on the same quantized weights`, async () => {
      const config = parseModelConfig(presetConfigJson(preset, "bfloat16"));
      const dense = await packWeights(float32Source(randomWeights(config, 11), expectedShapes(config)), config, "bfloat16");
      const quant = { kind, groupSize: 128 };
      const weights = { ...dense, layers: dense.layers.map((l, i) => quantizeLayer(l, quant, `layers.${i}`)), lmHead: quantizeHead(dense.lmHead, quant) };
      const cpu = new CpuBackend(weights, { numBlocks: 64 });
      const cuda = await CudaBackend.create(weights, { numBlocks: 64, maxBatchTokens: 512, maxBatchSeqs: 32 });
      opened.push(cpu, cuda);
      const vocab = config.vocabSize;
      const prompt = promptOf(60, 9);
      // Prefill (cuBLASLt on dequantized weights), then a decode step of one sequence and one of six (the
      // quantized GEMVs; int4 takes up to 8 rows).
      const others = Array.from({ length: 6 }, (_, i) => ({ prompt: promptOf(20 + 7 * i, 20 + i), blocks: blocks(4, 4 + 4 * i) }));
      const runs = [];
      for (const backend of [cpu, cuda]) {
        const prefill = await backend.step(batchOf([{ tokens: prompt, blocks: blocks(4), sample: false }], "all"));
        const decode = await backend.step(batchOf([{ tokens: [prompt[3]], past: 60, blocks: blocks(4) }], "last"));
        await backend.step(batchOf(others.map((o) => ({ tokens: o.prompt, blocks: o.blocks, sample: false }))));
        const decode6 = await backend.step(batchOf(others.map((o) => ({ tokens: [o.prompt[1]], past: o.prompt.length, blocks: o.blocks })), "last"));
        runs.push({ prefill, decode, decode6 });
      }
      const [a, g] = runs;
      let worst = 0;
      for (let t = 0; t < prompt.length; t++) {
        worst = Math.max(worst, relErr(g.prefill.logits!.subarray(t * vocab, (t + 1) * vocab), a.prefill.logits!.subarray(t * vocab, (t + 1) * vocab)));
      }
      const one = relErr(g.decode.logits!, a.decode.logits!), six = relErr(g.decode6.logits!, a.decode6.logits!);
      console.log(`# ${name} ${kind}: worst relative L2 error ${worst.toExponential(2)} (prefill), ${one.toExponential(2)} (decode), ${six.toExponential(2)} (six sequences)`);
      assert.ok(worst < 1e-2, `prefill: ${worst}`);
      assert.ok(one < 1e-2, `decode: ${one}`);
      assert.ok(six < 1e-2, `six sequences: ${six}`);
    });
  }

  test("an engine directory streams from weights.bin to the GPU with the same logits as weights in memory", async () => {
    const root = await mkdtemp(join(tmpdir(), "decima-cuda-engine-"));
    try {
      const { dir } = await createModel({ preset: "decilm-tiny", out: join(root, "model"), seed: 3 });
      for (const quant of ["none", "int8", "int4"] as const) {
        const out = join(root, `engine-${quant}`);
        await buildEngine({ model: dir, out, quant, ...(quant === "int4" ? { groupSize: 128 } : {}) });
        const fromFile = await Engine.load({ model: out, device: "cuda", numBlocks: 64 });
        const { weights } = await readEngine(out);
        const fromMemory = new Engine({ backend: await CudaBackend.create(weights, { numBlocks: 64 }), tokenizer: testTokenizer(), modelId: out });
        try {
          const prompt = promptOf(40, 2);
          const [a, b] = [await fromFile.logits(prompt), await fromMemory.logits(prompt)];
          a.forEach((row, t) => assert.deepEqual(row, b[t], `${quant}: position ${t}`));
        } finally {
          await fromFile.close();
          await fromMemory.close();
        }
      }
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  test("multi-step decode (graph replays, tokens fed back on the GPU) equals single steps and eager launches", async () => {
    // Every batch size's graph captured at load (warm-up on block 0), before this test's sequences exist.
    const { cuda } = await backends("tiny", "bfloat16", { warmupSeqs: 32 });
    const eager = (await backends("tiny", "bfloat16", { graphs: false })).cuda;
    const prompts = [promptOf(30, 5), promptOf(7, 6), promptOf(50, 7)];
    const seqs = prompts.map((p, i) => ({ tokens: p, blocks: blocks(8, i * 8) }));
    const steps = 20;
    const results = [];
    for (const backend of [cuda, eager]) {
      const first = await backend.step(batchOf(seqs));
      const decode = batchOf(prompts.map((p, i) => ({ tokens: [first.tokens[i]], past: p.length, blocks: blocks(8, i * 8), counter: 1 })));
      const many = await backend.step({ ...decode, steps });
      // The same steps one at a time, from the same cache state.
      const single: number[] = [];
      let batch = decode;
      for (let s = 0; s < steps; s++) {
        const r = await backend.step(batch);
        single.push(...r.tokens);
        batch = batchOf(prompts.map((p, i) => ({ tokens: [r.tokens[i]], past: p.length + s + 1, blocks: blocks(8, i * 8), counter: s + 2 })));
      }
      assert.deepEqual(Array.from(many.tokens), single, `${steps} steps at once vs one by one`);
      results.push(single);
    }
    assert.deepEqual(results[1], results[0], "graphs vs eager launches");
  });
});
