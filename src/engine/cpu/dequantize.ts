import { fail } from "../../errors.js";
import { bytesPerElement, toFloat32 } from "../../model/dtype.js";
import type { Int4Matrix, Int8Matrix, LinearWeight, Vector } from "../../model/weights.js";
import type { Matrix } from "./ops.js";

/**
 * fp32 values of every stored weight format (src/model/weights.ts), so the reference runs any model,
 * quantized ones included, with the same fp32 math. `name` says which weight, in error messages.
 */
export function dequantize(w: LinearWeight, name: string): Matrix {
  if (w.format === "dense") {
    expectBytes(name, "data", w.data, w.rows * w.cols * bytesPerElement(w.dtype));
    return { rows: w.rows, cols: w.cols, data: toFloat32(w.data, w.dtype) };
  }
  return { rows: w.rows, cols: w.cols, data: w.format === "int8" ? int8Values(w, name) : int4Values(w, name) };
}

export function vectorValues(v: Vector, name: string): Float32Array {
  expectBytes(name, "data", v.data, v.length * bytesPerElement(v.dtype));
  return toFloat32(v.data, v.dtype);
}

/** w = q * scale[row]. */
function int8Values(w: Int8Matrix, name: string): Float32Array {
  const { rows, cols } = w;
  expectBytes(name, "data", w.data, rows * cols);
  expectBytes(name, "scales", w.scales, rows * bytesPerElement(w.scaleDtype));
  const q = new Int8Array(w.data.buffer, w.data.byteOffset, rows * cols);
  const scales = toFloat32(w.scales, w.scaleDtype);
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[r * cols + c] = q[r * cols + c] * scales[r];
  }
  return out;
}

/** w = q * scale[row][col / groupSize], with q = nibble - 8; column 2j is the low nibble of byte j. */
function int4Values(w: Int4Matrix, name: string): Float32Array {
  const { rows, cols, groupSize } = w;
  if (cols % 2 !== 0 || cols % groupSize !== 0) {
    fail("engine", `${name}: int4 columns (${cols}) must be even and a multiple of the group size ${groupSize}`);
  }
  const groups = cols / groupSize;
  expectBytes(name, "data", w.data, (rows * cols) / 2);
  expectBytes(name, "scales", w.scales, rows * groups * bytesPerElement(w.scaleDtype));
  const scales = toFloat32(w.scales, w.scaleDtype);
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const byte = w.data[r * (cols / 2) + (c >> 1)];
      const nibble = c % 2 === 0 ? byte & 0xf : byte >> 4;
      out[r * cols + c] = (nibble - 8) * scales[r * groups + Math.floor(c / groupSize)];
    }
  }
  return out;
}

function expectBytes(name: string, field: string, bytes: Uint8Array, expected: number): void {
  if (bytes.byteLength !== expected) {
    fail("engine", `${name}: ${field} has ${bytes.byteLength} bytes, the shape needs ${expected}`);
  }
}
