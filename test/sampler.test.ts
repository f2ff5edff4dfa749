import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  type SamplingParams,
  applyPenalties,
  drawToken,
  keepThreshold,
  mostLikely,
  nextToken,
  sampleSequence,
} from "../src/engine/cpu/sampler.js";
import { fmix32, uniformDraw } from "../src/engine/sampling-rng.js";

/** Greedy, no filters, no penalties: tests switch on what they check. */
function params(over: Partial<SamplingParams> = {}): SamplingParams {
  return {
    temperature: 0,
    topK: 0,
    topP: 1,
    minP: 0,
    repetitionPenalty: 1,
    frequencyPenalty: 0,
    presencePenalty: 0,
    seed: 0,
    counter: 0,
    history: new Int32Array(0),
    promptLen: 0,
    ...over,
  };
}

const logitsOf = (probs: number[]) => Float32Array.from(probs, Math.log);

/** The tokens a threshold keeps. */
function kept(probs: number[], p: Partial<SamplingParams>): number[] {
  const x = Float32Array.from(probs);
  const threshold = keepThreshold(x, params(p));
  return probs.flatMap((_, t) => (x[t] >= threshold ? [t] : []));
}

describe("the random draw", () => {
  it("fmix32 is MurmurHash3's finalizer (checked with BigInt arithmetic)", () => {
    const mul = (a: bigint, b: bigint) => (a * b) & 0xffffffffn;
    const reference = (v: number) => {
      let x = BigInt(v);
      x ^= x >> 16n;
      x = mul(x, 0x85ebca6bn);
      x ^= x >> 13n;
      x = mul(x, 0xc2b2ae35n);
      x ^= x >> 16n;
      return Number(x);
    };
    for (const v of [0, 1, 2, 0x9e3779b9, 0xdeadbeef, 0xffffffff, 123456789]) assert.equal(fmix32(v), reference(v));
    assert.equal(fmix32(0), 0);
  });

  it("uniformDraw is fixed by (seed, counter), in [0, 1) on a 2^-24 grid", () => {
    const expected = (seed: number, counter: number) =>
      (fmix32((seed ^ fmix32((counter ^ 0x9e3779b9) >>> 0)) >>> 0) >>> 8) / 2 ** 24;
    for (const [seed, counter] of [[0, 0], [1, 0], [0, 1], [42, 7], [0xffffffff, 0xffffffff]]) {
      const u = uniformDraw(seed, counter);
      assert.equal(u, expected(seed, counter));
      assert.ok(u >= 0 && u < 1 && Number.isInteger(u * 2 ** 24));
    }
    assert.notEqual(uniformDraw(42, 7), uniformDraw(42, 8));
    assert.notEqual(uniformDraw(42, 7), uniformDraw(43, 7));
  });

  it("is uniform: a million draws fill 16 bins evenly", () => {
    const bins = new Array<number>(16).fill(0);
    const n = 1 << 20;
    for (let c = 0; c < n; c++) bins[Math.floor(uniformDraw(99, c) * 16)]++;
    const chi2 = bins.reduce((s, b) => s + (b - n / 16) ** 2 / (n / 16), 0);
    assert.ok(chi2 < 37.7, `chi-square ${chi2} (15 degrees of freedom, p = 0.001 at 37.7)`);
  });
});

describe("greedy", () => {
  it("temperature 0 takes the argmax, the lowest id on ties", () => {
    assert.equal(nextToken(new Float32Array([0.1, 3, -1, 2]), params()), 1);
    assert.equal(nextToken(new Float32Array([1, 5, 5, 5]), params()), 1);
  });

  it("applies the penalties first", () => {
    const history = new Int32Array([1]);
    assert.equal(nextToken(new Float32Array([2, 3]), params({ repetitionPenalty: 2, history, promptLen: 1 })), 0);
  });
});

