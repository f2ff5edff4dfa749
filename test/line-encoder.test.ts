import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { Rng } from "../src/model/random.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { LineEncoder } from "../src/tokenizer/line-encoder.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";
import { testTokenizer } from "./tiny-engine.js";

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const big = buildTokenizerFiles({ vocabSize: 49152 });
const starcoderLike = [testTokenizer(), Tokenizer.fromObjects(big.tokenizerJson, big.tokenizerConfig)];

/** Code of this repository, and some of it made harder: Windows line ends, trailing spaces, tabs, text past ASCII. */
function texts(): string[] {
  const dir = path.join(root, "src", "runtime");
  const files = readdirSync(dir).map((f) => readFileSync(path.join(dir, f), "utf8"));
  const odd = files[0].slice(0, 3000);
  return [
    ...files,
    odd.replaceAll("\n", "\r\n"),
    odd.replaceAll(";\n", ";  \n").replaceAll("{\n", "{\t\n\n\n"),
    odd.replaceAll("e", "é").replaceAll("o", "ö 🙂 "),
    "x = 1\n\n\n    y = [1, 2, 3]   \n\t\tz\n<fim_prefix>\n123456789\n",
  ];
}

describe("LineEncoder", () => {
  it("gives exactly the whole text's ids, line by line, for StarCoder's kind of tokenizer", () => {
    const rng = new Rng(11);
    for (const tokenizer of starcoderLike) {
      assert.equal(tokenizer.splitsAtLineEnds, true);
      const lines = new LineEncoder(tokenizer, 64); // small: entries are evicted and made again
      for (const text of texts()) {
        for (let k = 0; k < 8; k++) {
          // An editor's window: from anywhere to anywhere, as cursors fall.
          const a = rng.nextU32() % text.length, b = a + (rng.nextU32() % (text.length - a));
          const part = text.slice(a, b + 1);
          assert.deepEqual(lines.encode(part), tokenizer.encode(part, { addSpecialTokens: false }), JSON.stringify(part.slice(0, 60)));
        }
      }
    }
  });

  it("encodes the text whole for a tokenizer that normalizes it as a whole (Llama's)", async () => {
    const llama = await Tokenizer.load(path.join(root, "test", "fixtures", "llama-tokenizer"));
    assert.equal(llama.splitsAtLineEnds, false);
    const text = "def f(x):\n    return x\nprint(f(1))\n";
    assert.deepEqual(new LineEncoder(llama, 64).encode(text), llama.encode(text, { addSpecialTokens: false }));
  });
});
