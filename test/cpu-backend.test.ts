import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { StepBatch, StepResult } from "../src/engine/backend.js";
import { CpuBackend } from "../src/engine/cpu/backend.js";
import { StepSequence } from "../src/engine/decode-steps.js";
import { validateBatch } from "../src/engine/validate-batch.js";
import { nextToken, samplingParams } from "../src/engine/cpu/sampler.js";
import { DecimaError } from "../src/errors.js";
import { type ModelConfig, parseModelConfig } from "../src/model/config.js";
import { type FloatDType, fromFloat32, toFloat32 } from "../src/model/dtype.js";
import { float32Source, packWeights } from "../src/model/pack.js";
import { randomWeights } from "../src/model/random.js";
import { expectedShapes, tensorNames } from "../src/model/weights.js";
import { type Seq, batchOf } from "./step-batch.js";

const base = {
  vocab_size: 96,
  hidden_size: 32,
  intermediate_size: 48,
  num_attention_heads: 4,
  max_position_embeddings: 64,
  rms_norm_eps: 1e-5,
};

const configs: Record<string, ModelConfig> = {
  llama: parseModelConfig({
    ...base,
    architectures: ["LlamaForCausalLM"],
    num_hidden_layers: 2,
    num_key_value_heads: 2,
  }),
  "deci (KV heads per layer)": parseModelConfig({
    ...base,
    architectures: ["DeciLMForCausalLM"],
    model_type: "deci",
    num_hidden_layers: 3,
    num_key_value_heads_per_layer: [1, 2, 4],
  }),
  "decicoder (tied, linear rope)": parseModelConfig({
    ...base,
    architectures: ["DeciCoderForCausalLM"],
    model_type: "decicoder",
    num_hidden_layers: 2,
    num_key_value_heads: 1,
    tie_word_embeddings: true,
    rope_theta: 500,
    rope_scaling: { type: "linear", factor: 2 },
  }),
};

async function backendFor(config: ModelConfig, tensors = randomWeights(config, 1), dtype: FloatDType = "float32") {
  const weights = await packWeights(float32Source(tensors, expectedShapes(config)), config, dtype);
  return new CpuBackend(weights, { numBlocks: 32, blockSize: 4 });
}

/** One sequence of a test batch: its new tokens, how many it already has in the cache, and its blocks. */
function row(logits: Float32Array | undefined, i: number, vocab: number): Float32Array {
  assert.ok(logits, "logits were asked for");
  return logits.subarray(i * vocab, (i + 1) * vocab);
}

/** |a - b| <= rel * max |b|, entry by entry. */
function assertNear(a: ArrayLike<number>, b: ArrayLike<number>, rel: number, what: string): void {
  assert.equal(a.length, b.length, what);
  let scale = 0;
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]));
  for (let i = 0; i < b.length; i++) {
    assert.ok(Math.abs(a[i] - b[i]) <= rel * scale, `${what} [${i}]: ${a[i]} vs ${b[i]}`);
  }
}

const prompt = [5, 17, 3, 88, 41, 41, 0, 95, 12, 60, 7, 33];

/**
 * Hugging Face's Llama forward pass over one whole prompt, in float64 from the unpacked tensors: contiguous
 * K and V, no cache, nothing shared with the backend but the definition.
 */
