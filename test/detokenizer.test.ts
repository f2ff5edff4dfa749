import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { Rng } from "../src/model/random.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { IncrementalDetokenizer } from "../src/tokenizer/detokenizer.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";

const files = buildTokenizerFiles();
const starcoder = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
const llama = await Tokenizer.load(fileURLToPath(new URL("../../test/fixtures/llama-tokenizer", import.meta.url)));

type Opts = ConstructorParameters<typeof IncrementalDetokenizer>[1];

/** Every push's output, then flush's. */
function stream(tokenizer: Tokenizer, ids: number[], opts?: Opts): string[] {
  const detok = new IncrementalDetokenizer(tokenizer, opts);
  return [...ids.map((id) => detok.push(id)), detok.flush()];
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

// Ids that make streaming hard: pieces of multi-byte characters, emoji sequences, whitespace runs, specials.
const TRICKY_TEXT = ["é", "中文", "Ελληνικά", "😀", "👨‍👩‍👧", "🇯🇵", "👍🏽", "\ufffd", "    ", "\t\t", "\r\n", "\n\n\n", "x = 1"];
const trickyIds = (tokenizer: Tokenizer) => [
  ...new Set(TRICKY_TEXT.flatMap((s) => tokenizer.encode(s, { addSpecialTokens: false }))),
];

function randomIds(rng: Rng, pool: number[], vocabSize: number, length: number): number[] {
  return Array.from({ length }, () =>
    rng.uniform() < 0.7 ? pool[Math.floor(rng.uniform() * pool.length)] : Math.floor(rng.uniform() * vocabSize),
  );
}

describe("IncrementalDetokenizer", () => {
  for (const [name, tokenizer] of [["StarCoder-form", starcoder], ["Llama-style", llama]] as const) {
    test(`${name}: the pushes add up to decode(ids), on random ids`, () => {
      const rng = new Rng(7);
      const pool = [...trickyIds(tokenizer), 0, 1, 2];
      for (let trial = 0; trial < 300; trial++) {
        const ids = randomIds(rng, pool, tokenizer.vocabSize, 1 + Math.floor(rng.uniform() * 40));
        for (const skipSpecialTokens of [false, true]) {
          const pieces = stream(tokenizer, ids, { skipSpecialTokens });
          const expected = tokenizer.decode(ids, { skipSpecialTokens });
          assert.equal(pieces.join(""), expected, `ids ${JSON.stringify(ids)}`);
          for (const piece of pieces) assert.doesNotMatch(piece, LONE_SURROGATE);
        }
      }
    });

    test(`${name}: text of valid characters streams without a single U+FFFD`, () => {
      const text = "def f():\n\treturn 'é中文 😀👨‍👩‍👧🇯🇵'  \r\n# Ελληνικά 👍🏽\n";
      const ids = tokenizer.encode(text, { addSpecialTokens: false });
      const pieces = stream(tokenizer, ids);
      assert.equal(pieces.join(""), text);
      for (const piece of pieces) assert.ok(!piece.includes("\ufffd"), JSON.stringify(pieces));
    });
  }

  test("emits a character split across tokens once, whole, with its last byte", () => {
    // 🦀 is not in the built vocabulary's merges: four byte tokens.
    const ids = starcoder.encode("a🦀b", { addSpecialTokens: false });
    assert.equal(ids.length, 6);
    assert.deepEqual(stream(starcoder, ids), ["a", "", "", "", "🦀", "b", ""]);
  });

  test("lets a genuine U+FFFD through with the next token, or at flush", () => {
    const inner = starcoder.encode("a\ufffdb");
    assert.equal(stream(starcoder, inner).join(""), "a\ufffdb");
    const last = starcoder.encode("ab\ufffd");
    const pieces = stream(starcoder, last);
    assert.equal(pieces.at(-1), "\ufffd");
    assert.equal(pieces.join(""), "ab\ufffd");
  });

  test("streams sentencepiece's leading spaces right", () => {
    const ids = llama.encode("hello world foo");
    assert.deepEqual(stream(llama, ids, { skipSpecialTokens: true }), ["", "hello", " world", " foo", ""]);
    assert.equal(stream(llama, ids).join(""), "<s> hello world foo");
  });

  test("decodes after the context tokens, which it never emits", () => {
    const prompt = llama.encode("hello");
    const generated = [llama.tokenToId("▁world")!];
    // Alone, "▁world" is the first token and loses its space; after the prompt, it keeps it.
    assert.equal(stream(llama, generated).join(""), "world");
    assert.equal(stream(llama, generated, { context: prompt }).join(""), " world");
    assert.equal(stream(llama, generated, { context: prompt, skipSpecialTokens: true }).join(""), " world");
    assert.equal(stream(llama, generated, { context: [...prompt, llama.vocabSize + 5] }).join(""), " world");
  });

  test("keeps the leading space after skipped special tokens", () => {
    const hello = llama.tokenToId("▁hello")!;
    const world = llama.tokenToId("▁world")!;
    const ids = [hello, 2, 2, 2, 2, 2, world];
    assert.equal(stream(llama, ids, { skipSpecialTokens: true }).join(""), "hello world");
    assert.equal(llama.decode(ids, { skipSpecialTokens: true }), "hello world");
  });

  test("decodes a window of constant size, however long the output", () => {
    for (const [ids, what] of [
      [starcoder.encode("def f(x):\n    return x * 2  # 😀 中文\n".repeat(300)), "code"],
      [Array(3000).fill(starcoder.tokenToId("Ġ")!), "a run of spaces"],
      // Byte-level "Ģ" is byte 0x80, "ð" 0xF0, "Ł" 0x9F: bytes that never make a character.
      [Array(3000).fill(starcoder.tokenToId("Ģ")!), "lone continuation bytes"],
      [Array(3000).fill(starcoder.tokenToId("ð")!), "lone lead bytes"],
      [Array(1500).fill([starcoder.tokenToId("ð")!, starcoder.tokenToId("Ł")!]).flat(), "unfinished sequences"],
    ] as const) {
      let longest = 0;
      const spy = Object.create(starcoder) as Tokenizer;
      spy.decode = (window, opts) => {
        longest = Math.max(longest, window.length);
        return starcoder.decode(window, opts);
      };
      assert.equal(stream(spy, [...ids]).join(""), starcoder.decode([...ids]), what);
      assert.ok(longest <= 8, `${what}: decoded ${longest} tokens at once`);
    }
  });
});
