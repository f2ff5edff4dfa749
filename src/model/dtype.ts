/** Floating-point storage types, with Hugging Face's names. Math on the CPU is always fp32. */
export type FloatDType = "float32" | "float16" | "bfloat16";

export const FLOAT_DTYPES: readonly FloatDType[] = ["float32", "float16", "bfloat16"];

export function bytesPerElement(dtype: FloatDType): number {
  return dtype === "float32" ? 4 : 2;
}

export function isFloatDType(s: string): s is FloatDType {
  return (FLOAT_DTYPES as readonly string[]).includes(s);
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** bf16 is the top half of an fp32: widening is a shift. */
export function bf16ToF32(h: number): number {
  u32[0] = h << 16;
  return f32[0];
}

/** Round to nearest even, as PyTorch does; NaN stays NaN. */
export function f32ToBf16(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x40) & 0xffff;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** Round to nearest even; overflow becomes infinity, as in PyTorch's `.half()`. */
export function f32ToF16(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let h = mant >>> shift;
    if (rest > half || (rest === half && h & 1)) h++;
    return sign | h;
  }
  const rest = mant & 0x1fff;
  let h = (e << 10) | (mant >>> 13);
  if (rest > 0x1000 || (rest === 0x1000 && h & 1)) h++;
  return sign | h;
}

/** Decode little-endian storage of `dtype` into fp32 values (`out` must hold bytes/size elements). */
export function toFloat32(bytes: Uint8Array, dtype: FloatDType, out?: Float32Array): Float32Array {
  const n = bytes.byteLength / bytesPerElement(dtype);
  const dst = out ?? new Float32Array(n);
  if (dtype === "float32") {
    const src = aligned(bytes, 4);
    dst.set(new Float32Array(src.buffer, src.byteOffset, n));
    return dst;
  }
  const src = aligned(bytes, 2);
  const half = new Uint16Array(src.buffer, src.byteOffset, n);
  if (dtype === "bfloat16") {
    const wide = new Uint32Array(dst.buffer, dst.byteOffset, n);
    for (let i = 0; i < n; i++) wide[i] = half[i] << 16;
  } else {
    for (let i = 0; i < n; i++) dst[i] = f16ToF32(half[i]);
  }
  return dst;
}

/** Encode fp32 values as little-endian `dtype` storage, rounding to nearest even. */
export function fromFloat32(values: Float32Array, dtype: FloatDType): Uint8Array {
  if (dtype === "float32") return new Uint8Array(values.slice().buffer);
  const out = new Uint16Array(values.length);
  const round = dtype === "bfloat16" ? f32ToBf16 : f32ToF16;
  for (let i = 0; i < values.length; i++) out[i] = round(values[i]);
  return new Uint8Array(out.buffer);
}

/** Typed-array views need aligned offsets; bytes sliced out of a file may not be. */
function aligned(bytes: Uint8Array, align: number): Uint8Array {
  return bytes.byteOffset % align === 0 ? bytes : bytes.slice();
}