function referenceLogits(config: ModelConfig, tensors: Map<string, Float32Array>, tokens: number[]): number[][] {
  const get = (name: string) => tensors.get(name)!;
  const linear = (w: Float32Array, x: number[]) =>
    Array.from({ length: w.length / x.length }, (_, r) => x.reduce((s, v, c) => s + v * w[r * x.length + c], 0));
  const norm = (x: number[], w: Float32Array) => {
    const rms = Math.sqrt(x.reduce((s, v) => s + v * v, 0) / x.length + config.rmsNormEps);
    return x.map((v, i) => (v / rms) * w[i]);
  };
  const rope = (x: number[], pos: number, d: number) => {
    const out = x.slice();
    for (let head = 0; head < x.length / d; head++) {
      for (let i = 0; i < d / 2; i++) {
        const angle = (pos / config.rope.linearFactor) * config.rope.theta ** ((-2 * i) / d);
        const [a, b] = [x[head * d + i], x[head * d + i + d / 2]];
        out[head * d + i] = a * Math.cos(angle) - b * Math.sin(angle);
        out[head * d + i + d / 2] = b * Math.cos(angle) + a * Math.sin(angle);
      }
    }
    return out;
  };
  const h = config.hiddenSize;
  let x = tokens.map((t) => Array.from(get(tensorNames.embed).subarray(t * h, (t + 1) * h)));
  config.layers.forEach((spec, l) => {
    const names = tensorNames.layer(l);
    const d = spec.headDim;
    const normed = x.map((r) => norm(r, get(names.inputNorm)));
    const q = normed.map((r, pos) => rope(linear(get(names.q), r), pos, d));
    const k = normed.map((r, pos) => rope(linear(get(names.k), r), pos, d));
    const v = normed.map((r) => linear(get(names.v), r));
    const attended = q.map((qRow, pos) =>
      Array.from({ length: spec.numHeads }, (_, head) => {
        const kv = Math.floor(head / (spec.numHeads / spec.numKvHeads)) * d;
        const scores = k.slice(0, pos + 1).map((kRow) => {
          let s = 0;
          for (let i = 0; i < d; i++) s += qRow[head * d + i] * kRow[kv + i];
          return s / Math.sqrt(d);
        });
        const max = Math.max(...scores);
        const e = scores.map((s) => Math.exp(s - max));
        const z = e.reduce((a, b) => a + b, 0);
        return Array.from({ length: d }, (_, i) => e.reduce((s, p, t) => s + (p / z) * v[t][kv + i], 0));
      }).flat(),
    );
    x = x.map((r, t) => {
      const afterAttention = linear(get(names.o), attended[t]).map((o, i) => r[i] + o);
      const m = norm(afterAttention, get(names.postNorm));
      const gate = linear(get(names.gate), m);
      const up = linear(get(names.up), m);
      const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]);
      return linear(get(names.down), act).map((o, i) => afterAttention[i] + o);
    });
  });
  const head = get(config.tieWordEmbeddings ? tensorNames.embed : tensorNames.lmHead);
  return x.map((r) => linear(head, norm(r, get(tensorNames.norm))));
}

