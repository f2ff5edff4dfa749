import type { ModelConfig } from "./config.js";
import type { FloatDType } from "./dtype.js";

/**
 * Weights as the backends consume them: packed once at load (or at `decima build`) into the layout the
 * kernels read. Matrices are row-major [rows = out features, cols = in features], as in PyTorch's Linear.
 * Q, K and V are fused into one matrix (rows: all Q heads, then K heads, then V heads), and gate and up into
 * one (rows: gate, then up), so a layer runs four matrix products.
 */
export interface ModelWeights {
  config: ModelConfig;
  /** Storage type of the 16-bit (or fp32) tensors: embeddings, norms, dense matrices. */
  dtype: FloatDType;
  embed: DenseMatrix;
  layers: LayerWeights[];
  norm: Vector;
  /** For tied embeddings this is `embed` itself. */
  lmHead: LinearWeight;
}

export interface LayerWeights {
  inputNorm: Vector;
  qkv: LinearWeight;
  o: LinearWeight;
  postNorm: Vector;
  gateUp: LinearWeight;
  down: LinearWeight;
}

export interface Vector {
  dtype: FloatDType;
  length: number;
  data: Uint8Array;
}

export type LinearWeight = DenseMatrix | Int8Matrix | Int4Matrix;

export interface DenseMatrix {
  format: "dense";
  rows: number;
  cols: number;
  dtype: FloatDType;
  data: Uint8Array;
}

/** W8A16: int8 values, one scale per row (output channel): w = q * scale. */
export interface Int8Matrix {
  format: "int8";
  rows: number;
  cols: number;
  /** rows x cols int8. */
  data: Uint8Array;
  /** rows scales, stored as `scaleDtype`. */
  scales: Uint8Array;
  scaleDtype: FloatDType;
}

/** W4A16: symmetric int4 in groups of `groupSize` columns: w = q * scale[row][col / groupSize], q in -8..7. */
export interface Int4Matrix {
  format: "int4";
  rows: number;
  cols: number;
  groupSize: number;
  /** rows x cols/2 bytes: column 2j in the low nibble, 2j+1 in the high nibble, each stored as q + 8. */
  data: Uint8Array;
  /** rows x cols/groupSize scales, stored as `scaleDtype`. */
  scales: Uint8Array;
  scaleDtype: FloatDType;
}

/** Hugging Face tensor names (Llama's, which DeciCoder and DeciLM share). */
export const tensorNames = {
  embed: "model.embed_tokens.weight",
  norm: "model.norm.weight",
  lmHead: "lm_head.weight",
  layer(i: number) {
    const p = `model.layers.${i}`;
    return {
      inputNorm: `${p}.input_layernorm.weight`,
      q: `${p}.self_attn.q_proj.weight`,
      k: `${p}.self_attn.k_proj.weight`,
      v: `${p}.self_attn.v_proj.weight`,
      o: `${p}.self_attn.o_proj.weight`,
      postNorm: `${p}.post_attention_layernorm.weight`,
      gate: `${p}.mlp.gate_proj.weight`,
      up: `${p}.mlp.up_proj.weight`,
      down: `${p}.mlp.down_proj.weight`,
    };
  },
};

/** The names of the decoder layers' linear weights (what quantized checkpoints store otherwise). */
export function linearNames(config: ModelConfig): Set<string> {
  const names = new Set<string>();
  config.layers.forEach((_, i) => {
    const n = tensorNames.layer(i);
    for (const name of [n.q, n.k, n.v, n.o, n.gate, n.up, n.down]) names.add(name);
  });
  return names;
}

/** The shape every tensor the config needs must have, by name. */
export function expectedShapes(config: ModelConfig): Map<string, number[]> {
  const h = config.hiddenSize;
  const shapes = new Map<string, number[]>([
    [tensorNames.embed, [config.vocabSize, h]],
    [tensorNames.norm, [h]],
  ]);
  if (!config.tieWordEmbeddings) shapes.set(tensorNames.lmHead, [config.vocabSize, h]);
  config.layers.forEach((l, i) => {
    const n = tensorNames.layer(i);
    shapes.set(n.inputNorm, [h]);
    shapes.set(n.q, [l.numHeads * l.headDim, h]);
    shapes.set(n.k, [l.numKvHeads * l.headDim, h]);
    shapes.set(n.v, [l.numKvHeads * l.headDim, h]);
    shapes.set(n.o, [h, l.numHeads * l.headDim]);
    shapes.set(n.postNorm, [h]);
    shapes.set(n.gate, [l.intermediateSize, h]);
    shapes.set(n.up, [l.intermediateSize, h]);
    shapes.set(n.down, [h, l.intermediateSize]);
  });
  return shapes;
}

/**
 * Bytes of weights one decode step reads as stored here: every layer's norms and matrices (quantization
 * scales included), the final norm and the LM head. The embedding table is only gathered from (one row per
 * token), so it counts only where it doubles as the LM head.
 */
export function stepWeightBytes(w: ModelWeights): number {
  const linear = (m: LinearWeight) => m.data.byteLength + (m.format === "dense" ? 0 : m.scales.byteLength);
  let bytes = w.norm.data.byteLength + linear(w.lmHead);
  for (const l of w.layers) {
    bytes += l.inputNorm.data.byteLength + l.postNorm.data.byteLength;
    bytes += linear(l.qkv) + linear(l.o) + linear(l.gateUp) + linear(l.down);
  }
  return bytes;
}
