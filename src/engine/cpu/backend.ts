import { fail } from "../../errors.js";
import type { LayerSpec, ModelConfig } from "../../model/config.js";
import type { LayerWeights, ModelWeights } from "../../model/weights.js";
import type { Backend, KvCacheShape, StepBatch, StepResult } from "../backend.js";
import { StepSequence, runSteps } from "../decode-steps.js";
import { validateBatch } from "../validate-batch.js";
import { type SeqRows, attention } from "./attention.js";
import { dequantize, vectorValues } from "./dequantize.js";
import { KvCache } from "./kv-cache.js";
import { type Matrix, addInto, matMul, rmsNorm, swiGlu } from "./ops.js";
import { Rope } from "./rope.js";
import { sampleSequence, samplingParams } from "./sampler.js";

export interface CpuBackendOptions {
  /**
   * KV blocks in the pool. Default: enough for 64 sequences of the full context
   * (64 * ceil(maxPositionEmbeddings / blockSize)); the OS commits that memory only as blocks are written.
   */
  numBlocks?: number;
  /** Token slots per KV block (default 16). */
  blockSize?: number;
}

/** A layer in fp32, with the fused QKV and gate/up matrices viewed as their parts (no copies). */
interface Layer {
  spec: LayerSpec;
  rope: Rope;
  inputNorm: Float32Array;
  q: Matrix;
  k: Matrix;
  v: Matrix;
  o: Matrix;
  postNorm: Float32Array;
  gate: Matrix;
  up: Matrix;
  down: Matrix;
}

/**
 * The reference backend: the model's forward pass and sampling in plain TypeScript with fp32 values, every
 * weight format dequantized to fp32 once at construction. It is the executable specification that the
 * CUDA backend is tested against, so it is written to be read first and to be fast enough second.
 */
export class CpuBackend implements Backend {
  readonly device = "cpu";
  readonly config: ModelConfig;
  readonly kv: KvCacheShape;
  readonly description = "cpu fp32";
  readonly maxSteps = 64;
  readonly carries = true;
  readonly maxBatchTokens = Infinity;
  readonly maxBatchSeqs = Infinity;
  /** The fp32 copies it computes from: four bytes a parameter whatever the storage. */
  readonly weightBytes: number;
  private readonly embed: Matrix;
  private readonly layers: Layer[];
  private readonly norm: Float32Array;
  private readonly lmHead: Matrix;
  private readonly cache: KvCache;
  /** Attention scores of one query head, for up to the model's whole context. */
  private readonly scores: Float32Array;

  constructor(weights: ModelWeights, options: CpuBackendOptions = {}) {
    const config = weights.config;
    const blockSize = options.blockSize ?? 16;
    const numBlocks = options.numBlocks ?? 64 * Math.ceil(config.maxPositionEmbeddings / blockSize);
    for (const [name, value] of Object.entries({ blockSize, numBlocks })) {
      if (!Number.isInteger(value) || value < 1) {
        fail("config", `CPU backend: ${name} ${value} must be a positive integer`);
      }
    }
    this.config = config;
    this.kv = { blockSize, numBlocks };
    this.embed = dequantize(weights.embed, "embed");
    this.layers = weights.layers.map((w, i) => fp32Layer(w, config.layers[i], config, `layers.${i}`));
    this.norm = vectorValues(weights.norm, "norm");
    this.lmHead = weights.lmHead === weights.embed ? this.embed : dequantize(weights.lmHead, "lmHead");
    this.cache = new KvCache(config.layers, numBlocks, blockSize);
    this.weightBytes = fp32Bytes(weights);
    this.scores = new Float32Array(config.maxPositionEmbeddings);
  }

  // A call computes in a later turn of the event loop, not in the microtask that asked for it: the engine
  // asks for the next call before it hands out the last one's tokens, and those (a stream's write, a
  // consumer's loop) would otherwise wait behind the whole call. Requests and client I/O get in between
  // calls the same way.
  private readonly calls = new StepSequence(
    (batch) => validateBatch(batch, this),
    async (batch) => {
      await new Promise((resolve) => setImmediate(resolve));
      return runSteps(batch, async (b) => this.stepOnce(b));
    },
  );

  step(batch: StepBatch): Promise<StepResult> {
    return this.calls.step(batch);
  }

  private stepOnce(batch: StepBatch): StepResult {
    const seqs = sequenceRows(batch);
    const positions = tokenPositions(seqs, batch.tokens.length);
    const x = this.embedTokens(batch.tokens);
    this.layers.forEach((layer, i) => this.runLayer(i, layer, x, seqs, positions));
    const rows = logitRows(batch, seqs);
    const logits = this.logits(x, rows);
    const result = this.sample(batch, seqs, rows, logits);
    if (batch.returnLogits === "last" || batch.returnLogits === "all") result.logits = logits;
    return result;
  }

  /** Nothing to release: the weights and the cache are ordinary garbage-collected arrays. */
  async close(): Promise<void> {}

  private embedTokens(tokens: Int32Array): Float32Array {
    const dim = this.config.hiddenSize;
    const x = new Float32Array(tokens.length * dim);
    tokens.forEach((id, t) => x.set(this.embed.data.subarray(id * dim, (id + 1) * dim), t * dim));
    return x;
  }

