import type { KvCache } from "./kv-cache.js";
import { dot, softmax } from "./ops.js";

/** One sequence's share of a step: the rows of its new tokens in the batch, and its cache. */
export interface SeqRows {
  firstRow: number;
  queryLen: number;
  /** Tokens in the cache after this step: new token j sits at position contextLen - queryLen + j. */
  contextLen: number;
  /** The sequence's KV blocks in position order. */
  blockTable: Int32Array;
}

/**
 * Causal grouped-query attention of one sequence's new tokens over its paged cache, which already holds
 * their K and V: the token at position p sees positions 0..p (its past from earlier steps and the earlier
 * new tokens of this step). Query head h reads KV head floor(h / (numHeads / numKvHeads)).
 *
 * q and out are [batch rows][numHeads * headDim]; only the sequence's rows are read and written.
 * `scores` is scratch for at least contextLen values.
 */
export function attention(
  out: Float32Array,
  q: Float32Array,
  seq: SeqRows,
  cache: KvCache,
  layer: number,
  scores: Float32Array,
): void {
  const { numHeads, numKvHeads, headDim } = cache.layers[layer];
  const group = numHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const keys = cache.k[layer];
  const values = cache.v[layer];
  const acc = new Float64Array(headDim);
  for (let j = 0; j < seq.queryLen; j++) {
    const pos = seq.contextLen - seq.queryLen + j;
    const row = (seq.firstRow + j) * numHeads * headDim;
    for (let h = 0; h < numHeads; h++) {
      const kvHead = Math.floor(h / group);
      const qOffset = row + h * headDim;
      for (let t = 0; t <= pos; t++) {
        scores[t] = dot(q, qOffset, keys, cache.offset(layer, seq.blockTable, t, kvHead), headDim) * scale;
      }
      softmax(scores, pos + 1);
      acc.fill(0);
      for (let t = 0; t <= pos; t++) {
        const p = scores[t];
        const vOffset = cache.offset(layer, seq.blockTable, t, kvHead);
        for (let i = 0; i < headDim; i++) acc[i] += p * values[vOffset + i];
      }
      for (let i = 0; i < headDim; i++) out[qOffset + i] = acc[i];
    }
  }
}