for (const [name, config] of Object.entries(configs)) {
  describe(`CPU backend: ${name}`, () => {
    const vocab = config.vocabSize;

    it("matches a float64 forward pass written from Hugging Face's Llama", async () => {
      const tensors = randomWeights(config, 1);
      const backend = await backendFor(config, tensors);
      const result = await backend.step(batchOf([{ tokens: prompt, blocks: [9, 2, 30] }], "all"));
      const expected = referenceLogits(config, tensors, prompt);
      expected.forEach((r, t) => assertNear(row(result.logits, t, vocab), r, 1e-5, `position ${t}`));
      // The random model is peaked: greedy picks a clear winner, the same as the reference's.
      const last = expected[prompt.length - 1];
      assert.equal(result.tokens[0], last.indexOf(Math.max(...last)));
    });

    it("prefill of a whole prompt equals one token per step", async () => {
      const whole = await (await backendFor(config)).step(batchOf([{ tokens: prompt, blocks: [4, 1, 7] }], "all"));
      const stepwise = await backendFor(config);
      for (let t = 0; t < prompt.length; t++) {
        const r = await stepwise.step(batchOf([{ tokens: [prompt[t]], past: t, blocks: [4, 1, 7] }], "last"));
        assertNear(row(r.logits, 0, vocab), row(whole.logits, t, vocab), 1e-5, `position ${t}`);
        if (t === prompt.length - 1) assert.equal(r.tokens[0], whole.tokens[0]);
      }
    });

    it("chunked prefill (two chunks) equals the whole prompt", async () => {
      const whole = await (await backendFor(config)).step(batchOf([{ tokens: prompt, blocks: [4, 1, 7] }], "all"));
      const chunked = await backendFor(config);
      const blocks = [11, 3, 20];
      const first = await chunked.step(batchOf([{ tokens: prompt.slice(0, 5), blocks, sample: false }], "all"));
      assert.equal(first.tokens[0], -1);
      const second = await chunked.step(batchOf([{ tokens: prompt.slice(5), past: 5, blocks }], "all"));
      assertNear(first.logits!, whole.logits!.subarray(0, 5 * vocab), 1e-5, "first chunk");
      assertNear(second.logits!, whole.logits!.subarray(5 * vocab), 1e-5, "second chunk");
      assert.equal(second.tokens[0], whole.tokens[0]);
    });

    it("a mixed batch (decode, prefill, second chunk) gives exactly what each sequence gives alone", async () => {
      const a = { prompt: prompt.slice(0, 9), blocks: [6, 0, 13] };
      const b = { tokens: [9, 8, 7, 6, 5, 4, 3], blocks: [2, 25] };
      const c = { tokens: prompt.slice(3, 12), blocks: [17, 5, 8] };
      const sampled = { temperature: 0.9, seed: 77, counter: 3 };
      const setup = [
        { tokens: a.prompt, blocks: a.blocks },
        { tokens: c.tokens.slice(0, 4), blocks: c.blocks, sample: false },
      ];
      const final: Seq[] = [
        { tokens: [50], past: 9, blocks: a.blocks, ...sampled },
        { tokens: b.tokens, blocks: b.blocks, ...sampled, seed: 78 },
        { tokens: c.tokens.slice(4), past: 4, blocks: c.blocks, ...sampled, seed: 79 },
      ];

      const together = await backendFor(config);
      await together.step(batchOf(setup));
      const mixed = await together.step(batchOf(final, "last", 2));

      const alone = await backendFor(config);
      for (const s of setup) await alone.step(batchOf([s]));
      const each: StepResult[] = [];
      for (const s of final) each.push(await alone.step(batchOf([s], "last", 2)));

      final.forEach((_, i) => {
        assert.deepEqual(row(mixed.logits, i, vocab), each[i].logits, `sequence ${i} logits`);
        assert.equal(mixed.tokens[i], each[i].tokens[0]);
        assert.equal(mixed.logprobs[i], each[i].logprobs[0]);
        assert.deepEqual(mixed.topTokens.subarray(2 * i, 2 * i + 2), each[i].topTokens);
      });
    });
  });
}

