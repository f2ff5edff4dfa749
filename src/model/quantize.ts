import { fail } from "../errors.js";
import type { ModelConfig } from "./config.js";
import { f16ToF32, f32ToF16, toFloat32 } from "./dtype.js";
import type { DenseMatrix, Int4Matrix, Int8Matrix, LayerWeights, LinearWeight } from "./weights.js";

/**
 * Weight-only quantization (W8A16, W4A16): symmetric round-to-nearest, scales stored as fp16. Each q is
 * computed against the fp16-rounded scale, so q * scale as stored is the value the quantizer chose.
 *
 * Only the four linear layers of every decoder layer are quantized; they are nearly all of the bytes a
 * decode step reads. The rest stays 16-bit: embeddings are a gather, not a matrix product, so they cost
 * one row per token and quantizing them wins no bandwidth; norms are tiny; the LM head maps straight to
 * logits, so its error goes unfiltered into every probability, and at about 10% of the bytes it is worth
 * keeping exact.
 */

export type QuantKind = "none" | "int8" | "int4";

export interface Quantization {
  kind: QuantKind;
  /** int4 only: columns per scale. */
  groupSize?: number;
}

export const DEFAULT_GROUP_SIZE = 128;

/** One fp16 scale per row: q = round(w / scale) in -127..127. */
export function quantizeInt8(m: DenseMatrix, name = "matrix"): Int8Matrix {
  const { rows, cols } = m;
  const w = toFloat32(m.data, m.dtype);
  const q = new Int8Array(rows * cols);
  const scales = new Uint16Array(rows);
  for (let r = 0; r < rows; r++) {
    scales[r] = quantizeRun(w, q, r * cols, cols, 127, -127, `${name} row ${r}`);
  }
  return { format: "int8", rows, cols, data: bytesOf(q), scales: bytesOf(scales), scaleDtype: "float16" };
}

/** One fp16 scale per `groupSize` columns of a row: q = round(w / scale) in -8..7, packed two to a byte. */
export function quantizeInt4(m: DenseMatrix, groupSize = DEFAULT_GROUP_SIZE, name = "matrix"): Int4Matrix {
  const { rows, cols } = m;
  checkInt4Shape(name, cols, groupSize);
  const w = toFloat32(m.data, m.dtype);
  const q = new Int8Array(rows * cols);
  const groups = cols / groupSize;
  const scales = new Uint16Array(rows * groups);
  for (let r = 0; r < rows; r++) {
    for (let g = 0; g < groups; g++) {
      const at = r * cols + g * groupSize;
      scales[r * groups + g] = quantizeRun(w, q, at, groupSize, 7, -8, `${name} row ${r} group ${g}`);
    }
  }
  // Column 2j in the low nibble, 2j+1 in the high one, each as q + 8 (see Int4Matrix).
  const data = new Uint8Array((rows * cols) / 2);
  for (let i = 0; i < data.length; i++) data[i] = (q[2 * i] + 8) | ((q[2 * i + 1] + 8) << 4);
  return { format: "int4", rows, cols, groupSize, data, scales: bytesOf(scales), scaleDtype: "float16" };
}

/**
 * Quantize w[at .. at + n) into q with one scale, max|w| / qmax, returned as fp16 bits. An all-zero run
 * gets scale 0 and q 0.
 */
function quantizeRun(w: Float32Array, q: Int8Array, at: number, n: number, qmax: number, qmin: number, what: string) {
  let max = 0;
  for (let i = at; i < at + n; i++) max = Math.max(max, Math.abs(w[i]));
  const bits = f32ToF16(max / qmax);
  const scale = f16ToF32(bits);
  if (!Number.isFinite(scale)) fail("engine", `${what}: largest weight ${max} overflows an fp16 scale`);
  if (scale === 0) return bits; // q is already 0
  for (let i = at; i < at + n; i++) q[i] = Math.min(qmax, Math.max(qmin, Math.round(w[i] / scale)));
  return bits;
}

function checkInt4Shape(name: string, cols: number, groupSize: number): void {
  if (!Number.isInteger(groupSize) || groupSize < 1) {
    fail("input", `int4 group size ${groupSize} must be a positive integer`);
  }
  if (cols % groupSize !== 0 || cols % 2 !== 0) {
    fail("input", `${name}: ${cols} columns are not an even multiple of the int4 group size ${groupSize}`);
  }
}

/**
 * A layer's four linear weights quantized as asked (kind "none" returns the layer itself). Weights already
 * in the asked format (a GPTQ checkpoint's int4 groups) pass through.
 */
export function quantizeLayer(layer: LayerWeights, quant: Quantization, name: string): LayerWeights {
  if (quant.kind === "none") return layer;
  const one = (w: LinearWeight, part: string): LinearWeight => {
    const where = `${name}.${part}`;
    if (w.format === "int4" && quant.kind === "int4" && w.groupSize === quant.groupSize) return w;
    if (w.format !== "dense") fail("engine", `${where}: is already ${w.format}`);
    return quant.kind === "int8" ? quantizeInt8(w, where) : quantizeInt4(w, quant.groupSize, where);
  };
  return {
    ...layer,
    qkv: one(layer.qkv, "qkv"),
    o: one(layer.o, "o"),
    gateUp: one(layer.gateUp, "gateUp"),
    down: one(layer.down, "down"),
  };
}

/**
 * The LM head of a quantized model: int8 per output channel whatever the layers' kind. It is the largest
 * single matrix (a sixth of a 1B model's 16-bit bytes), and as int4 its error would go unfiltered into every
 * probability; as int8 it took the int8 engine's logits error from 2.46e-2 to 2.50e-2 (BENCHMARKS.md), and
 * llama.cpp's quantized files keep it at 6 or 8 bits too. A tied head is the embedding and stays 16-bit.
 */
export function quantizeHead(head: LinearWeight, quant: Quantization): LinearWeight {
  if (quant.kind === "none") return head;
  if (head.format !== "dense") fail("engine", `lmHead: is already ${head.format}`);
  return quantizeInt8(head, "lmHead");
}

/** Refuse, before any weight is read, a quantization the model's shapes cannot take. */
export function checkQuantization(config: ModelConfig, quant: Quantization): void {
  if (quant.kind !== "int4") {
    if (quant.groupSize !== undefined) fail("input", `a group size is for int4 only (the quantization is ${quant.kind})`);
    return;
  }
  const groupSize = quant.groupSize ?? DEFAULT_GROUP_SIZE;
  config.layers.forEach((l, i) => {
    const h = config.hiddenSize;
    const inputs = { qkv: h, o: l.numHeads * l.headDim, gateUp: h, down: l.intermediateSize };
    for (const [part, cols] of Object.entries(inputs)) checkInt4Shape(`layers.${i}.${part}`, cols, groupSize);
  });
}

function bytesOf(a: Int8Array | Uint16Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