describe("penalties", () => {
  it("repetition over the distinct history tokens, then frequency and presence over the generated ones", () => {
    const logits = new Float32Array([2, -1, 0.5, 3, -2]);
    // Prompt [0, 1], generated [3, 3, 4].
    const history = new Int32Array([0, 1, 3, 3, 4]);
    const penalties = { repetitionPenalty: 2, frequencyPenalty: 0.5, presencePenalty: 0.25 };
    applyPenalties(logits, params({ history, promptLen: 2, ...penalties }));
    // Repetition: 2 -> 1, -1 -> -2, 3 -> 1.5, -2 -> -4 (token 3 once, although it repeats; 2 untouched).
    // Then token 3: 1.5 - (2 * 0.5 + 0.25) = 0.25; token 4: -4 - (0.5 + 0.25) = -4.75.
    assert.deepEqual(logits, new Float32Array([1, -2, 0.5, 0.25, -4.75]));
  });

  it("frequency and presence leave the prompt alone", () => {
    const logits = new Float32Array([1, 1, 1]);
    const history = new Int32Array([0, 0, 1]);
    applyPenalties(logits, params({ history, promptLen: 3, frequencyPenalty: 1, presencePenalty: 1 }));
    assert.deepEqual(logits, new Float32Array([1, 1, 1]));
  });

  it("do not touch the caller's logits", () => {
    const logits = new Float32Array([2, 3]);
    nextToken(logits, params({ repetitionPenalty: 2, history: new Int32Array([1]), promptLen: 1 }));
    assert.deepEqual(logits, new Float32Array([2, 3]));
  });
});

describe("filters keep exact sets", () => {
  const probs = [0.1, 0.3, 0.2, 0.3, 0.1];

  it("top-k keeps every token tied with the k-th largest", () => {
    assert.deepEqual(kept(probs, { topK: 1 }), [1, 3]);
    assert.deepEqual(kept(probs, { topK: 2 }), [1, 3]);
    assert.deepEqual(kept(probs, { topK: 3 }), [1, 2, 3]);
    assert.deepEqual(kept(probs, { topK: 4 }), [0, 1, 2, 3, 4]);
    assert.deepEqual(kept(probs, { topK: 5 }), [0, 1, 2, 3, 4]);
    assert.deepEqual(kept(probs, { topK: 0 }), [0, 1, 2, 3, 4]);
  });

  it("top-p keeps the most likely tokens until they reach top_p of the kept mass", () => {
    const p = [0.05, 0.4, 0.25, 0.2, 0.1];
    assert.deepEqual(kept(p, { topP: 0.3 }), [1]);
    assert.deepEqual(kept(p, { topP: 0.6 }), [1, 2]);
    assert.deepEqual(kept(p, { topP: 0.7 }), [1, 2, 3]);
    assert.deepEqual(kept(p, { topP: 0.99 }), [0, 1, 2, 3, 4]);
    // After top-k 3 the kept mass is 0.85: 0.8 of it (0.68) is reached at 0.2; 0.5 of 0.65 at 0.4.
    assert.deepEqual(kept(p, { topK: 3, topP: 0.8 }), [1, 2, 3]);
    assert.deepEqual(kept(p, { topK: 2, topP: 0.5 }), [1]);
    // Ties with the boundary token are kept.
    assert.deepEqual(kept([0.3, 0.3, 0.3, 0.1], { topP: 0.5 }), [0, 1, 2]);
  });

  it("min-p keeps tokens with at least min_p times the largest prob", () => {
    const p = [0.05, 0.4, 0.25, 0.2, 0.1];
    assert.deepEqual(kept(p, { minP: 0.5 }), [1, 2, 3]);
    assert.deepEqual(kept(p, { minP: 0.6 }), [1, 2]);
    assert.deepEqual(kept(p, { minP: 0.6, topK: 1 }), [1]);
    assert.deepEqual(kept(p, { minP: 0.1 }), [0, 1, 2, 3, 4]);
  });
});

