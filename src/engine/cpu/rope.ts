import type { RopeSpec } from "../../model/config.js";

/**
 * Rotary position embeddings as Hugging Face's Llama computes them. Dimension i of a head pairs with
 * i + d/2 (the rotate_half convention, not interleaved pairs) and turns by pos * inv_freq[i].
 *
 * PyTorch computes inv_freq, the scaled position and their product in fp32, then takes cos and sin of the
 * fp32 angle. At long positions that rounding moves the angle by far more than fp32 epsilon, so each step
 * is rounded to fp32 here too (Math.fround), to match Hugging Face rather than exact math.
 */
export class Rope {
  private readonly invFreq: Float32Array;
  private readonly half: number;

  constructor(
    private readonly headDim: number,
    private readonly spec: RopeSpec,
  ) {
    this.half = headDim / 2;
    this.invFreq = ropeInvFreq(headDim, spec.theta);
  }

  /** Rotate `numHeads` consecutive heads of x, from x[offset], as for a token at position `pos`. */
  apply(x: Float32Array, offset: number, numHeads: number, pos: number): void {
    const { half, headDim } = this;
    const t = Math.fround(pos / this.spec.linearFactor);
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(t * this.invFreq[i]);
      const cos = Math.fround(Math.cos(angle));
      const sin = Math.fround(Math.sin(angle));
      for (let h = 0; h < numHeads; h++) {
        const a = offset + h * headDim + i;
        const x1 = x[a];
        const x2 = x[a + half];
        x[a] = x1 * cos - x2 * sin;
        x[a + half] = x2 * cos + x1 * sin;
      }
    }
  }
}

/**
 * inv_freq[i] = 1 / theta^(2i / d), each operation in fp32 as PyTorch does it. The power is rounded
 * correctly (from float64); fp32 pow implementations differ from that, and from each other, by up to 1 ulp.
 */
export function ropeInvFreq(headDim: number, theta: number): Float32Array {
  const invFreq = new Float32Array(headDim / 2);
  for (let i = 0; i < invFreq.length; i++) {
    const exponent = Math.fround((2 * i) / headDim);
    invFreq[i] = 1 / Math.fround(Math.pow(Math.fround(theta), exponent));
  }
  return invFreq;
}
