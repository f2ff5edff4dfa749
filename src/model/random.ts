import type { ModelConfig } from "./config.js";
import { expectedShapes, tensorNames } from "./weights.js";

/**
 * Random weights for test and benchmark models, scaled so that the model behaves like a trained one where
 * it matters for checking an engine: activations stay in fp16 range through every layer, and next-token
 * distributions are peaked (logits with a spread of about 4), so greedy decoding picks clear winners and
 * two correct engines agree on it.
 */
export function randomWeights(config: ModelConfig, seed: number): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const t of randomDraws(config, seed)) {
    const values = new Float32Array(t.shape.reduce((a, b) => a * b, 1));
    t.draw(values);
    out.set(t.name, values);
  }
  return out;
}

/** One tensor of the random weights, drawn on demand. */
export interface TensorDraw {
  name: string;
  shape: number[];
  /** Fill `out` with the tensor's next out.length values. */
  draw(out: Float32Array): void;
}

/**
 * The same weights as randomWeights, drawn from one stream in expectedShapes order. A tensor may be drawn
 * in pieces (each call goes on where the last stopped), so a billion-parameter model can be written out
 * through a small buffer; the tensors must be drawn in order, each to its end.
 */
export function randomDraws(config: ModelConfig, seed: number): TensorDraw[] {
  const rng = new Rng(seed);
  const shapes = [...expectedShapes(config)];
  const sizes = shapes.map(([, shape]) => shape.reduce((a, b) => a * b, 1));
  // Where the stream is: which tensor, and how many of its values are still to come.
  let current = 0;
  let left = sizes[0];
  return shapes.map(([name, shape], index) => ({
    name,
    shape,
    draw(out: Float32Array) {
      if (index !== current || out.length > left) throw new Error(`random tensor ${name} drawn out of order`);
      if (shape.length === 1) {
        // Norm gains near 1, but not exactly, so that a kernel ignoring them is caught.
        for (let i = 0; i < out.length; i++) out[i] = 1 + 0.2 * rng.uniformSigned();
      } else {
        rng.fillUniform(out, stdFor(name, shape, config));
      }
      left -= out.length;
      if (left === 0) left = sizes[++current];
    },
  }));
}

function stdFor(name: string, shape: number[], config: ModelConfig): number {
  // The LM head (or a tied embedding) sets the logits' spread; the first layer's norm rescales the rest.
  if (name === tensorNames.lmHead || (name === tensorNames.embed && config.tieWordEmbeddings)) {
    return 4 / Math.sqrt(config.hiddenSize);
  }
  if (name === tensorNames.embed) return 1;
  // Each product keeps its output at about unit scale; the residual stream grows slowly with depth.
  return 1 / Math.sqrt(shape[1]);
}

/**
 * xoshiro128** (fast and good enough for weights; not for cryptography). Uniform values, not normal ones:
 * a billion parameters are drawn in seconds, and the scale is what matters here.
 */
export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(seed: number) {
    // splitmix32 spreads any seed, 0 included, over the whole state.
    let x = seed >>> 0;
    const next = () => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next() | 1;
  }

  /** xoshiro128** step: a uint32. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform in [0, 1). */
  uniform(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform in [-1, 1). */
  uniformSigned(): number {
    return this.uniform() * 2 - 1;
  }

  /** Fill with uniform values of standard deviation `std` (half-width std * sqrt(3)). */
  fillUniform(out: Float32Array, std: number): void {
    const a = std * Math.sqrt(3);
    for (let i = 0; i < out.length; i++) out[i] = a * this.uniformSigned();
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
