import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { DecimaError } from "../src/errors.js";
import { BUILT_VOCAB_SIZE, STARCODER_SPECIAL_TOKENS, buildTokenizerFiles } from "../src/tokenizer/build.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";

const fixture = (name: string) => new URL(`../../test/fixtures/${name}`, import.meta.url);
const LLAMA_DIR = fileURLToPath(fixture("llama-tokenizer"));

const files = buildTokenizerFiles();
const starcoder = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
const cases: string[] = JSON.parse(await readFile(fixture("tokenizer-cases.json"), "utf8"));

const startsWith = (prefix: string) => new RegExp("^" + prefix.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));

/** Runs `fn`, which must throw a DecimaError of `kind` with a one-line message matching `pattern`. */
async function assertFails(fn: () => unknown, kind: string, pattern: RegExp): Promise<void> {
  await assert.rejects(
    async () => fn(),
    (err: unknown) => {
      assert.ok(err instanceof DecimaError, `expected a DecimaError, got ${String(err)}`);
      assert.equal(err.kind, kind);
      assert.match(err.message, pattern);
      assert.ok(!err.message.includes("\n"), "message must be one line");
      return true;
    },
  );
}

describe("built StarCoder-form tokenizer", () => {
  test("has the special tokens at 0..18, then the byte alphabet, then merges up to the vocabulary size", () => {
    assert.equal(starcoder.vocabSize, BUILT_VOCAB_SIZE);
    STARCODER_SPECIAL_TOKENS.forEach((token, id) => {
      assert.equal(starcoder.tokenToId(token), id);
      assert.ok(starcoder.isSpecial(id));
    });
    // The byte alphabet sorted by character: "!" (byte 0x21) first, "Ń" (byte 0xAD, shifted) last.
    assert.equal(starcoder.idToToken(19), "!");
    assert.equal(starcoder.idToToken(274), "Ń");
    assert.equal(starcoder.isSpecial(19), false);
    assert.equal(starcoder.idToToken(BUILT_VOCAB_SIZE), null);
    assert.equal(starcoder.idToToken(-1), null);
    assert.equal(starcoder.tokenToId("no such token"), null);
  });

  test("takes BOS, EOS and the FIM tokens from its files", () => {
    assert.equal(starcoder.bosTokenId, 0);
    assert.equal(starcoder.eosTokenId, 0);
    assert.deepEqual(starcoder.fim, { prefix: 1, middle: 2, suffix: 3, pad: 4 });
    assert.equal(starcoder.chatTemplate, null);
  });

  test("follows the tokenizer.json schema that Hugging Face writes", () => {
    const json = files.tokenizerJson as Record<string, any>;
    assert.deepEqual(Object.keys(json), [
      "version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model",
    ]);
    assert.equal(json.version, "1.0");
    assert.equal(json.normalizer, null);
    assert.deepEqual(json.added_tokens[1], {
      id: 1, content: "<fim_prefix>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
    });
    assert.deepEqual(json.pre_tokenizer.pretokenizers.map((p: { type: string }) => p.type), ["Digits", "ByteLevel"]);
    const { vocab, merges, ...model } = json.model;
    assert.deepEqual(model, {
      type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: false, byte_fallback: false, ignore_merges: false,
    });
    const ids = (Object.values(vocab) as number[]).sort((a, b) => a - b);
    assert.deepEqual(ids, [...Array(BUILT_VOCAB_SIZE).keys()]);
    assert.equal(merges.length, BUILT_VOCAB_SIZE - 19 - 256);
    for (const merge of merges) {
      const [a, b] = merge.split(" ");
      assert.equal(vocab[a + b] !== undefined && a + " " + b === merge, true, merge);
    }
    const config = files.tokenizerConfig as Record<string, any>;
    assert.equal(config.tokenizer_class, "GPT2Tokenizer");
    assert.equal(config.model_max_length, 2048);
    assert.deepEqual(config.added_tokens_decoder["18"], {
      content: "<reponame>", lstrip: false, normalized: false, rstrip: false, single_word: false, special: true,
    });
  });

  test("is the same every time", () => {
    assert.equal(JSON.stringify(buildTokenizerFiles()), JSON.stringify(files));
  });

  test("splits digits one by one and recognizes special tokens written in the text", () => {
    const digits = starcoder.encode("2048");
    assert.deepEqual(digits.map((id) => starcoder.idToToken(id)), ["2", "0", "4", "8"]);
    const a = starcoder.tokenToId("a")!;
    const b = starcoder.tokenToId("b")!;
    assert.deepEqual(starcoder.encode("<fim_prefix>a<fim_suffix>b<fim_middle>"), [1, a, 3, b, 2]);
    assert.deepEqual(starcoder.encode("<|endoftext|>"), [0]);
  });

  test("adds nothing around the text (StarCoder's post-processor)", () => {
    const ids = starcoder.encode("x = 1");
    assert.deepEqual(starcoder.encode("x = 1", { addSpecialTokens: false }), ids);
    assert.equal(starcoder.decode(ids), "x = 1");
    assert.deepEqual(starcoder.encode(""), []);
  });

  test("round-trips every tricky string", () => {
    assert.ok(cases.length >= 30);
    for (const text of cases) assert.equal(starcoder.decode(starcoder.encode(text)), text, JSON.stringify(text));
  });

  test("spends one token per byte on characters the merges never saw", () => {
    // 🦀 is 4 UTF-8 bytes absent from the corpus: 4 byte tokens.
    assert.equal(starcoder.encode("🦀").length, 4);
  });

  test("keeps or skips special tokens when decoding", () => {
    const ids = [0, ...starcoder.encode("hi"), 1, 0];
    assert.equal(starcoder.decode(ids), "<|endoftext|>hi<fim_prefix><|endoftext|>");
    assert.equal(starcoder.decode(ids, { skipSpecialTokens: true }), "hi");
    assert.equal(starcoder.decode([]), "");
  });

  test("never applies transformers' clean-up of spaces", () => {
    const text = "a , b . c 's";
    assert.equal(starcoder.decode(starcoder.encode(text)), text);
  });

  test("refuses ids outside the vocabulary", async () => {
    await assertFails(() => starcoder.decode([5, BUILT_VOCAB_SIZE]), "input", /token id 1000 .*0\.\.999/);
    await assertFails(() => starcoder.decode([1.5]), "input", /token id 1\.5/);
  });

  test("has no chat template", async () => {
    await assertFails(
      () => starcoder.applyChatTemplate([{ role: "user", content: "hi" }], { addGenerationPrompt: true }),
      "input",
      /^this model has no chat template$/,
    );
  });
});

