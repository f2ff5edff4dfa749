import type { Backend, StepBatch, StepResult } from "../src/engine/backend.js";
import { CpuBackend } from "../src/engine/cpu/backend.js";
import { parseModelConfig } from "../src/model/config.js";
import { float32Source, packWeights } from "../src/model/pack.js";
import { randomWeights } from "../src/model/random.js";
import { expectedShapes } from "../src/model/weights.js";
import { Engine } from "../src/runtime/engine.js";
import type { SchedulerOptions } from "../src/runtime/scheduler.js";
import { buildTokenizerFiles } from "../src/tokenizer/build.js";
import { Tokenizer } from "../src/tokenizer/tokenizer.js";

/** A tiny Llama-style model (vocab 1024, hidden 64, GQA) for runtime tests: fast on the CPU backend. */
export function tinyConfig(maxPositionEmbeddings = 256) {
  return parseModelConfig({
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    vocab_size: 1024,
    hidden_size: 64,
    intermediate_size: 128,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: maxPositionEmbeddings,
    eos_token_id: 0,
    bos_token_id: 0,
  });
}

let tokenizer: Tokenizer | null = null;

/** The test tokenizer (StarCoder's special tokens, <|endoftext|> = 0), built once per process. */
export function testTokenizer(): Tokenizer {
  if (!tokenizer) {
    const files = buildTokenizerFiles();
    tokenizer = Tokenizer.fromObjects(files.tokenizerJson, files.tokenizerConfig);
  }
  return tokenizer;
}

export interface TinyOptions extends SchedulerOptions {
  numBlocks?: number;
  blockSize?: number;
  maxPositionEmbeddings?: number;
}

export async function tinyBackend(opts: TinyOptions = {}): Promise<CpuBackend> {
  const config = tinyConfig(opts.maxPositionEmbeddings);
  const source = float32Source(randomWeights(config, 7), expectedShapes(config));
  const weights = await packWeights(source, config, "float32");
  return new CpuBackend(weights, { numBlocks: opts.numBlocks ?? 64, blockSize: opts.blockSize ?? 16 });
}

/** Records every batch it runs; can be told to fail the steps a predicate picks. */
export class SpyBackend implements Backend {
  readonly batches: StepBatch[] = [];
  failWhen: ((batch: StepBatch) => boolean) | null = null;

  constructor(private readonly inner: Backend) {}

  get device() {
    return this.inner.device;
  }
  get config() {
    return this.inner.config;
  }
  get maxSteps() {
    return this.inner.maxSteps;
  }
  get carries() {
    return this.inner.carries;
  }
  get weightBytes() {
    return this.inner.weightBytes;
  }
  get maxBatchTokens() {
    return this.inner.maxBatchTokens;
  }
  get maxBatchSeqs() {
    return this.inner.maxBatchSeqs;
  }
  get kv() {
    return this.inner.kv;
  }
  get description() {
    return this.inner.description;
  }

  async step(batch: StepBatch): Promise<StepResult> {
    this.batches.push(batch);
    if (this.failWhen?.(batch)) throw new Error("injected backend failure");
    return this.inner.step(batch);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

export async function tinyEngine(opts: TinyOptions = {}): Promise<{ engine: Engine; backend: SpyBackend }> {
  const backend = new SpyBackend(await tinyBackend(opts));
  const engine = new Engine({ ...opts, backend, tokenizer: testTokenizer(), modelId: "tiny" });
  return { engine, backend };
}

/** An engine whose steps take a few milliseconds each, one token per step: requests last a while. */
export async function slowEngine(opts: TinyOptions = {}): Promise<{ engine: Engine; backend: SpyBackend }> {
  const { engine, backend } = await tinyEngine({ decodeSteps: 1, ...opts });
  const step = backend.step.bind(backend);
  backend.step = async (batch) => {
    await new Promise((resolve) => setTimeout(resolve, 2));
    return step(batch);
  };
  return { engine, backend };
}

/** Prompt ids (within the tokenizer's vocabulary) made from a seed, for requests of any length. */
export function promptOf(length: number, seed: number): number[] {
  return Array.from({ length }, (_, i) => 19 + ((seed * 131 + i * 37) % 900));
}

/** Resolves once the engine has nothing running or waiting (cancellations are applied between steps). */
export async function idle(engine: Engine): Promise<void> {
  while (engine.stats().running + engine.stats().waiting > 0) await new Promise((r) => setImmediate(r));
}
