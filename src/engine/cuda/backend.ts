import { DecimaError, fail } from "../../errors.js";
import type { ModelConfig } from "../../model/config.js";
import { type EngineTensor, readEngineManifest } from "../../model/engine-file.js";
import { type LinearWeight, type ModelWeights, stepWeightBytes } from "../../model/weights.js";
import type { Backend, KvCacheShape, SamplingBatch, StepBatch, StepResult } from "../backend.js";
import { validateBatch } from "../validate-batch.js";
import { type NativeAddon, type NativeModel, type NativeStep, cudaDevice } from "./native.js";

export interface CudaBackendOptions {
  /** KV blocks in the pool; by default as many as `kvMemoryFraction` of the free memory holds. */
  numBlocks?: number;
  blockSize?: number;
  /** Fraction of the GPU memory left after weights and workspace that the KV pool takes (default 0.9). */
  kvMemoryFraction?: number;
  /** Most tokens in one step (prefill chunks plus decodes; default 4096); sizes the workspace. */
  maxBatchTokens?: number;
  /** Most sequences in one step. */
  maxBatchSeqs?: number;
  /** Replay decode steps from captured CUDA graphs (default true; DECIMA_CUDA_GRAPHS=0 turns it off). */
  graphs?: boolean;
  /** Overlap consecutive kernels with programmatic dependent launch (default true; DECIMA_PDL=0). */
  pdl?: boolean;
  /**
   * Run the MLP of int4 decode steps (up to 8 sequences) as one kernel whose partial sums meet in the
   * residual stream by atomic additions: faster, but their order, and so the last bits of the logits, vary
   * from run to run (default true; DECIMA_FUSED_MLP=0 turns it off for bit-reproducible runs).
   */
  fusedMlp?: boolean;
  /**
   * Run the O projection of int4 decode steps of one or two sequences inside the decode attention kernel,
   * its partial sums added into the residual stream by atomic additions like the fused MLP's (default
   * true; DECIMA_FUSED_O=0 turns it off, with DECIMA_FUSED_MLP=0 for bit-reproducible runs).
   */
  fusedO?: boolean;
  /**
   * At load, tune and capture the decode graphs of every batch size up to this many sequences (default 1).
   * A server wants them all: a batch size met for the first time costs its GEMMs' tuning and a capture
   * (tens of milliseconds) inside a request.
   */
  warmupSeqs?: number;
}

/**
 * The CUDA backend: weights uploaded once (already packed: fused QKV and gate/up), a KV pool sized from the
 * free memory, and each step one native call that runs off the JavaScript thread. Decode-only batches may
 * ask for several steps at once: the GPU feeds each sampled token back itself, replaying a captured graph.
 */
export class CudaBackend implements Backend {
  readonly device = "cuda" as const;
  readonly kv: KvCacheShape;
  readonly description: string;
  readonly maxSteps = 64;
  /** Not yet: the native side of carried rows waits for a GPU run (branch async-scheduling). */
  readonly carries = false;
  readonly maxBatchTokens: number;
  readonly maxBatchSeqs: number;

  private constructor(
    readonly config: ModelConfig,
    readonly weightBytes: number,
    private model: NativeModel | null,
    blockSize: number,
    limits: { tokens: number; seqs: number },
  ) {
    this.kv = { blockSize, numBlocks: model!.numBlocks };
    this.description = model!.description;
    this.maxBatchTokens = limits.tokens;
    this.maxBatchSeqs = limits.seqs;
  }

  /** A backend for weights in memory (packed from a checkpoint, or an engine read by the CPU path). */
  static async create(weights: ModelWeights, opts: CudaBackendOptions = {}): Promise<CudaBackend> {
    if (weights.dtype === "float32") fail("device", "the CUDA backend runs float16 or bfloat16 weights, not float32");
    const layout = { config: weights.config, dtype: weights.dtype, ...quantization(weights), weightBytes: stepWeightBytes(weights) };
    return CudaBackend.open(layout, opts, (model) => upload(model, weights));
  }

  /**
   * A backend for a decima engine directory: the weights go from weights.bin to the GPU through pinned
   * buffers in the native addon, never through the JavaScript heap (the engine's point: load fast).
   */
  static async fromEngine(dir: string, opts: CudaBackendOptions = {}): Promise<CudaBackend> {
    const info = await readEngineManifest(dir);
    const { manifest } = info;
    const layout = {
      config: info.config,
      dtype: manifest.dtype,
      quant: manifest.quant.kind,
      groupSize: manifest.quant.groupSize ?? 128,
      headQuant: manifest.tensors.some((t) => t.name === "lmHead" && t.format === "int8") ? ("int8" as const) : ("none" as const),
      weightBytes: manifest.tensors.reduce((n, t) => n + (t.name === "embed" && !info.config.tieWordEmbeddings ? 0 : regionBytes(t)), 0),
    };
    return CudaBackend.open(layout, opts, (model) => {
      for (const t of manifest.tensors) {
        const [name, layer] = nativeName(t.name);
        nativeCall(() => model.uploadFile(name, layer, info.weightsPath, t.offset, t.bytes));
        if (t.format === "int8" || t.format === "int4") {
          nativeCall(() => model.uploadFile(`${name}.scales`, layer, info.weightsPath, t.scalesOffset, t.scalesBytes));
        }
      }
    });
  }