describe("Llama-style tokenizer (sentencepiece BPE with byte fallback)", () => {
  let llama: Tokenizer;
  before(async () => {
    llama = await Tokenizer.load(LLAMA_DIR);
  });

  test("adds BOS as its post-processor says", () => {
    const hello = llama.tokenToId("▁hello")!;
    const world = llama.tokenToId("▁world")!;
    assert.deepEqual(llama.encode("hello world"), [1, hello, world]);
    assert.deepEqual(llama.encode("hello world", { addSpecialTokens: false }), [hello, world]);
    assert.equal(llama.decode([1, hello, world]), "<s> hello world");
    assert.equal(llama.decode([1, hello, world], { skipSpecialTokens: true }), "hello world");
  });

  test("reads BOS and EOS written as AddedToken objects", () => {
    assert.equal(llama.bosTokenId, 1);
    assert.equal(llama.eosTokenId, 2);
    assert.ok(llama.isSpecial(0) && llama.isSpecial(1) && llama.isSpecial(2));
    assert.equal(llama.fim, null);
  });

  test("round-trips the tricky strings through byte fallback", () => {
    for (const text of cases) {
      // The library's ByteFallback decoder uses a TextDecoder that drops a leading byte order mark.
      if (text.startsWith("\ufeff")) continue;
      const ids = llama.encode(text);
      assert.equal(llama.decode(ids, { skipSpecialTokens: true }), text, JSON.stringify(text));
    }
  });

  test("renders the chat template", () => {
    const messages = [
      { role: "user", content: "Hi" },
      { role: "assistant", content: "Hello!" },
      { role: "user", content: "Write fib" },
    ];
    assert.equal(
      llama.applyChatTemplate(messages, { addGenerationPrompt: true }),
      "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Write fib [/INST] ",
    );
    assert.equal(
      llama.applyChatTemplate(messages.slice(0, 2), { addGenerationPrompt: false }),
      "<s>[INST] Hi [/INST] Hello! </s>",
    );
  });

  test("turns the template's own refusal into an input error", async () => {
    await assertFails(
      () => llama.applyChatTemplate([{ role: "assistant", content: "x" }], { addGenerationPrompt: true }),
      "input",
      /^chat template: .*roles must alternate/,
    );
  });

  test("counts added tokens past the model's vocabulary in vocabSize", async () => {
    const json = JSON.parse(await readFile(path.join(LLAMA_DIR, "tokenizer.json"), "utf8"));
    const modelSize = Object.keys(json.model.vocab).length;
    json.added_tokens.push({ id: modelSize, content: "<extra>", special: true, normalized: false });
    const t = Tokenizer.fromObjects(json, null);
    assert.equal(t.vocabSize, modelSize + 1);
    assert.deepEqual(t.encode("<extra>", { addSpecialTokens: false }), [modelSize]);
    assert.equal(t.eosTokenId, null);
  });
});

