import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { DecimaError } from "../src/errors.js";
import { type SamplingOptions, parseSamplingParams } from "../src/runtime/sampling-params.js";

function refusal(options: SamplingOptions): string {
  try {
    parseSamplingParams(options);
  } catch (err) {
    assert.ok(err instanceof DecimaError);
    assert.equal(err.kind, "input");
    return err.message;
  }
  assert.fail(`accepted ${JSON.stringify(options)}`);
}

describe("parseSamplingParams", () => {
  it("fills in the defaults: greedy, 256 tokens, no penalties, a random seed", () => {
    const { seed, ...rest } = parseSamplingParams({});
    assert.deepEqual(rest, {
      temperature: 0,
      topK: 0,
      topP: 1,
      minP: 0,
      repetitionPenalty: 1,
      frequencyPenalty: 0,
      presencePenalty: 0,
      maxTokens: 256,
      stop: [],
      stopTokenIds: [],
      ignoreEos: false,
      logprobs: null,
      promptLogprobs: false,
    });
    assert.ok(Number.isInteger(seed) && seed >= 0 && seed <= 0xffffffff);
    const seeds = new Set(Array.from({ length: 20 }, () => parseSamplingParams({}).seed));
    assert.ok(seeds.size > 1, "each request draws its own seed");
  });

  it("keeps given values, takes a single stop string, and ignores unrelated keys", () => {
    const options = { temperature: 0.7, seed: 5, stop: "\n\n", logprobs: 0, prompt: "x" };
    const p = parseSamplingParams(options);
    assert.equal(p.temperature, 0.7);
    assert.equal(p.seed, 5);
    assert.deepEqual(p.stop, ["\n\n"]);
    assert.equal(p.logprobs, 0);
  });

  it("refuses bad values with one line naming the field", () => {
    assert.match(refusal({ temperature: -0.1 }), /^temperature: /);
    assert.match(refusal({ topP: 0 }), /^topP: /);
    assert.match(refusal({ topP: 1.5 }), /^topP: /);
    assert.match(refusal({ minP: 2 }), /^minP: /);
    assert.match(refusal({ repetitionPenalty: 0 }), /^repetitionPenalty: /);
    assert.match(refusal({ frequencyPenalty: 2.5 }), /^frequencyPenalty: /);
    assert.match(refusal({ presencePenalty: -3 }), /^presencePenalty: /);
    assert.match(refusal({ seed: 2 ** 32 }), /^seed: /);
    assert.match(refusal({ seed: 1.5 }), /^seed: /);
    assert.match(refusal({ maxTokens: -1 }), /^maxTokens: /);
    assert.match(refusal({ topK: -1 }), /^topK: /);
    assert.match(refusal({ stop: ["a", ""] }), /^stop/);
    assert.match(refusal({ stop: Array(9).fill("x") }), /^stop: /);
    assert.match(refusal({ stopTokenIds: [-1] }), /^stopTokenIds\.0: /);
    assert.match(refusal({ logprobs: 21 }), /^logprobs: /);
    assert.match(refusal({ ignoreEos: "yes" } as unknown as SamplingOptions), /^ignoreEos: /);
    for (const message of [refusal({ temperature: Number.NaN }), refusal({ maxTokens: Infinity })]) {
      assert.doesNotMatch(message, /\n/);
    }
  });
});
