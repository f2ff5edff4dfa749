// The whole model on the GPU against the CPU reference: logits at every position within 1e-2 (relative
// L2) of the fp32 reference in float16 and bfloat16, and much closer to the reference emulating 16-bit
// activations, with which greedy decoding is identical for 64 tokens; and the multi-step decode loop
// (graph replays with on-device token feedback) equal to single steps. Skips where there is no GPU.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import type { Backend } from "../src/engine/backend.js";
import { CpuBackend } from "../src/engine/cpu/backend.js";
import { CudaBackend } from "../src/engine/cuda/backend.js";
import { parseModelConfig } from "../src/model/config.js";
import { PRESETS, type PresetName, presetConfigJson } from "../src/model/create.js";
import { float32Source, packWeights } from "../src/model/pack.js";
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

async function backends(preset: PresetName, dtype: HalfDType, cudaOpts: { graphs?: boolean } = {}) {
  const config = parseModelConfig(presetConfigJson(PRESETS[preset], dtype));
  const weights = await packWeights(float32Source(randomWeights(config, 11), expectedShapes(config)), config, dtype);
  const cpu = new CpuBackend(weights, { numBlocks: 128 });
  const emulated = new CpuBackend(weights, { numBlocks: 128, activations: dtype });
  const cuda = await CudaBackend.create(weights, { numBlocks: 128, maxBatchTokens: 512, maxBatchSeqs: 32, ...cudaOpts });
  opened.push(cpu, emulated, cuda);
  return { config, cpu, emulated, cuda };
}

const blocks = (n: number, first = 0) => Array.from({ length: n }, (_, i) => first + i);

describe("CUDA backend against the CPU reference", { skip: gpuSkip }, () => {
  for (const preset of ["tiny", "decilm-tiny"] as const) {
    for (const dtype of DTYPES) {
      test(`${preset} ${dtype}: teacher-forced logits at every position, prefill then decode`, async () => {
        const { config, cpu, emulated, cuda } = await backends(preset, dtype);
        const vocab = config.vocabSize;
        const prompt = promptOf(100, 3);
        const prefill = batchOf([{ tokens: prompt, blocks: blocks(8), sample: false }], "all");
        const decode = batchOf([{ tokens: [prompt[5]], past: 100, blocks: blocks(8) }], "last");
        const [want, close, got] = [cpu, emulated, cuda].map(async (b) => ({ prefill: await b.step(prefill), decode: await b.step(decode) }));
        const [a, e, g] = [await want, await close, await got];
        let worst = 0;
        let worstEmulated = 0;
        for (let t = 0; t < prompt.length; t++) {
          const row = (r: typeof a.prefill) => r.logits!.subarray(t * vocab, (t + 1) * vocab);
          worst = Math.max(worst, relErr(row(g.prefill), row(a.prefill)));
          worstEmulated = Math.max(worstEmulated, relErr(row(g.prefill), row(e.prefill)));
        }
        console.log(`# ${preset} ${dtype}: worst relative error ${worst.toExponential(2)} vs fp32, ${worstEmulated.toExponential(2)} vs 16-bit emulation`);
        assert.ok(worst < 1e-2, `prefill logits: relative error ${worst} vs the fp32 reference`);
        assert.ok(worstEmulated < 3e-3, `prefill logits: relative error ${worstEmulated} vs the 16-bit emulation`);
        assert.ok(relErr(g.decode.logits!, a.decode.logits!) < 1e-2, "decode logits vs fp32");
        assert.ok(relErr(g.decode.logits!, e.decode.logits!) < 3e-3, "decode logits vs the 16-bit emulation");
        assert.equal(g.decode.tokens[0], e.decode.tokens[0], "greedy token after decode");
      });

      test(`${preset} ${dtype}: greedy decoding equals the CPU engine for 64 tokens, 4 requests at once`, async () => {
        const { emulated, cuda } = await backends(preset, dtype);
        const run = async (backend: Backend) => {
          const engine = new Engine({ backend, tokenizer: testTokenizer(), modelId: preset });
          try {
            const prompts = [promptOf(12, 1), promptOf(40, 2), promptOf(5, 3), promptOf(70, 4)];
            return await Promise.all(prompts.map(async (prompt) => (await engine.complete({ prompt, maxTokens: 64, ignoreEos: true })).tokens));
          } finally {
            await engine.close();
          }
        };
        const [want, got] = [await run(emulated), await run(cuda)];
        for (let i = 0; i < want.length; i++) assert.deepEqual(got[i], want[i], `request ${i}`);
      });
    }
  }

  test("multi-step decode (graph replays, tokens fed back on the GPU) equals single steps and the CPU", async () => {
    const { emulated: cpu, cuda } = await backends("tiny", "bfloat16");
    const eager = (await backends("tiny", "bfloat16", { graphs: false })).cuda;
    const prompts = [promptOf(30, 5), promptOf(7, 6), promptOf(50, 7)];
    const seqs = prompts.map((p, i) => ({ tokens: p, blocks: blocks(8, i * 8) }));
    const steps = 20;
    const results = [];
    for (const backend of [cpu, cuda, eager]) {
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
      assert.deepEqual(Array.from(many.tokens), single, `${backend.description}: ${steps} steps at once vs one by one`);
      results.push(single);
    }
    assert.deepEqual(results[1], results[0], "CUDA vs CPU");
    assert.deepEqual(results[2], results[1], "graphs vs eager launches");
  });
});