describe("chat templates", () => {
  const named = (chat_template: unknown) =>
    Tokenizer.fromObjects(files.tokenizerJson, { ...files.tokenizerConfig, chat_template });

  test("take the template named default from a list", () => {
    const t = named([
      { name: "tool_use", template: "tools" },
      { name: "default", template: "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{{ eos_token }}" },
    ]);
    assert.equal(t.applyChatTemplate([{ role: "user", content: "hi" }], { addGenerationPrompt: false }), "user: hi\n<|endoftext|>");
  });

  test("refuse a list without a default", async () => {
    await assertFails(() => named([{ name: "tool_use", template: "x" }]), "tokenizer", /chat_template .*"default".*tool_use/);
  });

  test("report a template that does not parse, naming the file", async () => {
    const t = named("{% for m in messages %}");
    await assertFails(
      () => t.applyChatTemplate([{ role: "user", content: "hi" }], { addGenerationPrompt: false }),
      "tokenizer",
      /^tokenizer_config\.json: chat_template: /,
    );
  });
});

describe("Tokenizer.load", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "decima-tokenizer-"));
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function writeModel(json: unknown, config: unknown | undefined): Promise<string> {
    const modelDir = await mkdtemp(path.join(dir, "model-"));
    if (json !== undefined) await writeFile(path.join(modelDir, "tokenizer.json"), typeof json === "string" ? json : JSON.stringify(json));
    if (config !== undefined) {
      await writeFile(path.join(modelDir, "tokenizer_config.json"), typeof config === "string" ? config : JSON.stringify(config));
    }
    return modelDir;
  }

  test("reads the files that fromObjects takes", async () => {
    const t = await Tokenizer.load(await writeModel(files.tokenizerJson, files.tokenizerConfig));
    assert.equal(t.vocabSize, BUILT_VOCAB_SIZE);
    assert.deepEqual(t.encode(cases[0]), starcoder.encode(cases[0]));
    assert.equal(t.eosTokenId, 0);
  });

  test("does without tokenizer_config.json", async () => {
    const t = await Tokenizer.load(await writeModel(files.tokenizerJson, undefined));
    assert.equal(t.eosTokenId, null);
    assert.equal(t.bosTokenId, null);
    assert.deepEqual(t.fim, { prefix: 1, middle: 2, suffix: 3, pad: 4 });
  });

  test("picks up chat_template.jinja", async () => {
    const modelDir = await writeModel(files.tokenizerJson, files.tokenizerConfig);
    await writeFile(path.join(modelDir, "chat_template.jinja"), "{{ messages[0].content }}!");
    const t = await Tokenizer.load(modelDir);
    assert.equal(t.applyChatTemplate([{ role: "user", content: "hey" }], { addGenerationPrompt: true }), "hey!");
  });

  test("names the missing tokenizer.json", async () => {
    const modelDir = await writeModel(undefined, files.tokenizerConfig);
    await assertFails(() => Tokenizer.load(modelDir), "tokenizer", startsWith(path.join(modelDir, "tokenizer.json: not found")));
  });

  test("names a file that is not JSON", async () => {
    const modelDir = await writeModel(files.tokenizerJson, "{ not json");
    await assertFails(() => Tokenizer.load(modelDir), "tokenizer", startsWith(path.join(modelDir, "tokenizer_config.json: not valid JSON")));
  });

  test("names the field at fault", async () => {
    const badEos = await writeModel(files.tokenizerJson, { ...files.tokenizerConfig, eos_token: 7 });
    await assertFails(() => Tokenizer.load(badEos), "tokenizer", /tokenizer_config\.json: eos_token: /);
    const unknownEos = await writeModel(files.tokenizerJson, { ...files.tokenizerConfig, eos_token: "<eos>" });
    await assertFails(() => Tokenizer.load(unknownEos), "tokenizer", /tokenizer_config\.json: eos_token "<eos>" is not in the vocabulary/);
    const noModel = await writeModel({ added_tokens: [] }, undefined);
    await assertFails(() => Tokenizer.load(noModel), "tokenizer", /tokenizer\.json: model: /);
  });

  test("reports what the library rejects, naming the file", async () => {
    const json = structuredClone(files.tokenizerJson) as Record<string, any>;
    json.decoder = { type: "NoSuchDecoder" };
    const modelDir = await writeModel(json, undefined);
    await assertFails(() => Tokenizer.load(modelDir), "tokenizer", /tokenizer\.json: Unknown Decoder type: NoSuchDecoder/);
  });
});