  private static async open(layout: WeightLayout, opts: CudaBackendOptions, fill: (model: NativeModel) => void): Promise<CudaBackend> {
    const dev = cudaDevice();
    if (!dev.ok) fail("device", `the CUDA backend is unavailable: ${dev.reason}`);
    const c = layout.config;
    const blockSize = opts.blockSize ?? 16;
    // 4096 tokens a step: prefill in large chunks (time to first token under load), 240 MB of workspace.
    const limits = { tokens: opts.maxBatchTokens ?? 4096, seqs: opts.maxBatchSeqs ?? 256 };
    const model = nativeCall(() =>
      newModel(dev.addon, {
        vocab: c.vocabSize,
        hidden: c.hiddenSize,
        layers: c.layers.map((l) => ({ heads: l.numHeads, kvHeads: l.numKvHeads, headDim: l.headDim, inter: l.intermediateSize })),
        eps: c.rmsNormEps,
        ropeTheta: c.rope.theta,
        ropeFactor: c.rope.linearFactor,
        maxPos: c.maxPositionEmbeddings,
        dtype: layout.dtype,
        tied: c.tieWordEmbeddings,
        quant: layout.quant,
        groupSize: layout.groupSize,
        headQuant: layout.headQuant,
        blockSize,
        kvBlocks: opts.numBlocks ?? 0,
        kvFraction: opts.kvMemoryFraction ?? 0.9,
        maxTokens: limits.tokens,
        maxSeqs: limits.seqs,
        graphs: opts.graphs ?? process.env.DECIMA_CUDA_GRAPHS !== "0",
        pdl: opts.pdl ?? process.env.DECIMA_PDL !== "0",
        fusedMlp: opts.fusedMlp ?? process.env.DECIMA_FUSED_MLP !== "0",
        fusedO: opts.fusedO ?? process.env.DECIMA_FUSED_O !== "0",
        profile: process.env.DECIMA_PROFILE === "1",
      }),
    );
    try {
      fill(model);
      nativeCall(() => model.warmup(Math.min(opts.warmupSeqs ?? 1, limits.seqs)));
    } catch (err) {
      model.close();
      throw err;
    }
    return new CudaBackend(c, layout.weightBytes, model, blockSize, limits);
  }

  async step(batch: StepBatch): Promise<StepResult> {
    const model = this.model;
    if (!model) fail("device", "the CUDA backend is closed");
    validateBatch(batch, this);
    const r = await nativeAsync(() => model.step(toNative(batch)));
    return {
      tokens: r.tokens,
      logprobs: r.logprobs,
      topTokens: r.topIds,
      topLogprobs: r.topLogprobs,
      logits: r.logits,
    };
  }

  async close(): Promise<void> {
    this.model?.close();
    this.model = null;
  }
}

/** What the native model is built for: the architecture, how its weights are stored, what a step reads. */
interface WeightLayout {
  config: ModelConfig;
  dtype: "float16" | "bfloat16";
  quant: "none" | "int8" | "int4";
  groupSize: number;
  headQuant: "none" | "int8";
  weightBytes: number;
}

/** An engine tensor's name ("layers.3.gateUp") as the native side names it ("gate_up", layer 3). */
function nativeName(engineName: string): [string, number] {
  const names: Record<string, string> = {
    embed: "embed",
    norm: "norm",
    lmHead: "lm_head",
    inputNorm: "in_norm",
    qkv: "qkv",
    o: "o",
    postNorm: "post_norm",
    gateUp: "gate_up",
    down: "down",
  };
  const m = /^layers\.(\d+)\.(\w+)$/.exec(engineName);
  const [part, layer] = m ? [m[2], Number(m[1])] : [engineName, -1];
  if (!(part in names)) fail("engine", `engine tensor ${engineName} is unknown to the CUDA backend`);
  return [names[part], layer];
}

function regionBytes(t: EngineTensor): number {
  return t.bytes + (t.format === "int8" || t.format === "int4" ? t.scalesBytes : 0);
}

function newModel(addon: NativeAddon, opts: ConstructorParameters<NativeAddon["Model"]>[0]): NativeModel {
  return new addon.Model(opts);
}