  /** One decoder layer over all new tokens of the batch, updating the residual stream x in place. */
  private runLayer(index: number, layer: Layer, x: Float32Array, seqs: SeqRows[], positions: Int32Array): void {
    const n = positions.length;
    const eps = this.config.rmsNormEps;
    const { numHeads, numKvHeads, headDim } = layer.spec;
    const h = new Float32Array(x.length);

    rmsNorm(h, x, n, layer.inputNorm, eps);
    const q = matMul(h, n, layer.q);
    const k = matMul(h, n, layer.k);
    const v = matMul(h, n, layer.v);
    for (let t = 0; t < n; t++) {
      layer.rope.apply(q, t * numHeads * headDim, numHeads, positions[t]);
      layer.rope.apply(k, t * numKvHeads * headDim, numKvHeads, positions[t]);
    }
    // Every new token's K and V go into the cache first: attention then reads a sequence's past and
    // present alike from there.
    for (const seq of seqs) {
      for (let t = seq.firstRow; t < seq.firstRow + seq.queryLen; t++) {
        this.cache.write(index, seq.blockTable, positions[t], k, v, t * numKvHeads * headDim);
      }
    }
    const att = new Float32Array(q.length);
    for (const seq of seqs) attention(att, q, seq, this.cache, index, this.scores);
    addInto(x, matMul(att, n, layer.o));

    rmsNorm(h, x, n, layer.postNorm, eps);
    const gate = matMul(h, n, layer.gate);
    swiGlu(gate, matMul(h, n, layer.up));
    addInto(x, matMul(gate, n, layer.down));
  }

  /** Final norm and LM head, for the listed rows of x only: [rows.length, vocabSize]. */
  private logits(x: Float32Array, rows: number[]): Float32Array {
    const dim = this.config.hiddenSize;
    const h = new Float32Array(rows.length * dim);
    rows.forEach((r, i) => h.set(x.subarray(r * dim, (r + 1) * dim), i * dim));
    rmsNorm(h, h, rows.length, this.norm, this.config.rmsNormEps);
    return matMul(h, rows.length, this.lmHead);
  }

  /** Sequences not sampled keep token -1, log-prob 0 and top tokens -1. */
  private sample(batch: StepBatch, seqs: SeqRows[], rows: number[], logits: Float32Array): StepResult {
    const numSeqs = seqs.length;
    const top = batch.sampling.topLogprobs;
    const vocab = this.config.vocabSize;
    const result: StepResult = {
      tokens: new Int32Array(numSeqs).fill(-1),
      logprobs: new Float32Array(numSeqs),
      topTokens: new Int32Array(numSeqs * top).fill(-1),
      topLogprobs: new Float32Array(numSeqs * top),
    };
    seqs.forEach((seq, i) => {
      if (!batch.sample[i]) return;
      const at = rows.indexOf(lastRow(seq));
      const row = logits.subarray(at * vocab, (at + 1) * vocab);
      const s = sampleSequence(row, samplingParams(batch.sampling, i), top);
      result.tokens[i] = s.token;
      result.logprobs[i] = s.logprob;
      result.topTokens.set(s.topTokens, i * top);
      result.topLogprobs.set(s.topLogprobs, i * top);
    });
    return result;
  }
}

function fp32Layer(w: LayerWeights, spec: LayerSpec, config: ModelConfig, name: string): Layer {
  const qkv = dequantize(w.qkv, `${name}.qkv`);
  const gateUp = dequantize(w.gateUp, `${name}.gateUp`);
  const qRows = spec.numHeads * spec.headDim;
  const kvRows = spec.numKvHeads * spec.headDim;
  return {
    spec,
    rope: new Rope(spec.headDim, config.rope),
    inputNorm: vectorValues(w.inputNorm, `${name}.inputNorm`),
    q: rowsOf(qkv, 0, qRows),
    k: rowsOf(qkv, qRows, kvRows),
    v: rowsOf(qkv, qRows + kvRows, kvRows),
    o: dequantize(w.o, `${name}.o`),
    postNorm: vectorValues(w.postNorm, `${name}.postNorm`),
    gate: rowsOf(gateUp, 0, spec.intermediateSize),
    up: rowsOf(gateUp, spec.intermediateSize, spec.intermediateSize),
    down: dequantize(w.down, `${name}.down`),
  };
}

/** Rows first .. first + count of m, as a matrix sharing m's values. */
function rowsOf(m: Matrix, first: number, count: number): Matrix {
  return { rows: count, cols: m.cols, data: m.data.subarray(first * m.cols, (first + count) * m.cols) };
}

function sequenceRows(batch: StepBatch): SeqRows[] {
  const { queryStarts, contextLens, blockTables, blockTableWidth: width } = batch;
  return Array.from(contextLens, (contextLen, i) => ({
    firstRow: queryStarts[i],
    queryLen: queryStarts[i + 1] - queryStarts[i],
    contextLen,
    blockTable: blockTables.subarray(i * width, (i + 1) * width),
  }));
}

/** Each new token's position in its sequence. */
function tokenPositions(seqs: SeqRows[], numTokens: number): Int32Array {
  const positions = new Int32Array(numTokens);
  for (const seq of seqs) {
    for (let j = 0; j < seq.queryLen; j++) positions[seq.firstRow + j] = seq.contextLen - seq.queryLen + j;
  }
  return positions;
}

function lastRow(seq: SeqRows): number {
  return seq.firstRow + seq.queryLen - 1;
}

/**
 * The rows that go through the LM head: every row when all logits are asked for; otherwise each sequence's
 * last row, for every sequence when "last" logits are asked for, else only for the sequences to sample.
 */
function logitRows(batch: StepBatch, seqs: SeqRows[]): number[] {
  if (batch.returnLogits === "all") return Array.from(batch.tokens, (_, t) => t);
  return seqs.filter((_, i) => batch.returnLogits === "last" || batch.sample[i]).map(lastRow);
}

function fp32Bytes(w: ModelWeights): number {
  const params = (m: { rows: number; cols: number }) => m.rows * m.cols;
  let n = w.norm.length + params(w.lmHead);
  for (const l of w.layers) n += l.inputNorm.length + l.postNorm.length + params(l.qkv) + params(l.o) + params(l.gateUp) + params(l.down);
  return 4 * n;
}
