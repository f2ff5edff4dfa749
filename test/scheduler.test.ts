import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { DecimaError } from "../src/errors.js";
import { type SamplingOptions, parseSamplingParams } from "../src/runtime/sampling-params.js";
import { type ScheduledStep, Scheduler, type SchedulerOptions } from "../src/runtime/scheduler.js";
import { Sequence, type SequenceKind } from "../src/runtime/sequence.js";
import { promptOf, testTokenizer, tinyConfig } from "./tiny-engine.js";

const config = tinyConfig(64);

/** What a scheduler takes from its backend. */
type Limits = ConstructorParameters<typeof Scheduler>[3] & {};

function seqOf(prompt: number[], options: SamplingOptions = {}, kind: SequenceKind = "generate"): Sequence {
  const ctx = { tokenizer: testTokenizer(), eosIds: [0], contextLength: config.maxPositionEmbeddings };
  return new Sequence(prompt, parseSamplingParams({ ignoreEos: true, ...options }), kind, ctx);
}

function scheduler(numBlocks: number, blockSize: number, opts: SchedulerOptions = {}): Scheduler {
  return new Scheduler(config, { numBlocks, blockSize }, opts);
}

/** Run a scheduled step as if a backend had: commit it and give every sampling sequence a token. */
function complete(s: Scheduler, step: ScheduledStep, token = 42): void {
  step.seqs.forEach((seq, i) => {
    s.commit(seq, step.queryLens[i]);
    s.cache(seq);
    if (step.batch.sample[i]) seq.take(token);
  });
}

function refusal(fn: () => void): DecimaError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof DecimaError);
    return err;
  }
  assert.fail("expected a refusal");
}