/**
 * The storage of the decoder layers' linear layers (one format for all of them, as decima build writes) and
 * of the LM head (16-bit or int8).
 */
function quantization(w: ModelWeights): Pick<WeightLayout, "quant" | "groupSize" | "headQuant"> {
  const first = w.layers[0].qkv;
  for (const [i, l] of w.layers.entries()) {
    for (const m of [l.qkv, l.o, l.gateUp, l.down]) {
      if (m.format !== first.format) fail("device", `layer ${i}: mixed weight formats (${m.format} and ${first.format}) are not supported on CUDA`);
      if (m.format !== "dense" && m.scaleDtype !== "float16") fail("device", `layer ${i}: ${m.format} scales must be float16 on CUDA`);
    }
  }
  const head = w.lmHead;
  if (head.format === "int4") fail("device", "an int4 LM head is not supported on CUDA (16-bit or int8)");
  if (head.format === "int8" && head.scaleDtype !== "float16") fail("device", "the LM head's int8 scales must be float16 on CUDA");
  return {
    quant: first.format === "dense" ? "none" : first.format,
    groupSize: first.format === "int4" ? first.groupSize : 128,
    headQuant: head.format === "int8" ? "int8" : "none",
  };
}

/** Weights go up one tensor at a time, under the names the native side allocated ("<name>.scales" too). */
function upload(model: NativeModel, w: ModelWeights): void {
  const put = (name: string, layer: number, data: Uint8Array) => nativeCall(() => model.upload(name, layer, data));
  const linear = (name: string, layer: number, m: LinearWeight) => {
    put(name, layer, m.data);
    if (m.format !== "dense") put(`${name}.scales`, layer, m.scales);
  };
  put("embed", -1, w.embed.data);
  w.layers.forEach((l, i) => {
    put("in_norm", i, l.inputNorm.data);
    linear("qkv", i, l.qkv);
    linear("o", i, l.o);
    put("post_norm", i, l.postNorm.data);
    linear("gate_up", i, l.gateUp);
    linear("down", i, l.down);
  });
  put("norm", -1, w.norm.data);
  if (!w.config.tieWordEmbeddings) linear("lm_head", -1, w.lmHead);
}

function toNative(b: StepBatch): NativeStep {
  const s = b.sampling;
  const pen = penaltyEntries(s, b.contextLens.length);
  return {
    tokens: b.tokens,
    queryStarts: b.queryStarts,
    contextLens: b.contextLens,
    blockTables: b.blockTables.subarray(0, b.contextLens.length * b.blockTableWidth),
    blockTableWidth: b.blockTableWidth,
    sample: b.sample,
    temperature: s.temperature,
    topK: s.topK,
    topP: s.topP,
    minP: s.minP,
    repetitionPenalty: s.repetitionPenalty,
    frequencyPenalty: s.frequencyPenalty,
    presencePenalty: s.presencePenalty,
    seed: s.seed,
    counter: s.counter,
    penaltyStarts: pen.starts,
    penaltyTokens: pen.tokens,
    penaltyCounts: pen.counts,
    steps: b.steps ?? 1,
    topLogprobs: s.topLogprobs,
    logits: b.returnLogits === "all" ? 2 : b.returnLogits === "last" ? 1 : 0,
  };
}

/**
 * The penalties' view of each history: its distinct tokens, each with how often it was generated (the
 * repetition penalty applies to every listed token, frequency and presence to generated ones).
 */
export function penaltyEntries(s: SamplingBatch, numSeqs: number) {
  const starts = new Int32Array(numSeqs + 1);
  const tokens: number[] = [];
  const counts: number[] = [];
  for (let i = 0; i < numSeqs; i++) {
    const from = s.historyStarts[i], to = s.historyStarts[i + 1];
    const generated = new Map<number, number>();
    for (let j = from; j < to; j++) {
      const tok = s.history[j];
      generated.set(tok, (generated.get(tok) ?? 0) + (j - from >= s.promptLens[i] ? 1 : 0));
    }
    for (const [tok, n] of generated) {
      tokens.push(tok);
      counts.push(n);
    }
    starts[i + 1] = tokens.length;
  }
  return { starts, tokens: Int32Array.from(tokens), counts: Int32Array.from(counts) };
}

/** Native failures (CUDA errors, out of memory, refused inputs) surface as one-line device errors. */
function nativeCall<T>(f: () => T): T {
  try {
    return f();
  } catch (err) {
    throw err instanceof DecimaError ? err : new DecimaError("device", `CUDA: ${(err as Error).message}`);
  }
}

async function nativeAsync<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (err) {
    throw err instanceof DecimaError ? err : new DecimaError("device", `CUDA: ${(err as Error).message}`);
  }
}
