import { fail } from "../errors.js";
import type { ModelConfig } from "./config.js";
import { type FloatDType, fromFloat32, toFloat32 } from "./dtype.js";
import { readGptqLinear } from "./gptq.js";
import { type DenseMatrix, type Int4Matrix, type LinearWeight, type ModelWeights, type Vector, expectedShapes, tensorNames } from "./weights.js";

/** A tensor as stored: dtype, shape, little-endian bytes. */
export interface RawTensor {
  dtype: FloatDType;
  shape: number[];
  data: Uint8Array;
}

/** Anything that yields tensors by Hugging Face name: a checkpoint on disk, or weights made in memory. */
export interface TensorSource {
  read(name: string): Promise<RawTensor>;
  /** Integer tensors (a GPTQ checkpoint's packed weights), where the source has them. */
  readInt32?(name: string): Promise<Int32Array>;
  has?(name: string): boolean;
}

/**
 * Pack a model's tensors into the layout the backends read (see ModelWeights), stored as `dtype`.
 * Tensors are read one at a time, so peak memory is the packed model plus one tensor.
 */
export async function packWeights(source: TensorSource, config: ModelConfig, dtype: FloatDType): Promise<ModelWeights> {
  const shapes = expectedShapes(config);
  const read = async (name: string): Promise<Uint8Array> => {
    const t = await source.read(name);
    const want = shapes.get(name);
    if (want && (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i]))) {
      fail("checkpoint", `tensor ${name} has shape [${t.shape}], the config needs [${want}]`);
    }
    return convert(t.data, t.dtype, dtype);
  };
  const matrix = async (names: string[]): Promise<DenseMatrix> => {
    const parts = [];
    for (const n of names) parts.push(await read(n));
    const cols = shapes.get(names[0])![1];
    const rows = names.reduce((sum, n) => sum + shapes.get(n)![0], 0);
    return { format: "dense", rows, cols, dtype, data: concat(parts) };
  };
  const vector = async (name: string): Promise<Vector> => ({ dtype, length: shapes.get(name)![0], data: await read(name) });
  // A GPTQ checkpoint's layers are int4 already: repacked, never rounded again.
  const gptq = config.gptq;
  const linear = async (names: string[]): Promise<LinearWeight> => {
    if (!gptq) return matrix(names);
    if (!source.readInt32 || !source.has) fail("checkpoint", "GPTQ weights need a checkpoint on disk");
    const parts: Int4Matrix[] = [];
    for (const n of names) {
      parts.push(await readGptqLinear(source as Required<TensorSource>, n, shapes.get(n)![0], shapes.get(n)![1], gptq.groupSize));
    }
    const rows = parts.reduce((sum, p) => sum + p.rows, 0);
    return { ...parts[0], rows, data: concat(parts.map((p) => p.data)), scales: concat(parts.map((p) => p.scales)) };
  };

  const embed = await matrix([tensorNames.embed]);
  const layers = [];
  for (let i = 0; i < config.layers.length; i++) {
    const n = tensorNames.layer(i);
    layers.push({
      inputNorm: await vector(n.inputNorm),
      qkv: await linear([n.q, n.k, n.v]),
      o: await linear([n.o]),
      postNorm: await vector(n.postNorm),
      gateUp: await linear([n.gate, n.up]),
      down: await linear([n.down]),
    });
  }
  const norm = await vector(tensorNames.norm);
  const lmHead = config.tieWordEmbeddings ? embed : await matrix([tensorNames.lmHead]);
  return { config, dtype, embed, layers, norm, lmHead };
}

/** In-memory fp32 tensors (e.g. from randomWeights) as a TensorSource. */
export function float32Source(tensors: Map<string, Float32Array>, shapes: Map<string, number[]>): TensorSource {
  return {
    async read(name) {
      const values = tensors.get(name);
      if (!values) fail("checkpoint", `tensor ${name} is missing`);
      return { dtype: "float32", shape: shapes.get(name) ?? [values.length], data: fromFloat32(values, "float32") };
    },
  };
}

function convert(data: Uint8Array, from: FloatDType, to: FloatDType): Uint8Array {
  if (from === to) return data;
  return fromFloat32(toFloat32(data, from), to);
}

function concat(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.byteLength;
  }
  return out;
}
