/**
 * The random stream of sampling, shared by the CPU and CUDA backends: a stateless, counter-based draw, so
 * that a sequence's draw for its n-th token depends on (seed, n) alone, whatever batch it runs in and on
 * whichever device. Both sides must compute it bit for bit alike: uint32 arithmetic only.
 */

/** MurmurHash3's finalizer: every input bit flips each output bit with probability about 1/2. */
export function fmix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}

/** Draw `counter` of stream `seed`: uniform in [0, 1), on a grid of 2^-24 (exact in fp32). */
export function uniformDraw(seed: number, counter: number): number {
  const mixed = fmix32((seed ^ fmix32((counter ^ 0x9e3779b9) >>> 0)) >>> 0);
  return (mixed >>> 8) / 16777216;
}