describe("CPU backend: step results", () => {
  const config = configs.llama;
  const vocab = config.vocabSize;

  it("reports log-probs of the raw logits, the best alternatives, and -1 where nothing is sampled", async () => {
    const backend = await backendFor(config);
    const seqs: Seq[] = [
      { tokens: prompt.slice(0, 6), blocks: [0, 1], temperature: 1, seed: 3 },
      { tokens: prompt.slice(6), blocks: [2, 3], sample: false },
    ];
    const r: StepResult = await backend.step(batchOf(seqs, "last", 4));
    assert.equal(r.logits!.length, 2 * vocab);
    const logits = row(r.logits, 0, vocab);
    const max = Math.max(...logits);
    const logZ = max + Math.log(logits.reduce((s, x) => s + Math.exp(x - max), 0));
    assert.ok(Math.abs(r.logprobs[0] - (logits[r.tokens[0]] - logZ)) < 1e-5);
    const best = Array.from(logits.keys()).sort((x, y) => logits[y] - logits[x] || x - y);
    assert.deepEqual(Array.from(r.topTokens.subarray(0, 4)), best.slice(0, 4));
    r.topTokens.subarray(0, 4).forEach((t, j) => assert.ok(Math.abs(r.topLogprobs[j] - (logits[t] - logZ)) < 1e-5));
    assert.equal(r.tokens[1], -1);
    assert.deepEqual(r.topTokens.subarray(4), new Int32Array([-1, -1, -1, -1]));
  });

  it("returns no logits unless asked, and one row per new token for 'all'", async () => {
    const backend = await backendFor(config);
    const none = await backend.step(batchOf([{ tokens: [1, 2, 3], blocks: [0] }]));
    assert.equal(none.logits, undefined);
    const seqs = [
      { tokens: [4, 5], past: 3, blocks: [0, 1] },
      { tokens: [6], blocks: [2] },
    ];
    const all = await backend.step(batchOf(seqs, "all"));
    assert.equal(all.logits!.length, 3 * vocab);
  });

  it("computes a step in a later turn of the event loop, not in the microtasks of the caller that asked for it", async () => {
    // The engine asks for the next call before it hands out the last one's tokens: those must not wait
    // behind the computation.
    const backend = await backendFor(config);
    const order: string[] = [];
    const step = backend.step(batchOf([{ tokens: prompt.slice(0, 4), blocks: [0] }])).then(() => order.push("step"));
    setImmediate(() => order.push("turn"));
    await step;
    assert.deepEqual(order, ["turn", "step"]);
  });

  it("takes a row's input from the row of the call before that it names, asked for before that result is back", async () => {
    const backend = await backendFor(config);
    const seqs: Seq[] = [
      { tokens: prompt.slice(0, 5), blocks: [0, 1, 2, 3], temperature: 1, seed: 3 },
      { tokens: prompt.slice(5, 8), blocks: [4, 5, 6, 7] },
    ];
    const first = await backend.step(batchOf(seqs));
    /** Sequence i's decode row k steps past its first token, fed `token`. */
    const decode = (i: number, k: number, token = 0): Seq => ({ ...seqs[i], tokens: [token], past: seqs[i].tokens.length + k, counter: k + 1 });
    const explicit = await backend.step({ ...batchOf([decode(0, 0, first.tokens[0]), decode(1, 0, first.tokens[1])]), steps: 6 });
    // Two steps; then one with the rows swapped beside a new prompt (host tokens); then three more.
    const fresh: Seq = { tokens: prompt.slice(8, 12), blocks: [8, 9] };
    const [head, middle, tail] = await Promise.all([
      backend.step({ ...batchOf([decode(0, 0, first.tokens[0]), decode(1, 0, first.tokens[1])]), steps: 2 }),
      backend.step({ ...batchOf([decode(1, 2), fresh, decode(0, 2)]), fromPrevious: Int32Array.of(1, -1, 0) }),
      backend.step({ ...batchOf([decode(0, 3), decode(1, 3)]), steps: 3, fromPrevious: Int32Array.of(2, 0) }),
    ]);
    const byStep = (k: number) => [explicit.tokens[2 * k], explicit.tokens[2 * k + 1]];
    assert.deepEqual([...head.tokens], [...byStep(0), ...byStep(1)]);
    assert.deepEqual([middle.tokens[2], middle.tokens[0]], byStep(2));
    assert.deepEqual([...tail.tokens], [...byStep(3), ...byStep(4), ...byStep(5)]);
    const alone = await backend.step(batchOf([fresh]));
    assert.equal(middle.tokens[1], alone.tokens[0], "the new prompt ran as it would alone");
    // A row the step before sampled nothing for, or does not have. A refused batch is no step: the rows of
    // the step before it are still there for the next.
    await backend.step(batchOf([{ ...seqs[0], sample: false }, seqs[1]]));
    const carried = (rows: number[]) => ({ ...batchOf([decode(0, 0), decode(1, 0)]), fromPrevious: Int32Array.from(rows) });
    await assert.rejects(backend.step(carried([0, 1])), /fromPrevious\[0\] = 0 names a row the step before sampled no token for/);
    await backend.step(batchOf(seqs));
    await assert.rejects(backend.step(carried([1, 2])), /fromPrevious\[1\] = 2 names a row/);
    await assert.rejects(backend.step({ ...carried([0, 1]), steps: 0 }), /steps = 0/);
    assert.deepEqual([...(await backend.step(carried([0, 1]))).tokens], [...explicit.tokens.slice(0, 2)]);
  });

  it("samples each sequence with its own penalties and history", async () => {
    const backend = await backendFor(config);
    const seqs: Seq[] = [
      { tokens: [10, 11], blocks: [0], history: [10, 11, 12], promptLen: 2, repetitionPenalty: 3 },
      { tokens: [20], blocks: [1], history: [20], promptLen: 1, repetitionPenalty: 1.5, temperature: 0.7, seed: 9 },
    ];
    const batch = batchOf(seqs, "last");
    const r = await backend.step(batch);
    seqs.forEach((_, i) => {
      assert.equal(r.tokens[i], nextToken(row(r.logits, i, vocab), samplingParams(batch.sampling, i)));
    });
    assert.deepEqual(Array.from(samplingParams(batch.sampling, 1).history), [20]);
  });

  it("counts a carried row's input into its penalty history, as the last generated token", async () => {
    const ran: StepBatch[] = [];
    const sampled = [Int32Array.of(7, 9), Int32Array.of(5, 6)];
    const calls = new StepSequence(
      () => {},
      async (b) => {
        ran.push(b);
        const tokens = sampled[ran.length - 1];
        return { tokens, logprobs: new Float32Array(2), topTokens: new Int32Array(0), topLogprobs: new Float32Array(0) };
      },
    );
    const withPenalty: Seq = { tokens: [1, 2, 3], blocks: [0], history: [1, 2, 3], promptLen: 3, repetitionPenalty: 2 };
    const plain: Seq = { tokens: [4], blocks: [1] };
    await calls.step(batchOf([plain, withPenalty]));
    await calls.step({ ...batchOf([{ ...withPenalty, tokens: [0], past: 3 }, { ...plain, tokens: [0], past: 1 }]), fromPrevious: Int32Array.of(1, 0) });
    assert.deepEqual([...ran[1].tokens], [9, 7]);
    assert.deepEqual([...ran[1].sampling.history], [1, 2, 3, 9]);
    assert.deepEqual([...ran[1].sampling.historyStarts], [0, 4, 4]);
    assert.deepEqual([...ran[1].sampling.promptLens], [3, 0]);
  });

  it("runs bfloat16 weights as their fp32 values", async () => {
    const tensors = randomWeights(config, 4);
    const rounded = new Map([...tensors].map(([k, v]) => [k, toFloat32(fromFloat32(v, "bfloat16"), "bfloat16")]));
    const batch = batchOf([{ tokens: prompt, blocks: [0, 1, 2] }], "all");
    const bf16 = await (await backendFor(config, tensors, "bfloat16")).step(batch);
    const fp32 = await (await backendFor(config, rounded)).step(batch);
    assert.deepEqual(bf16.logits, fp32.logits);
  });

  it("defaults to blocks of 16 and room for 64 full-context sequences", async () => {
    const source = float32Source(randomWeights(config, 1), expectedShapes(config));
    const weights = await packWeights(source, config, "float32");
    assert.deepEqual(new CpuBackend(weights).kv, { blockSize: 16, numBlocks: 64 * 4 });
    assert.deepEqual(new CpuBackend(weights, { blockSize: 8 }).kv, { blockSize: 8, numBlocks: 64 * 8 });
    assert.throws(() => new CpuBackend(weights, { blockSize: 0 }), /blockSize 0 must be a positive integer/);
  });
});

