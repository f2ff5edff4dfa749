import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Rng } from "../src/model/random.js";
import { parseSamplingParams } from "../src/runtime/sampling-params.js";
import { Sequence } from "../src/runtime/sequence.js";
import { StopConditions, StopStringMatcher } from "../src/runtime/stop.js";
import { testTokenizer } from "./tiny-engine.js";

/** Push pieces through a matcher as a stream would; the whole emitted text, and whether it stopped. */
function stream(stops: string[], pieces: string[]): { text: string; stopped: boolean; emits: string[] } {
  const m = new StopStringMatcher(stops);
  const emits: string[] = [];
  for (const piece of pieces) {
    const out = m.push(piece);
    emits.push(out.text);
    if (out.stopped) return { text: emits.join(""), stopped: true, emits };
  }
  emits.push(m.flush());
  return { text: emits.join(""), stopped: false, emits };
}

describe("StopStringMatcher", () => {
  it("finds a stop string split across pieces and emits nothing of it", () => {
    const r = stream(["\n\n"], ["def f():", " pass\n", "\nclass"]);
    assert.deepEqual(r, { text: "def f(): pass", stopped: true, emits: ["def f():", " pass", ""] });
  });

  it("holds back a possible start of a stop string, then releases it when it turns out not to be one", () => {
    const m = new StopStringMatcher(["END"]);
    assert.deepEqual(m.push("the E"), { text: "the ", stopped: false });
    assert.deepEqual(m.push("N"), { text: "", stopped: false });
    assert.deepEqual(m.push("D"), { text: "", stopped: true });
    const n = new StopStringMatcher(["END"]);
    assert.deepEqual(n.push("the EN"), { text: "the ", stopped: false });
    assert.deepEqual(n.push("TRY"), { text: "ENTRY", stopped: false });
    assert.deepEqual(n.push(" E"), { text: " ", stopped: false });
    assert.equal(n.flush(), "E");
  });

  it("cuts at the earliest of several stop strings, never leaking what follows", () => {
    assert.equal(stream(["bar", "o b"], ["foo bar baz"]).text, "fo");
    assert.equal(stream(["</s>", "###"], ["a#", "#", "#b</s>"]).text, "a");
  });

  it("equals cutting the whole text at the first stop string, for any split (random cases)", () => {
    const rng = new Rng(11);
    const pick = (n: number) => Math.floor(rng.uniform() * n);
    const alphabet = "ab\n é😀";
    const randomText = (n: number) => Array.from({ length: n }, () => [...alphabet][pick(6)]).join("");
    for (let trial = 0; trial < 500; trial++) {
      const text = randomText(5 + pick(40));
      const stops = Array.from({ length: 1 + pick(3) }, () => randomText(1 + pick(3)));
      const pieces: string[] = [];
      const chars = [...text];
      for (let i = 0; i < chars.length; ) {
        const n = pick(4);
        pieces.push(chars.slice(i, i + n).join(""));
        i += n;
      }
      const cuts = stops.map((s) => text.indexOf(s)).filter((i) => i >= 0);
      const expected = cuts.length ? text.slice(0, Math.min(...cuts)) : text;
      const r = stream(stops, pieces);
      assert.equal(r.text, expected, `text ${JSON.stringify(text)} stops ${JSON.stringify(stops)}`);
      assert.equal(r.stopped, cuts.length > 0);
    }
  });
});

describe("StopConditions", () => {
  it("stops on EOS ids and stopTokenIds, unless ignoreEos", () => {
    const stop = new StopConditions(parseSamplingParams({ stopTokenIds: [5] }), [0, 2], 100);
    assert.deepEqual([0, 1, 2, 5].map((id) => stop.isStopToken(id)), [true, false, true, true]);
    const ignoring = new StopConditions(parseSamplingParams({ stopTokenIds: [5], ignoreEos: true }), [0, 2], 100);
    assert.deepEqual([0, 2, 5].map((id) => ignoring.isStopToken(id)), [false, false, true]);
  });

  it("stops at maxTokens and at the context length", () => {
    const stop = new StopConditions(parseSamplingParams({ maxTokens: 3 }), [], 10);
    assert.equal(stop.lengthReached(5, 2), false);
    assert.equal(stop.lengthReached(5, 3), true);
    assert.equal(stop.lengthReached(8, 1), false);
    assert.equal(stop.lengthReached(8, 2), true);
  });
});

