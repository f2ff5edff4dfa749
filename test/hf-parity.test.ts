// The CPU reference against Hugging Face's own code: golden logits and greedy continuations made by
// tools/hf_reference.py (transformers' LlamaForCausalLM for the DeciCoder-style tiny model; for DeciLM's
// per-layer KV heads, the small PyTorch reference in that script, itself checked against transformers) on
// models that `decima create-model --seed 0` rebuilds here bit for bit, and the tokenizer against Hugging
// Face's `tokenizers` (tools/hf_tokenizer_golden.py).
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { createModel } from "../src/model/create.js";
import { Engine } from "../src/runtime/engine.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";
import { relErr } from "./gpu.js";

interface Golden {
  generator: string;
  tokens: number[];
  vocab: number;
  logits_f32_base64: string;
  greedy: number[];
}

const fixture = async <T>(name: string): Promise<T> =>
  JSON.parse(await readFile(new URL(`../../test/fixtures/${name}`, import.meta.url), "utf8")) as T;

const dirs: string[] = [];
after(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe("parity with Hugging Face", () => {
  for (const preset of ["tiny", "decilm-tiny"] as const) {
    test(`${preset}: logits within 1e-4 at every position, identical greedy continuation`, async () => {
      const golden = await fixture<Golden>(`hf/hf-${preset}.json`);
      const root = await mkdtemp(join(tmpdir(), "decima-parity-"));
      dirs.push(root);
      const { dir } = await createModel({ preset, out: join(root, preset), seed: 0 });
      const engine = await Engine.load({ model: dir, device: "cpu" });
      try {
        const bytes = Buffer.from(golden.logits_f32_base64, "base64");
        const want = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
        const rows = await engine.logits(golden.tokens);
        assert.equal(rows.length, golden.tokens.length);
        let worst = 0;
        rows.forEach((row, t) => (worst = Math.max(worst, relErr(row, want.subarray(t * golden.vocab, (t + 1) * golden.vocab)))));
        console.log(`# ${preset}: worst relative L2 error of the logits ${worst.toExponential(2)} vs ${golden.generator}`);
        assert.ok(worst <= 1e-4, `worst relative L2 error ${worst} (golden: ${golden.generator})`);
        const done = await engine.complete({ prompt: golden.tokens, maxTokens: golden.greedy.length, temperature: 0, ignoreEos: true });
        assert.deepEqual(done.tokens, golden.greedy);
      } finally {
        await engine.close();
      }
    });
  }

  test("tokenizer ids equal Hugging Face tokenizers' on tricky text", async () => {
    const golden = await fixture<{ generator: string; cases: { text: string; ids: number[] }[] }>("tokenizer-golden.json");
    const files = buildTokenizerFiles();
    const tokenizer = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
    assert.ok(golden.cases.length >= 30);
    for (const c of golden.cases) assert.deepEqual(tokenizer.encode(c.text), c.ids, JSON.stringify(c.text));
  });
});
