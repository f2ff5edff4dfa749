// The decode GEMV kernel alone, on DeciCoder-1b's matrices: microseconds per launch and the bandwidth it
// reaches, for 16-bit, int8 and int4 weights (groups of 128), one and two activation rows, with and
// without programmatic dependent launch between consecutive launches. Weights rotate over copies larger
// than L2, and the launches run inside one CUDA graph, as in a decode step. Run on the GPU machine:
//   node dist/bench/gemv-kernels.js [float16] [--quant | --format NAME]
//   (--quant: int8 and int4 too, with PDL only; --format: one weight format alone: 16-bit, int8 or int4)
import { cudaDevice } from "../src/engine/cuda/native.js";

// norm: the product's input is the RMSNorm of the residual stream, built in the kernel's prologue.
const shapes = [
  { name: "qkv", rows: 2560, cols: 2048, norm: 1 },
  { name: "o", rows: 2048, cols: 2048, norm: 0 },
  { name: "gate/up", rows: 11776, cols: 2048, norm: 1 },
  { name: "down", rows: 2048, cols: 5888, norm: 0 },
  { name: "lm head", rows: 49152, cols: 2048, norm: 1 },
];
const batches = [1, 2];

const dtype = process.argv.includes("float16") ? 0 : 1;
// Bytes per weight, and the scales beside them (fp16: one per row for int8, per row and 128 columns for int4).
const allFormats = [
  { name: "16-bit", quant: 0, bytes: (r: number, c: number) => r * c * 2, pdls: [0, 1] },
  { name: "int8", quant: 1, bytes: (r: number, c: number) => r * c + r * 2, pdls: [1] },
  { name: "int4", quant: 2, bytes: (r: number, c: number) => (r * c) / 2 + (r * c) / 64, pdls: [1] },
];
const at = process.argv.indexOf("--format");
const only = at >= 0 ? process.argv[at + 1] : undefined;
const formats = allFormats.filter((f) => (only ? f.name === only : f.quant === 0 || process.argv.includes("--quant")));
if (formats.length === 0) {
  console.error(`--format ${only}: not a weight format (${allFormats.map((f) => f.name).join(", ")})`);
  process.exit(1);
}
const dev = cudaDevice();
if (!dev.ok) {
  console.error(`no GPU: ${dev.reason}`);
  process.exit(1);
}
const bandwidth = dev.addon.measureBandwidth(2 ** 30, 10);
console.log(`${dev.info.name}: read bandwidth ${(bandwidth / 1e9).toFixed(0)} GB/s`);
console.log(["matrix", "weights", "batch", "pdl", "us", "GB/s", "of bw"].map((h) => h.padStart(8)).join(""));
for (const s of shapes) {
  for (const f of formats) {
    const bytes = f.bytes(s.rows, s.cols);
    const copies = Math.min(32, Math.max(2, Math.ceil(200e6 / bytes)));
    for (const batch of batches) {
      for (const pdl of f.pdls) {
        const params = { dtype, rows: s.rows, cols: s.cols, batch, copies, iters: 200, pdl, norm: s.norm, quant: f.quant };
        const out = dev.addon.testKernel("bench_gemv", {}, params);
        const us = new Float32Array(out.us.buffer.slice(out.us.byteOffset, out.us.byteOffset + 4))[0];
        const gbs = bytes / (us * 1e-6) / 1e9;
        const cells = [s.name, f.name, String(batch), String(pdl), us.toFixed(2), gbs.toFixed(0), `${((gbs * 1e9 * 100) / bandwidth).toFixed(0)}%`];
        console.log(cells.map((c) => c.padStart(8)).join(""));
      }
    }
  }
}