describe("Scheduler", () => {
  it("prefills a long prompt in chunks within the step budget, sampling only after the last", () => {
    const s = scheduler(16, 4, { maxBatchTokens: 8 });
    const prompt = promptOf(20, 1);
    const seq = seqOf(prompt, { maxTokens: 4 });
    s.add(seq);
    const expected = [
      { from: 0, to: 8, sample: 0, width: 2 },
      { from: 8, to: 16, sample: 0, width: 4 },
      { from: 16, to: 20, sample: 1, width: 5 },
    ];
    for (const e of expected) {
      const step = s.schedule()!;
      assert.deepEqual([...step.batch.tokens], prompt.slice(e.from, e.to));
      assert.deepEqual([...step.batch.queryStarts], [0, e.to - e.from]);
      assert.deepEqual([...step.batch.contextLens], [e.to]);
      assert.deepEqual([...step.batch.sample], [e.sample]);
      assert.equal(step.batch.blockTableWidth, e.width);
      assert.equal(step.batch.returnLogits, "none");
      complete(s, step);
    }
    const decode = s.schedule()!;
    assert.deepEqual([...decode.batch.tokens], [42]);
    assert.deepEqual([...decode.batch.contextLens], [21]);
    assert.deepEqual([...decode.batch.sample], [1]);
    assert.equal(decode.batch.sampling.counter[0], 1);
  });

  it("batches a decode token of every running sequence with the prefill of newcomers", () => {
    const s = scheduler(32, 4, { maxBatchTokens: 10 });
    const a = seqOf(promptOf(6, 1), { maxTokens: 4 });
    s.add(a);
    complete(s, s.schedule()!);
    const b = seqOf(promptOf(15, 2), { maxTokens: 4 });
    const c = seqOf(promptOf(3, 3), { maxTokens: 4 });
    s.add(b);
    s.add(c);
    const step = s.schedule()!;
    assert.deepEqual(step.seqs, [a, b]);
    assert.deepEqual(step.queryLens, [1, 9]);
    assert.deepEqual([...step.batch.queryStarts], [0, 1, 10]);
    assert.deepEqual([...step.batch.contextLens], [7, 9]);
    assert.deepEqual([...step.batch.sample], [1, 0]);
    assert.equal(s.numWaiting, 1, "c waits: the budget is spent");
    complete(s, step);

    const next = s.schedule()!;
    assert.deepEqual(next.seqs, [a, b, c]);
    assert.deepEqual(next.queryLens, [1, 6, 3]);
    // One block-table width for the batch; each row lists its sequence's own blocks.
    assert.equal(next.batch.blockTableWidth, 4);
    const rows = [0, 1, 2].map((i) => [...next.batch.blockTables.subarray(i * 4, i * 4 + 4)]);
    assert.deepEqual(rows[0].slice(0, 2), a.blocks!.table.slice(0, 2));
    assert.deepEqual(rows[1], b.blocks!.table.slice(0, 4));
    assert.deepEqual(rows[2].slice(0, 1), c.blocks!.table.slice(0, 1));
    const all = [...a.blocks!.table, ...b.blocks!.table, ...c.blocks!.table];
    assert.equal(new Set(all).size, all.length, "no block is shared");
  });

  it("reserves every block a request can need, and admits in arrival order", () => {
    const s = scheduler(4, 4);
    const a = seqOf(promptOf(8, 1), { maxTokens: 4 }); // 8 + 4 - 1 = 11 cached tokens: 3 blocks
    const b = seqOf(promptOf(5, 2), { maxTokens: 4 }); // 8 tokens: 2 blocks
    const c = seqOf(promptOf(2, 3), { maxTokens: 1 }); // 2 tokens: 1 block, but it came after b
    for (const seq of [a, b, c]) s.add(seq);
    const step = s.schedule()!;
    assert.deepEqual(step.seqs, [a]);
    assert.equal(a.blocks!.reserved, 1);
    assert.equal(s.blocks.availableBlocks, 1);
    assert.equal(s.numWaiting, 2);
    complete(s, step);

    s.remove(a);
    assert.equal(s.blocks.usedBlocks, 0);
    assert.deepEqual(s.schedule()!.seqs, [b, c]);
    assert.equal(s.numWaiting, 0);
  });

  it("refuses at once what can never run, and requests past the queue bound", () => {
    const s = scheduler(4, 4, { maxWaiting: 2 });
    const long = refusal(() => s.add(seqOf(promptOf(64, 1))));
    assert.equal(long.kind, "input");
    assert.equal(long.message, "the prompt has 64 tokens; the model's context length is 64");
    const huge = refusal(() => s.add(seqOf(promptOf(10, 1), { maxTokens: 10 })));
    assert.equal(huge.kind, "input");
    assert.equal(
      huge.message,
      "the request needs 5 KV blocks of 4 tokens (10 prompt tokens + maxTokens 10); the KV pool has 4",
    );
    s.add(seqOf(promptOf(3, 1), { maxTokens: 1 }));
    s.add(seqOf(promptOf(3, 2), { maxTokens: 1 }));
    const full = refusal(() => s.add(seqOf(promptOf(3, 3), { maxTokens: 1 })));
    assert.equal(full.kind, "capacity");
    assert.equal(full.status, 503);
  });

  it("caps the cache at the context length", () => {
    const s = scheduler(16, 4);
    const seq = seqOf(promptOf(60, 1), { maxTokens: 100 }); // stops at 64 tokens: 63 in the cache
    s.add(seq);
    s.schedule();
    assert.equal(seq.blocks!.reserved + seq.blocks!.table.length, 16);
  });

  it("sends token history only for sequences with penalties, and the largest logprobs count", () => {
    const s = scheduler(32, 4);
    const a = seqOf(promptOf(5, 1), { repetitionPenalty: 1.2, seed: 7, logprobs: 3 });
    const b = seqOf(promptOf(4, 2), { temperature: 0.5, topK: 5, topP: 0.9, minP: 0.1, seed: 9, logprobs: 1 });
    s.add(a);
    s.add(b);
    complete(s, s.schedule()!);
    const step = s.schedule()!;
    const sp = step.batch.sampling;
    assert.deepEqual([...sp.historyStarts], [0, 6, 6]);
    assert.deepEqual([...sp.history], [...promptOf(5, 1), 42]);
    assert.deepEqual([...sp.promptLens], [5, 0]);
    assert.deepEqual([...sp.counter], [1, 1]);
    assert.deepEqual([...sp.seed], [7, 9]);
    assert.deepEqual([...sp.repetitionPenalty], [Math.fround(1.2), 1]);
    assert.deepEqual([...sp.temperature], [0, 0.5]);
    assert.deepEqual([...sp.topK], [0, 5]);
    assert.deepEqual([...sp.topP], [1, Math.fround(0.9)]);
    assert.deepEqual([...sp.minP], [0, Math.fround(0.1)]);
    assert.equal(sp.topLogprobs, 3);
  });

  it("starts a cached prompt after its cached blocks, and computes prompt log-probs without the cache", () => {
    const s = scheduler(32, 4);
    const prompt = promptOf(10, 1);
    const a = seqOf(prompt);
    s.add(a);
    complete(s, s.schedule()!);
    s.remove(a);

    const b = seqOf(prompt);
    s.add(b);
    const step = s.schedule()!;
    assert.equal(b.blocks!.cachedTokens, 8);
    assert.deepEqual([...step.batch.tokens], prompt.slice(8));
    assert.deepEqual([...step.batch.contextLens], [10]);
    s.remove(b);

    const c = seqOf(prompt, { promptLogprobs: true });
    s.add(c);
    const withLogits = s.schedule()!;
    assert.equal(c.blocks!.cachedTokens, 0);
    assert.equal(withLogits.batch.returnLogits, "all");
    assert.deepEqual([...withLogits.batch.tokens], prompt);
    s.remove(c);
    assert.equal(s.blocks.usedBlocks, 0);
    assert.equal(s.blocks.availableBlocks, 32);
  });

  it("runs a logits sequence over its whole prompt without sampling", () => {
    const s = scheduler(32, 4, { maxBatchTokens: 6 });
    const seq = seqOf(promptOf(64, 1), {}, "logits");
    s.add(seq);
    let steps = 0;
    for (let step = s.schedule(); step; step = s.schedule()) {
      assert.deepEqual([...step.batch.sample], [0]);
      assert.equal(step.batch.returnLogits, "all");
      complete(s, step);
      steps++;
      if (!seq.inPrefill) break;
    }
    assert.equal(steps, 11);
    assert.equal(seq.blocks!.table.length, 16);
  });

  it("plans the next call from the one in flight: positions, draws and inputs counted on, within budgets", () => {
    // A device backend that carries rows: async scheduling is on by default.
    const limits: Limits = { device: "cuda", maxBatchTokens: 64, maxBatchSeqs: 8, maxSteps: 16, carries: true };
    const s = new Scheduler(config, { numBlocks: 64, blockSize: 4 }, { decodeSteps: 6 }, limits);
    const a = seqOf(promptOf(5, 1), { maxTokens: 14 });
    const b = seqOf(promptOf(3, 2), { maxTokens: 30, temperature: 1 });
    s.add(a);
    s.add(b);
    const prefill = s.schedule()!;
    // The first decode call is planned while the prompts run: its inputs are the tokens they sample.
    const first = s.schedule(prefill)!;
    assert.deepEqual([...first.batch.fromPrevious!], [0, 1]);
    assert.deepEqual([...first.batch.contextLens], [6, 4]);
    assert.deepEqual([...first.batch.sampling.counter], [1, 1]);
    assert.equal(first.batch.steps, 6);
    complete(s, prefill);
    const next = s.schedule(first)!;
    assert.deepEqual(next.seqs, [a, b]);
    assert.deepEqual([...next.batch.fromPrevious!], [0, 1]);
    assert.equal(next.batch.steps, 6);
    assert.deepEqual([...next.batch.contextLens], [5 + 6 + 1, 3 + 6 + 1]);
    assert.deepEqual([...next.batch.sampling.counter], [1 + 6, 1 + 6]);
    assert.deepEqual([...next.batch.sample], [1, 1]);
    assert.ok(next.batch.blockTableWidth >= Math.ceil((5 + 6 + 6) / 4));
    // The first call's result: a has 13 tokens to go after its first, 6 of them in the call now in flight.
    for (const seq of [a, b]) for (let k = 0; k < 6; k++) complete(s, { ...first, seqs: [seq], queryLens: [1] });
    // Two requests arrive: they are admitted into the queued call with their prompts, one step long.
    const c = seqOf(promptOf(4, 3));
    const d = seqOf(promptOf(2, 4), { repetitionPenalty: 1.2 });
    s.add(c);
    s.add(d);
    const mixed = s.schedule(next)!;
    assert.deepEqual(mixed.seqs, [a, b, c, d]);
    assert.deepEqual(mixed.queryLens, [1, 1, 4, 2]);
    assert.deepEqual([...mixed.batch.fromPrevious!], [0, 1, -1, -1]);
    assert.deepEqual([...mixed.batch.tokens.slice(2)], [...promptOf(4, 3), ...promptOf(2, 4)]);
    assert.equal(mixed.batch.steps, 1);
    // Behind it: a has no token left; c and d decode from their prompts' samples, d's penalty history
    // lacking that token (the backend counts it in); one step, as d's penalties need the host between steps.
    for (let k = 0; k < 6; k++) complete(s, { ...next, seqs: [a, b], queryLens: [1, 1] });
    const behind = s.schedule(mixed)!;
    assert.deepEqual(behind.seqs, [b, c, d]);
    assert.deepEqual([...behind.batch.fromPrevious!], [1, 2, 3]);
    assert.deepEqual([...behind.batch.contextLens], [3 + 12 + 1 + 1, 4 + 1, 2 + 1]);
    const h = behind.batch.sampling;
    assert.deepEqual([...h.history.subarray(h.historyStarts[2], h.historyStarts[3])], promptOf(2, 4));
    assert.equal(behind.batch.steps, 1);
    // A prompt in chunks: the next chunk is planned behind the one in flight, from host tokens.
    const chunked = new Scheduler(config, { numBlocks: 16, blockSize: 4 }, { maxBatchTokens: 8 }, limits);
    const long = seqOf(promptOf(20, 5));
    chunked.add(long);
    const chunk = chunked.schedule(chunked.schedule()!)!;
    assert.deepEqual([...chunk.batch.tokens], promptOf(20, 5).slice(8, 16));
    assert.deepEqual([...chunk.batch.fromPrevious!], [-1]);
    assert.deepEqual([...chunk.batch.sample], [0]);
    // Without async scheduling nothing is planned behind a call in flight: where the backend carries no
    // rows, where it is turned off, and by default on the CPU backend (nothing would overlap its steps).
    const queuesAhead = (opts: SchedulerOptions, backend: Partial<Limits>) => {
      const plain = new Scheduler(config, { numBlocks: 16, blockSize: 4 }, opts, { ...limits, ...backend });
      plain.add(seqOf(promptOf(4, 6)));
      return plain.schedule(plain.schedule()!) !== null;
    };
    assert.equal(queuesAhead({}, { carries: false }), false);
    assert.equal(queuesAhead({ asyncScheduling: true }, { carries: false }), false);
    assert.equal(queuesAhead({ asyncScheduling: false }, {}), false);
    assert.equal(queuesAhead({}, { device: "cpu" }), false);
    assert.equal(queuesAhead({ asyncScheduling: true }, { device: "cpu" }), true);
    assert.equal(queuesAhead({}, {}), true);
  });

  it("bounds a multi-step call by the measured time per decode step", () => {
    const limits: Limits = { device: "cuda", maxBatchTokens: 64, maxBatchSeqs: 8, maxSteps: 16, carries: false };
    const s = new Scheduler(config, { numBlocks: 64, blockSize: 4 }, { decodeSteps: 16, maxCallMs: 10 }, limits);
    const seq = seqOf(promptOf(4, 1), { maxTokens: 50 });
    s.add(seq);
    complete(s, s.schedule()!); // the prompt
    const decode = () => {
      const step = s.schedule()!;
      for (let k = 0; k < step.batch.steps!; k++) {
        s.commit(seq, 1);
        seq.take(42);
      }
      return step;
    };
    const first = decode();
    assert.equal(first.batch.steps, 16, "nothing measured yet");
    s.observe(first, 16 * 2.5);
    assert.equal(decode().batch.steps, 4, "10 ms at 2.5 ms per step");
    s.observe(s.schedule()!, 1e6 / 100); // a slow call: one step per call, never none
    assert.equal(s.schedule()!.batch.steps, 1);
    // With async scheduling the default call is half as long: the call queued behind it waits too.
    const queued = new Scheduler(config, { numBlocks: 64, blockSize: 4 }, { decodeSteps: 16 }, { ...limits, carries: true });
    const other = seqOf(promptOf(4, 2), { maxTokens: 50 });
    queued.add(other);
    complete(queued, queued.schedule()!);
    queued.observe(queued.schedule()!, 16 * 2.5);
    assert.equal(queued.schedule()!.batch.steps, 2, "5 ms at 2.5 ms per step");
  });
});
