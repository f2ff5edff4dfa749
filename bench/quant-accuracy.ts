// Quantized engines against a 16-bit reference on the same model: relative L2 error of the logits and top-1
// agreement over teacher-forced positions, plus each engine's load time (run twice: the second load reads
// from the page cache). Run on the GPU machine:
//   node dist/bench/quant-accuracy.js REFERENCE ENGINE... [--positions 256] [--device cuda]
import { Rng } from "../src/model/random.js";
import { Engine } from "../src/runtime/engine.js";

const args = process.argv.slice(2);
const flag = (name: string, fallback: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args.splice(i, 2)[1] : fallback;
};
const positions = Number(flag("--positions", "256"));
const device = flag("--device", "cuda") as "cpu" | "cuda";
const [reference, ...engines] = args;
if (!reference || engines.length === 0) {
  console.error("usage: quant-accuracy REFERENCE ENGINE... [--positions N] [--device cuda|cpu]");
  process.exit(2);
}

async function run(model: string) {
  const t0 = performance.now();
  const engine = await Engine.load({ model, device, numBlocks: 256 });
  const loadMs = performance.now() - t0;
  const rng = new Rng(7);
  const vocab = Math.min(engine.config.vocabSize, engine.tokenizer.vocabSize);
  const tokens = Array.from({ length: positions }, () => 19 + Math.floor(rng.uniform() * (vocab - 19)));
  const logits = await engine.logits(tokens);
  await engine.close();
  return { loadMs, logits };
}

const argmax = (r: Float32Array) => r.reduce((best, v, i) => (v > r[best] ? i : best), 0);
const want = await run(reference);
console.log(`reference ${reference}: loaded in ${want.loadMs.toFixed(0)} ms`);
console.log(["engine", "load ms (cold, warm)", "rel L2 max", "rel L2 mean", "top-1 agree"].join(" | "));
for (const model of engines) {
  const cold = await run(model);
  const warm = await run(model);
  let max = 0;
  let sum = 0;
  let agree = 0;
  cold.logits.forEach((row, t) => {
    const ref = want.logits[t];
    let num = 0;
    let den = 0;
    for (let i = 0; i < ref.length; i++) {
      num += (row[i] - ref[i]) ** 2;
      den += ref[i] ** 2;
    }
    const err = Math.sqrt(num / den);
    max = Math.max(max, err);
    sum += err;
    if (argmax(row) === argmax(ref)) agree++;
  });
  const cells = [model, `${cold.loadMs.toFixed(0)}, ${warm.loadMs.toFixed(0)}`, max.toExponential(2), (sum / positions).toExponential(2), `${agree}/${positions}`];
  console.log(cells.join(" | "));
}
