import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { DecimaError } from "../src/errors.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { fimPromptIds } from "../src/tokenizer/fim.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";

const files = buildTokenizerFiles();
const starcoder = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
const [PREFIX, MIDDLE, SUFFIX] = [1, 2, 3];

describe("fimPromptIds", () => {
  const prefix = "def fib(n):\n    if n < 2:\n        return n\n    ";
  const suffix = "\n\nprint(fib(10))  # 55 😀\n";

  test("assembles <fim_prefix> prefix <fim_suffix> suffix <fim_middle>", () => {
    const text = (s: string) => starcoder.encode(s, { addSpecialTokens: false });
    assert.deepEqual(fimPromptIds(starcoder, prefix, suffix), [PREFIX, ...text(prefix), SUFFIX, ...text(suffix), MIDDLE]);
  });

  test("gives the ids of the reference recipe: the assembled string, tokenized", () => {
    const ids = fimPromptIds(starcoder, prefix, suffix);
    const assembled = `<fim_prefix>${prefix}<fim_suffix>${suffix}<fim_middle>`;
    assert.deepEqual(ids, starcoder.encode(assembled));
    assert.equal(starcoder.decode(ids), assembled);
  });

  test("handles an empty prefix or suffix", () => {
    assert.deepEqual(fimPromptIds(starcoder, "", ""), [PREFIX, SUFFIX, MIDDLE]);
    assert.deepEqual(fimPromptIds(starcoder, "x", ""), [PREFIX, starcoder.tokenToId("x"), SUFFIX, MIDDLE]);
  });

  test("reads special-token names in the code as those tokens (the documented choice)", () => {
    const ids = fimPromptIds(starcoder, "s = '<fim_pad>'", "");
    assert.ok(ids.includes(starcoder.fim!.pad!));
  });

  test("works without <fim_pad>", () => {
    const json = structuredClone(files.tokenizerJson) as Record<string, any>;
    json.added_tokens = json.added_tokens.filter((t: { content: string }) => t.content !== "<fim_pad>");
    delete json.model.vocab["<fim_pad>"];
    const t = Tokenizer.fromObjects(json, files.tokenizerConfig);
    assert.deepEqual(t.fim, { prefix: PREFIX, middle: MIDDLE, suffix: SUFFIX, pad: null });
    assert.deepEqual(fimPromptIds(t, "a", "b"), fimPromptIds(starcoder, "a", "b"));
  });

  test("refuses a model without FIM tokens", async () => {
    const llama = await Tokenizer.load(fileURLToPath(new URL("../../test/fixtures/llama-tokenizer", import.meta.url)));
    assert.throws(
      () => fimPromptIds(llama, "a", "b"),
      (err: unknown) =>
        err instanceof DecimaError &&
        err.kind === "input" &&
        /^this model has no fill-in-the-middle tokens/.test(err.message) &&
        !err.message.includes("\n"),
    );
  });
});
