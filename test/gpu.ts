// Shared by the GPU tests: whether a GPU is here (they skip, saying why, where not), random 16-bit data
// and the error measure.
import { cudaDevice } from "../src/engine/cuda/native.js";
import { type FloatDType, fromFloat32, toFloat32 } from "../src/model/dtype.js";
import { Rng } from "../src/model/random.js";

const dev = cudaDevice();
/** false when the GPU tests can run; otherwise the reason they skip. */
export const gpuSkip: false | string = dev.ok ? false : `no GPU here: ${dev.reason}`;
if (gpuSkip) console.log(`# GPU tests skipped (${gpuSkip})`);

export function addon() {
  if (!dev.ok) throw new Error(dev.reason);
  return dev.addon;
}

export const DTYPES = ["float16", "bfloat16"] as const;
export type HalfDType = (typeof DTYPES)[number];

export function dtypeCode(d: HalfDType): number {
  return d === "float16" ? 0 : 1;
}

/** Uniform values of standard deviation `std`, and their 16-bit storage and its exact fp32 values. */
export function randomHalf(rng: Rng, n: number, std: number, dtype: FloatDType) {
  const v = new Float32Array(n);
  rng.fillUniform(v, std);
  const bytes = fromFloat32(v, dtype);
  return { bytes, values: toFloat32(bytes, dtype) };
}

export function randomF32(rng: Rng, n: number, std: number): Float32Array {
  const v = new Float32Array(n);
  rng.fillUniform(v, std);
  return v;
}

export function f32(bytes: Uint8Array): Float32Array {
  return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

export function i32(bytes: Uint8Array): Int32Array {
  return new Int32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

/** ||a - b|| / ||b||; NaN anywhere fails. */
export function relErr(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} vs ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    if (Number.isNaN(a[i])) return Infinity;
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

/** Tolerance for one rounding of outputs to `dtype` on top of fp32 math. */
export function tol(dtype: HalfDType): number {
  return dtype === "float16" ? 2e-3 : 1e-2;
}

/** 0..n-1 in a random order (block tables that are not contiguous). */
export function permutation(rng: Rng, n: number): number[] {
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rng.uniform() * (i + 1));
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
}