describe("the draw", () => {
  it("walks kept tokens in id order to the first whose running sum passes u * kept mass", () => {
    const probs = new Float32Array([0.25, 0.25, 0.5]);
    assert.equal(drawToken(probs, 0, 0), 0);
    assert.equal(drawToken(probs, 0, 0.49), 1);
    assert.equal(drawToken(probs, 0, 0.5), 2);
    assert.equal(drawToken(probs, 0, 0.999), 2);
    for (const u of [0, 0.3, 0.9]) assert.equal(drawToken(probs, 0.3, u), 2);
    // u * mass = 0.25 * 0.5 with tokens 1 and 2 kept (threshold 0.25): token 1's sum 0.25 passes 0.1875.
    assert.equal(drawToken(new Float32Array([0.1, 0.25, 0.25]), 0.25, 0.375), 1);
  });

  it("never picks a token of zero probability", () => {
    assert.equal(drawToken(new Float32Array([0, 1, 0]), 0, 0), 1);
    assert.equal(drawToken(new Float32Array([0, 1, 0]), 0, 0.9999), 1);
  });

  it("is reproducible for a seed and counter, and varies with the counter", () => {
    const logits = logitsOf([0.25, 0.25, 0.25, 0.25]);
    const p = params({ temperature: 1, seed: 7 });
    const draws = Array.from({ length: 64 }, (_, counter) => nextToken(logits, { ...p, counter }));
    assert.deepEqual(
      draws,
      Array.from({ length: 64 }, (_, counter) => nextToken(logits, { ...p, counter })),
    );
    assert.equal(new Set(draws).size, 4);
    // The same draw u picks the token its interval holds: u in [0.5, 0.75) is token 2.
    const counter = draws.indexOf(2);
    const u = uniformDraw(7, counter);
    assert.ok(u >= 0.5 - 1e-6 && u < 0.75 + 1e-6);
  });

  /** Pearson's chi-square of `counts` against probabilities `expected`. */
  function chiSquare(counts: number[], expected: number[], n: number): number {
    return counts.reduce((s, c, i) => s + (c - n * expected[i]) ** 2 / (n * expected[i]), 0);
  }

  function frequencies(logits: Float32Array, p: SamplingParams, n: number): number[] {
    const counts = new Array<number>(logits.length).fill(0);
    for (let counter = 0; counter < n; counter++) counts[nextToken(logits, { ...p, counter })]++;
    return counts;
  }

  it("follows the probabilities (chi-square over 20,000 counters)", () => {
    const n = 20000;
    const probs = [0.1, 0.2, 0.3, 0.4];
    const counts = frequencies(logitsOf(probs), params({ temperature: 1, seed: 1234 }), n);
    assert.ok(chiSquare(counts, probs, n) < 16.27, `counts ${counts}`); // 3 degrees of freedom, p = 0.001
  });

  it("follows the tempered, renormalized probabilities after a filter", () => {
    const n = 20000;
    // Temperature 0.5 squares the probabilities; top-k 3 drops token 0 and renormalizes the rest.
    const counts = frequencies(logitsOf([0.1, 0.2, 0.3, 0.4]), params({ temperature: 0.5, topK: 3, seed: 5 }), n);
    assert.equal(counts[0], 0);
    const z = 0.04 + 0.09 + 0.16;
    const chi2 = chiSquare(counts.slice(1), [0.04 / z, 0.09 / z, 0.16 / z], n);
    assert.ok(chi2 < 13.82, `counts ${counts}`); // 2 degrees of freedom, p = 0.001
  });
});

describe("reported log-probs", () => {
  it("come from the raw logits: the sampled token's and the most likely, best first, lower id on ties", () => {
    const logits = new Float32Array([1, 3, 2, 3, -1]);
    const history = new Int32Array([1, 3]);
    const s = sampleSequence(logits, params({ repetitionPenalty: 10, history, promptLen: 2 }), 3);
    assert.equal(s.token, 2); // penalties move the choice, not the reported log-probs
    const z = Math.log(Math.E + Math.E ** 3 * 2 + Math.E ** 2 + Math.E ** -1);
    assert.ok(Math.abs(s.logprob - (2 - z)) < 1e-6);
    assert.deepEqual(s.topTokens, new Int32Array([1, 3, 2]));
    assert.deepEqual(
      Array.from(s.topLogprobs, (v) => Number(v.toFixed(5))),
      [3 - z, 3 - z, 2 - z].map((v) => Number(v.toFixed(5))),
    );
  });

  it("mostLikely handles n = 0 and n = vocab", () => {
    const v = new Float32Array([0.5, 0.1, 0.5, 0.9]);
    assert.deepEqual(mostLikely(v, 0), new Int32Array(0));
    assert.deepEqual(mostLikely(v, 4), new Int32Array([3, 0, 2, 1]));
  });
});