describe("CPU backend: bad batches", () => {
  const config = configs.llama;
  const good = (): StepBatch => batchOf([{ tokens: [1, 2, 3], blocks: [0] }, { tokens: [4], past: 4, blocks: [1, 2] }]);
  const cases: [string, (b: StepBatch) => void, RegExp][] = [
    ["a token outside the vocabulary", (b) => (b.tokens[2] = 96), /^step batch: tokens\[2\] = 96 is outside the vocab/],
    ["a negative token", (b) => (b.tokens[0] = -1), /tokens\[0\] = -1/],
    ["queryStarts that do not cover the tokens", (b) => (b.queryStarts[2] = 3), /queryStarts must run from 0 to/],
    ["a sequence with no new tokens", (b) => (b.queryStarts[1] = 0), /sequence 0 has 0 new tokens/],
    ["a context shorter than its new tokens", (b) => (b.contextLens[0] = 2), /contextLens\[0\] = 2 is less than/],
    ["a context past the model", (b) => (b.contextLens[1] = 65), /contextLens\[1\] = 65 exceeds the model's 64/],
    ["a block table too narrow", (b) => (b.contextLens[1] = 9), /sequence 1 needs 3 KV blocks for 9 tokens/],
    ["a block outside the pool", (b) => (b.blockTables[3] = 32), /blockTables\[3\] = 32 \(sequence 1\) is outside/],
    ["a missing sample flag", (b) => (b.sample = new Uint8Array(1)), /sample has 1 entries, expected 2/],
    ["top-p of 0", (b) => (b.sampling.topP[1] = 0), /sampling\.topP\[1\] = 0 must be in \(0, 1\]/],
    ["a negative temperature", (b) => (b.sampling.temperature[0] = -1), /sampling\.temperature\[0\] = -1 must be >= 0/],
    ["a NaN penalty", (b) => (b.sampling.presencePenalty[0] = NaN), /presencePenalty\[0\] = NaN must be finite/],
    ["too many top log-probs", (b) => (b.sampling.topLogprobs = 97), /sampling\.topLogprobs = 97/],
    ["a carried row with a prefill", (b) => (b.fromPrevious = Int32Array.of(0, -1)), /fromPrevious\[0\] = 0: sequence 0 must have one new token/],
    ["a carried row that does not sample", (b) => ((b.fromPrevious = Int32Array.of(-1, 0)), (b.sample[1] = 0)), /sequence 1 must sample/],
    ["a negative row to carry from", (b) => (b.fromPrevious = Int32Array.of(-1, -2)), /fromPrevious\[1\] = -2 must be -1 or a row of the step before/],
    ["a row to carry from per sequence missing", (b) => (b.fromPrevious = Int32Array.of(-1)), /fromPrevious has 1 entries, expected 2/],
    [
      "a history token outside the vocabulary",
      (b) => {
        b.sampling.history = new Int32Array([5, 100]);
        b.sampling.historyStarts = new Int32Array([0, 2, 2]);
      },
      /sampling\.history\[1\] = 100 is outside the vocabulary/,
    ],
  ];

  it("refuses carried rows where the backend takes no input from the step before", () => {
    const batch = { ...good(), fromPrevious: Int32Array.of(-1, 0) };
    const kv = { numBlocks: 32, blockSize: 4 };
    validateBatch(batch, { config, kv, maxSteps: 1, carries: true });
    assert.throws(() => validateBatch(batch, { config, kv, maxSteps: 1, carries: false }), /takes no input from the step before/);
    validateBatch({ ...batch, fromPrevious: Int32Array.of(-1, -1) }, { config, kv, maxSteps: 1, carries: false });
  });

  for (const [what, spoil, message] of cases) {
    it(`refuses ${what}, in one line`, async () => {
      const backend = await backendFor(config);
      const batch = good();
      await backend.step(batch); // the unspoiled batch runs
      spoil(batch);
      await assert.rejects(backend.step(batch), (e: unknown) => {
        assert.ok(e instanceof DecimaError && e.kind === "input", String(e));
        assert.match(e.message, message);
        assert.ok(!e.message.includes("\n"));
        return true;
      });
    });
  }
});
