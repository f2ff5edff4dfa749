/**
 * The primitive ops of the fp32 reference, as plain loops over Float32Array. A batch of activations is
 * stored row after row: row t of an [n, dim] batch starts at t * dim. Values are stored in fp32; sums run
 * in float64 (JavaScript's number), so the reference is at least as accurate as any fp32 kernel.
 */

/** A row-major fp32 matrix [rows = out features][cols = in features], as in PyTorch's Linear. */
export interface Matrix {
  rows: number;
  cols: number;
  data: Float32Array;
}

/**
 * The sum of a[aOffset + i] * b[bOffset + i] for i < n. Four partial sums, because one sum waits on each
 * previous addition: this runs about four times faster, and the order of additions is fixed all the same.
 */
export function dot(a: Float32Array, aOffset: number, b: Float32Array, bOffset: number, n: number): number {
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[aOffset + i] * b[bOffset + i];
    s1 += a[aOffset + i + 1] * b[bOffset + i + 1];
    s2 += a[aOffset + i + 2] * b[bOffset + i + 2];
    s3 += a[aOffset + i + 3] * b[bOffset + i + 3];
  }
  for (; i < n; i++) s0 += a[aOffset + i] * b[bOffset + i];
  return s0 + s1 + (s2 + s3);
}

/**
 * y[t] = W x[t] for each of the n rows of x (a matVec when n = 1), as a new [n, W.rows] batch. Each output
 * is one dot product, so a row's result does not depend on what else is in the batch.
 */
export function matMul(x: Float32Array, n: number, w: Matrix): Float32Array {
  const { rows, cols, data } = w;
  const y = new Float32Array(n * rows);
  // Weight rows outside, tokens inside: each weight row is read from memory once per batch.
  for (let r = 0; r < rows; r++) {
    const wOffset = r * cols;
    for (let t = 0; t < n; t++) y[t * rows + r] = dot(data, wOffset, x, t * cols, cols);
  }
  return y;
}

/** Llama's RMSNorm of each of the n rows: x / sqrt(mean(x^2) + eps) * weight. `out` may be `x`. */
export function rmsNorm(out: Float32Array, x: Float32Array, n: number, weight: Float32Array, eps: number): void {
  const dim = weight.length;
  for (let t = 0; t < n; t++) {
    const offset = t * dim;
    const scale = 1 / Math.sqrt(dot(x, offset, x, offset, dim) / dim + eps);
    for (let i = 0; i < dim; i++) out[offset + i] = x[offset + i] * scale * weight[i];
  }
}

export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

/** The gated MLP's activation, in place: gate = silu(gate) * up. */
export function swiGlu(gate: Float32Array, up: Float32Array): void {
  for (let i = 0; i < gate.length; i++) gate[i] = silu(gate[i]) * up[i];
}

/** x += y (the residual stream). */
export function addInto(x: Float32Array, y: Float32Array): void {
  for (let i = 0; i < x.length; i++) x[i] += y[i];
}

/** Index of the largest of x[0..n); the lowest index wins ties. */
export function argmax(x: Float32Array, n = x.length): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** Softmax of x[0..n) in place, with the max subtracted so that exp cannot overflow. */
export function softmax(x: Float32Array, n = x.length): void {
  const max = x[argmax(x, n)];
  let sum = 0;
  for (let i = 0; i < n; i++) {
    x[i] = Math.exp(x[i] - max);
    sum += x[i];
  }
  for (let i = 0; i < n; i++) x[i] /= sum;
}

/** out = log_softmax(x): x - max - log(sum(exp(x - max))). `out` may be `x`. */
export function logSoftmax(out: Float32Array, x: Float32Array): void {
  const max = x[argmax(x)];
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += Math.exp(x[i] - max);
  const logSum = Math.log(sum);
  for (let i = 0; i < x.length; i++) out[i] = x[i] - max - logSum;
}
