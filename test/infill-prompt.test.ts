import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { InfillPrompter } from "../src/server/infill-prompt.js";
import { type InfillBody, infillSchema } from "../src/server/requests.js";
import { fimPromptIds } from "../src/tokenizer/fim.js";
import { testTokenizer } from "./tiny-engine.js";

const tokenizer = testTokenizer();
const encode = (s: string) => tokenizer.encode(s, { addSpecialTokens: false });
const fileToken = tokenizer.tokenToId("<filename>")!;
const body = (fields: Partial<InfillBody>): InfillBody => infillSchema.parse(fields);
const code = (n: number, seed: string) => Array.from({ length: n }, (_, i) => `${seed}_${i} = ${seed}(${i})\n`).join("");
const chunkIds = (filename: string, text: string) => [fileToken, ...encode(`${filename}\n${text}`)];

describe("the /infill prompt", () => {
  const extra = [0, 1, 2, 3, 4, 5].map((i) => ({ filename: `f${i}.py`, text: code(6, `v${i}`) }));

  it("is the chunks, then the fill-in-the-middle prompt, when they fit", () => {
    const request = body({ input_extra: extra.slice(0, 2), input_prefix: "def f(x):\n    ", prompt: "return", input_suffix: "\n\nf(1)\n" });
    const { ids, truncated } = new InfillPrompter(tokenizer, 2048).build(request, 16);
    const fim = fimPromptIds(tokenizer, "def f(x):\n    return", "\n\nf(1)\n");
    assert.deepEqual(ids, [...chunkIds("f0.py", extra[0].text), ...chunkIds("f1.py", extra[1].text), ...fim]);
    assert.equal(truncated, false);
  });

  it("keeps the newest chunks that fit whole in half the context, in order, the same for a warm-up", () => {
    const request = body({ input_extra: extra, input_prefix: "x = 1\n", input_suffix: "\n" });
    const fim = fimPromptIds(tokenizer, "x = 1\n", "\n");
    const sizes = extra.map((c) => chunkIds(c.filename, c.text).length);
    const context = 2 * (sizes[4] + sizes[5]) + 1; // half of it holds the last two chunks, not three
    const prompter = new InfillPrompter(tokenizer, context);
    const { ids, truncated } = prompter.build(request, 16);
    const chunks = [...chunkIds("f4.py", extra[4].text), ...chunkIds("f5.py", extra[5].text)];
    assert.deepEqual(ids, [...chunks, ...fim]);
    assert.equal(truncated, true);
    // The ring sent alone ahead of the completions (n_predict 0) begins with the same tokens.
    const warmup = prompter.build(body({ input_extra: extra }), 0);
    assert.deepEqual(warmup.ids.slice(0, chunks.length), chunks);
  });

  it("cuts a long prefix from its start and a long suffix from its end, the completion keeping a quarter at most", () => {
    const prefix = code(80, "p"), suffix = code(80, "s");
    const request = body({ input_extra: extra, input_prefix: prefix, input_suffix: suffix });
    for (const [nPredict, reserve] of [[16, 16], [1000, 64], [-1, 64], [0, 0]]) {
      const { ids, truncated } = new InfillPrompter(tokenizer, 256).build(request, nPredict);
      assert.equal(ids.length, 256 - reserve, `n_predict ${nPredict}`);
      assert.equal(truncated, true);
      const fim = tokenizer.fim!;
      const [f, p, s] = [ids.indexOf(fim.prefix), ids.indexOf(fim.suffix), ids.indexOf(fim.middle)];
      assert.ok(f > 0 && f <= 128, `${f} tokens of chunks: half the context at most`);
      assert.deepEqual(ids.slice(f + 1, p), encode(prefix).slice(-(p - f - 1)), "the prefix's end");
      assert.deepEqual(ids.slice(p + 1, s), encode(suffix).slice(0, s - p - 1), "the suffix's start");
      assert.equal(s - p - 1, Math.floor((256 - reserve - f - 3) / 4), "a quarter for the suffix");
    }
  });

  it("encodes a chunk or a suffix it has seen before without the tokenizer", () => {
    const counting = Object.create(tokenizer) as typeof tokenizer;
    let calls = 0;
    counting.encode = (text, opts) => {
      calls++;
      return tokenizer.encode(text, opts);
    };
    const prompter = new InfillPrompter(counting, 2048);
    const request = body({ input_extra: extra, input_prefix: "x", input_suffix: "y" });
    const first = prompter.build(request, 16);
    assert.equal(calls, extra.length + 2);
    const again = prompter.build({ ...request, input_prefix: "xx" }, 16);
    assert.equal(calls, extra.length + 3, "the prefix only: a line typed leaves the suffix as it was");
    assert.deepEqual(again.ids.slice(0, 10), first.ids.slice(0, 10));
  });
});
