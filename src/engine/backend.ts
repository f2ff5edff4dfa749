import type { ModelConfig } from "../model/config.js";

/**
 * The seam between the runtime and a device. A step runs one forward pass over a batch of sequences,
 * each appending some new tokens (a whole prompt, a prefill chunk, or one decoded token) to its paged KV
 * cache, then samples the next token of every sequence that asks for one. Both backends (the fp32 CPU
 * reference and CUDA) implement exactly this, and are tested against each other through it.
 */
export interface Backend {
  readonly device: "cpu" | "cuda";
  readonly config: ModelConfig;
  /** The paged KV cache: `numBlocks` blocks of `blockSize` token slots, shared by all sequences. */
  readonly kv: KvCacheShape;
  /** A human-readable description for logs and benchmarks ("cpu fp32", "cuda bfloat16 on NVIDIA H100"). */
  readonly description: string;
  /** Bytes of weights a decode step reads (for the benchmark's bandwidth floor). */
  readonly weightBytes: number;
  /** Most decode steps one call may run back to back (StepBatch.steps). */
  readonly maxSteps: number;
  /** Whether it runs batches whose rows take their input from the step asked for before them (StepBatch.fromPrevious). */
  readonly carries: boolean;
  /** Most new tokens, and most sequences, one step may carry (the device's workspace is sized for them). */
  readonly maxBatchTokens: number;
  readonly maxBatchSeqs: number;
  /**
   * Run a step. Steps run in the order they are asked for, and the next may be asked for before this one's
   * result is back (a call queued behind the one in flight: see StepBatch.fromPrevious). A batch refused
   * as bad is no step: it changes nothing, so the one after it carries from the step before it.
   */
  step(batch: StepBatch): Promise<StepResult>;
  close(): Promise<void>;
}

export interface KvCacheShape {
  blockSize: number;
  numBlocks: number;
}

/**
 * KV cache layout, per layer, for K and V alike: [numBlocks][numKvHeads][blockSize][headDim]. A block holds
 * `blockSize` consecutive positions of one sequence; a head's slice of a block is contiguous, so attention
 * reads it in one sweep.
 */
export interface StepBatch {
  /** The new tokens of all sequences, concatenated in sequence order. */
  tokens: Int32Array;
  /** Sequence i's new tokens are tokens[queryStarts[i] .. queryStarts[i+1]); length numSeqs + 1. */
  queryStarts: Int32Array;
  /**
   * Tokens in sequence i's cache after this step (its past plus its new tokens). The new tokens sit at
   * positions contextLens[i] - queryLen .. contextLens[i] - 1.
   */
  contextLens: Int32Array;
  /** Row i, `blockTableWidth` entries long, lists sequence i's KV blocks in position order. */
  blockTables: Int32Array;
  blockTableWidth: number;
  /** 1 where a token is to be sampled after the sequence's last new token (0 for a non-final prefill chunk). */
  sample: Uint8Array;
  sampling: SamplingBatch;
  /** Logits to return: none (the default), the last new token's row per sequence, or a row per new token. */
  returnLogits?: "none" | "last" | "all";
  /**
   * Decode steps to run back to back (default 1, at most the backend's maxSteps). Only for batches where
   * every sequence has one new token, samples, wants no logits and no penalties: each sampled token becomes
   * its sequence's next input at the next position (its block table must already cover it) and the draw
   * counter moves on. The results then hold `steps` rows of numSeqs entries (step-major). On the GPU the
   * steps run without the host in between, which is what makes small-batch decode fast.
   */
  steps?: number;
  /**
   * Per sequence, -1 or a row of the step asked for just before this one: the token that step sampled last
   * for that row is this sequence's one new token (its entry in `tokens` is ignored), so the batch can be
   * queued before that result is back. Such a row decodes: one new token, sampled. Its penalty history, if
   * it has one, lacks that token, which the backend counts in as the last generated one. The row it names
   * must have sampled at that step's last step.
   */
  fromPrevious?: Int32Array;
}

/** One sequence's sampling rule, as the runtime and the CPU sampler hold it (SamplingBatch says what each means). */
export interface SamplingKnobs {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  frequencyPenalty: number;
  presencePenalty: number;
  seed: number;
}

/**
 * Per-sequence sampling parameters, as parallel arrays (one entry per sequence). The sampling rule is
 * specified by the CPU backend's sampler (src/engine/cpu/sampler.ts), which the GPU kernel follows.
 */
export interface SamplingBatch {
  /** 0 means greedy. */
  temperature: Float32Array;
  /** 0 means no limit. */
  topK: Int32Array;
  /** 1 means no limit. */
  topP: Float32Array;
  /** 0 means no limit. */
  minP: Float32Array;
  /** 1 means none; Hugging Face's rule, over prompt and generated tokens. */
  repetitionPenalty: Float32Array;
  /** 0 means none; OpenAI's rule, over generated tokens. */
  frequencyPenalty: Float32Array;
  presencePenalty: Float32Array;
  /** The random stream: draw `counter` of stream `seed` (counter = tokens generated so far). */
  seed: Uint32Array;
  counter: Uint32Array;
  /**
   * Tokens seen by the penalties, for sequences that have any (others have an empty range): sequence i's are
   * history[historyStarts[i] .. historyStarts[i+1]), the first promptLens[i] of them from its prompt.
   */
  history: Int32Array;
  historyStarts: Int32Array;
  promptLens: Int32Array;
  /** How many most likely alternatives to report beside each sampled token (0: only its own log-prob). */
  topLogprobs: number;
}

export interface StepResult {
  /** The sampled token per sequence (per step, step-major, for multi-step batches); -1 where `sample` was 0. */
  tokens: Int32Array;
  /** Log-probability of each sampled token under the model's distribution (before penalties/temperature). */
  logprobs: Float32Array;
  /** numSeqs x topLogprobs: the most likely tokens and their log-probabilities, best first. */
  topTokens: Int32Array;
  topLogprobs: Float32Array;
  /** Rows of vocabSize floats, as asked by `returnLogits`. */
  logits?: Float32Array;
}
