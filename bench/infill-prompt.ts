// The host's part of an editor's request before the device starts: building an /infill prompt (fitted to a
// 2,048-token context) as llama.vscode sends it, a character typed on line 300 of a file each time: 256
// lines before the cursor, 64 after, a ring of 8 chunks of 16 lines. The text is this repository's
// engine.ts; the tokenizer is the decicoder-1b preset's (synthetic, with StarCoder's structure).
//   node dist/bench/infill-prompt.js [--requests 20]
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { percentiles } from "../src/server/benchmark.js";
import { InfillPrompter } from "../src/server/infill-prompt.js";
import { infillSchema } from "../src/server/requests.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";

const args = process.argv.slice(2);
const requests = args.includes("--requests") ? Number(args[args.indexOf("--requests") + 1]) : 20;
const files = buildTokenizerFiles({ vocabSize: 49152 });
const tokenizer = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
const lines = readFileSync(fileURLToPath(new URL("../../src/runtime/engine.ts", import.meta.url)), "utf8").split("\n");
const extra = Array.from({ length: 8 }, (_, i) => ({ filename: "engine.ts", text: lines.slice(37 * i, 37 * i + 16).join("\n") }));
const prompter = new InfillPrompter(tokenizer, 2048);
let typed = "    const x";
const ms: number[] = [];
for (let r = 0; r <= requests; r++) {
  typed += "y";
  const body = infillSchema.parse({
    input_extra: extra,
    input_prefix: `${lines.slice(300 - 256, 300).join("\n")}\n${typed}`,
    input_suffix: `\n${lines.slice(301, 365).join("\n")}`,
    n_predict: 128,
  });
  const started = performance.now();
  const { ids } = prompter.build(body, 128);
  if (r === 0) process.stdout.write(`first request: ${(performance.now() - started).toFixed(2)} ms, ${ids.length} tokens\n`);
  else ms.push(performance.now() - started);
}
const p = percentiles(ms);
process.stdout.write(`the ${requests} after it, a character typed each time: p50 ${p.p50.toFixed(2)} ms, p99 ${p.p99.toFixed(2)} ms\n`);