describe("Sequence text", () => {
  const tokenizer = testTokenizer();
  const ctx = { tokenizer, eosIds: [0], contextLength: 1000 };
  /** A token's two passes at once: its text, or null for a stop token. */
  const accept = (seq: Sequence, id: number) => (seq.take(id) ? seq.detokenizeNext() : null);

  function run(prompt: string, completion: string, options: object): { seq: Sequence; texts: string[] } {
    const seq = new Sequence(tokenizer.encode(prompt), parseSamplingParams({ ...options }), "generate", ctx);
    const texts: string[] = [];
    for (const id of tokenizer.encode(completion)) {
      const text = accept(seq, id);
      if (text !== null) texts.push(text);
      if (seq.finishReason) break;
    }
    texts.push(seq.finish(seq.finishReason ?? "length"));
    return { seq, texts };
  }

  it("ends at a stop string spanning tokens; the emitted text stops right before it", () => {
    const completion = "    return a + b\n\ndef main():\n    print(1)\n";
    const ids = tokenizer.encode(completion);
    assert.ok(ids.length > 8);
    const { seq, texts } = run("def add(a, b):\n", completion, { stop: ["\n\ndef"] });
    assert.equal(seq.finishReason, "stop");
    assert.equal(seq.text, "    return a + b");
    assert.equal(texts.join(""), seq.text);
    assert.ok(seq.generated < ids.length, "generation ended at the stop string");
  });

  it("ends on EOS without emitting it, releasing held-back text at the end", () => {
    const tokenizerEos = tokenizer.eosTokenId!;
    const seq = new Sequence([40, 41], parseSamplingParams({ stop: ["x = 1;"] }), "generate", ctx);
    const texts = tokenizer.encode("let x =").map((id) => accept(seq, id));
    assert.equal(accept(seq, tokenizerEos), null);
    assert.equal(seq.finishReason, "stop");
    assert.equal(texts.join(""), "let ");
    assert.equal(seq.finish("stop"), "x =");
    assert.equal(seq.text, "let x =");
    assert.deepEqual(seq.output, tokenizer.encode("let x ="));
  });

  it("drops the tokens taken after a stop string that detokenizing finds later (a multi-step burst)", () => {
    const completion = "    return a + b\n\ndef main():\n    print(1)\n";
    const ids = tokenizer.encode(completion);
    const seq = new Sequence(tokenizer.encode("def add(a, b):\n"), parseSamplingParams({ stop: ["\n\ndef"] }), "generate", ctx);
    for (const id of ids) assert.equal(seq.take(id), true);
    assert.equal(seq.generated, ids.length);
    let text = "";
    while (seq.finishReason === null) text += seq.detokenizeNext() ?? "";
    assert.equal(text, "    return a + b");
    const kept = seq.output;
    assert.ok(kept.length < ids.length);
    assert.deepEqual(kept, ids.slice(0, kept.length));
    assert.ok(tokenizer.decode(kept).includes("\n\ndef"), "the last kept token completes the stop string");
    assert.ok(!tokenizer.decode(kept.slice(0, -1)).includes("\n\ndef"));
  });

  it("stops at maxTokens with finishReason length", () => {
    const { seq, texts } = run("x", "abc def ghi jkl mno pqr", { maxTokens: 2 });
    assert.equal(seq.finishReason, "length");
    assert.equal(seq.generated, 2);
    assert.equal(texts.join(""), seq.text);
    assert.equal(seq.text, tokenizer.decode(seq.output));
  });
});
