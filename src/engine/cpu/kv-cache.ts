import type { LayerSpec } from "../../model/config.js";

/**
 * The paged KV cache: for each layer, K and V as [numBlocks][numKvHeads][blockSize][headDim] (the layout
 * of backend.ts). Each layer is sized by its own spec, since DeciLM layers differ in KV heads. A sequence
 * finds position p in block blockTable[floor(p / blockSize)], slot p % blockSize.
 *
 * The arrays are allocated zeroed and untouched, so the OS commits their memory only as blocks are written.
 */
export class KvCache {
  readonly k: Float32Array[];
  readonly v: Float32Array[];

  constructor(
    readonly layers: readonly LayerSpec[],
    readonly numBlocks: number,
    readonly blockSize: number,
  ) {
    const size = (l: LayerSpec) => numBlocks * l.numKvHeads * blockSize * l.headDim;
    this.k = layers.map((l) => new Float32Array(size(l)));
    this.v = layers.map((l) => new Float32Array(size(l)));
  }

  /** Where head `head` of position `pos` starts in `layer`'s K (or V), for a sequence with `blockTable`. */
  offset(layer: number, blockTable: Int32Array, pos: number, head: number): number {
    const { numKvHeads, headDim } = this.layers[layer];
    const block = blockTable[Math.floor(pos / this.blockSize)];
    const slot = pos % this.blockSize;
    return ((block * numKvHeads + head) * this.blockSize + slot) * headDim;
  }

  /** Store one token's K and V heads (numKvHeads x headDim each, from k[offset] and v[offset]) at `pos`. */
  write(layer: number, blockTable: Int32Array, pos: number, k: Float32Array, v: Float32Array, offset: number): void {
    const { numKvHeads, headDim } = this.layers[layer];
    const kCache = this.k[layer];
    const vCache = this.v[layer];
    for (let h = 0; h < numKvHeads; h++) {
      const dst = this.offset(layer, blockTable, pos, h);
      const src = offset + h * headDim;
      for (let i = 0; i < headDim; i++) {
        kCache[dst + i] = k[src + i];
        vCache[dst + i] = v[src + i];
      }
    }
  }
}
