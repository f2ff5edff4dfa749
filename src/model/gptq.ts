// GPTQ checkpoints (AutoGPTQ's format, as the Hugging Face hub holds them) in decima's int4 format.
//
// A GPTQ linear layer `<name>` stores, for a weight of `rows` outputs and `cols` inputs in groups of G:
//   qweight  int32 [cols / 8, rows]  eight 4-bit values per word, input 8k + j in bits 4j..4j+3
//   qzeros   int32 [cols / G, rows / 8]  each group's zero point minus one, eight per word along the rows
//   scales   float [cols / G, rows]
//   g_idx    int32 [cols]  (optional) each input's group
// and w = scale x (q - (zero + 1)). With symmetric quantization every zero is 8 (stored 7), so w = scale x
// (q - 8): decima's int4 values, which store q - 8 + 8 = q. Repacking is transposing: the values to
// rows of packed bytes, the scales to a row's groups. No value is rounded again.
import { fail } from "../errors.js";
import { f32ToF16, toFloat32 } from "./dtype.js";
import type { TensorSource } from "./pack.js";
import type { Int4Matrix } from "./weights.js";

/** The prefix of a linear weight's GPTQ tensors: its name ("...q_proj.weight") without ".weight". */
export function gptqBase(name: string): string {
  return name.replace(/\.weight$/, "");
}

/** The tensors a GPTQ linear layer `base` needs: their shapes, and which are I32 (the others a float type). */
export function gptqTensors(base: string, rows: number, cols: number, groupSize: number): { name: string; shape: number[]; int32: boolean }[] {
  return [
    { name: `${base}.qweight`, shape: [cols / 8, rows], int32: true },
    { name: `${base}.qzeros`, shape: [cols / groupSize, rows / 8], int32: true },
    { name: `${base}.scales`, shape: [cols / groupSize, rows], int32: false },
  ];
}

/** Refuse a layer whose shape GPTQ's packing cannot hold, before anything is read. */
export function checkGptqShape(base: string, rows: number, cols: number, groupSize: number): void {
  if (cols % 8 !== 0 || rows % 8 !== 0 || cols % groupSize !== 0) {
    fail("checkpoint", `${base}: ${rows} x ${cols} is not a GPTQ shape (both multiples of 8, columns of the group size ${groupSize})`);
  }
}

/** Weight `name` ("...q_proj.weight") of `rows` x `cols` from its GPTQ tensors, as decima's int4. */
export async function readGptqLinear(source: Required<TensorSource>, name: string, rows: number, cols: number, groupSize: number): Promise<Int4Matrix> {
  const base = gptqBase(name);
  checkGptqShape(base, rows, cols, groupSize);
  const groups = cols / groupSize;
  const zeros = await source.readInt32(`${base}.qzeros`);
  for (const word of zeros) {
    if (word !== 0x77777777) fail("checkpoint", `${base}.qzeros: zero points other than 8 (asymmetric GPTQ) are not supported`);
  }
  if (source.has(`${base}.g_idx`)) {
    const gIdx = await source.readInt32(`${base}.g_idx`);
    if (gIdx.some((g, c) => g !== Math.floor(c / groupSize))) {
      fail("checkpoint", `${base}.g_idx: inputs out of group order (act-order GPTQ) are not supported`);
    }
  }

  const packed = await source.readInt32(`${base}.qweight`);
  const data = new Uint8Array((rows * cols) / 2);
  for (let k = 0; k < cols / 8; k++) {
    for (let r = 0; r < rows; r++) {
      const word = packed[k * rows + r];
      // Inputs 8k .. 8k + 7: four bytes of the row, low nibble first, as the word holds them.
      const at = r * (cols / 2) + 4 * k;
      for (let b = 0; b < 4; b++) data[at + b] = (word >>> (8 * b)) & 0xff;
    }
  }
  const s = await source.read(`${base}.scales`);
  const byGroup = toFloat32(s.data, s.dtype); // [groups][rows]
  const scales = new Uint16Array(rows * groups);
  for (let g = 0; g < groups; g++) for (let r = 0; r < rows; r++) scales[r * groups + g] = f32ToF16(byGroup[g * rows + r]);
  return { format: "int4", rows, cols, groupSize, data, scales: new Uint8Array(scales.buffer), scaleDtype: "float16" };
}
