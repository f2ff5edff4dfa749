import type { Backend, KvCacheShape, SamplingBatch, StepBatch } from "../engine/backend.js";
import { fail } from "../errors.js";
import type { ModelConfig } from "../model/config.js";
import { BlockManager } from "./block-manager.js";
import { usesPenalties } from "./sampling-params.js";
import type { Sequence } from "./sequence.js";

export interface SchedulerOptions {
  /** The most new tokens in one step, decodes and prefill chunks together (default: the backend's limit, or 2048). */
  maxBatchTokens?: number;
  /** The most sequences in one step (default 256). */
  maxBatchSeqs?: number;
  /**
   * Decode steps one backend call may run when every running sequence is decoding and nobody waits
   * (default 16, capped by the backend): fewer round trips to the host, tokens streamed in small bursts.
   */
  decodeSteps?: number;
  /**
   * The longest a multi-step call may run, in milliseconds (default 10, and 5 with async scheduling): a
   * request that arrives during one waits about that long at most for its prefill to start (with async
   * scheduling, for the call in flight and the one queued behind it, whose host turns cost the device
   * nothing). Steps are counted from the measured time per step.
   */
  maxCallMs?: number;
  /**
   * Queue the next call behind the one in flight, before its tokens are back, so the device does not wait
   * for the host between calls; tokens it computes past a stop are dropped. Only where the backend can
   * (Backend.carries). Default: on for a device, off for the CPU backend, whose steps compute on the
   * JavaScript thread itself: nothing would overlap them, and each call's tokens would come a call later.
   */
  asyncScheduling?: boolean;
  /** The most requests waiting for admission; past it new ones are refused at once (default 256). */
  maxWaiting?: number;
  /** Reuse the KV blocks of earlier prompts' common prefixes (default true). */
  prefixCaching?: boolean;
}

/** The scheduling rules in effect, defaults resolved (for reports: `decima bench` prints them). */
export interface SchedulingSettings {
  asyncScheduling: boolean;
  decodeSteps: number;
  maxCallMs: number;
}

/** One step's work: the batch for the backend, and which sequence each of its rows belongs to. */
export interface ScheduledStep {
  batch: StepBatch;
  seqs: Sequence[];
  /** How many new tokens each sequence has in the batch. */
  queryLens: number[];
}

/**
 * Continuous batching: every step carries one decode token of each running sequence, then prefill work
 * (prompts in chunks, within the step's token budget), and admits waiting requests in arrival order as the
 * KV pool allows.
 *
 * Admission reserves every block a request can ever need, so a running sequence never runs out of KV
 * space and nothing is ever preempted: simple and safe, at the price of admitting fewer long requests
 * at once. vLLM-style preemption (evict, later recompute) is a later optimisation.
 */
export class Scheduler {
  readonly blocks: BlockManager;
  private readonly waiting: Sequence[] = [];
  private readonly running: Sequence[] = [];
  private readonly maxBatchTokens: number;
  private readonly maxBatchSeqs: number;
  private readonly maxWaiting: number;
  private readonly decodeSteps: number;
  private readonly maxCallMs: number;
  private readonly asyncScheduling: boolean;
  /** Measured milliseconds per decode step (a moving average over decode-only calls); 0 until measured. */
  private msPerStep = 0;

  /** `limits`: what the backend is and can take (Backend's device, maxBatchTokens, maxBatchSeqs, maxSteps, carries). */
  constructor(
    private readonly config: ModelConfig,
    kv: KvCacheShape,
    opts: SchedulerOptions = {},
    limits: Pick<Backend, "device" | "maxBatchTokens" | "maxBatchSeqs" | "maxSteps" | "carries"> = {
      device: "cpu",
      maxBatchTokens: Infinity,
      maxBatchSeqs: Infinity,
      maxSteps: 1,
      carries: false,
    },
  ) {
    // By default a step takes as many tokens as the backend is sized for (2048 where it has no limit).
    const tokens = opts.maxBatchTokens ?? (Number.isFinite(limits.maxBatchTokens) ? limits.maxBatchTokens : 2048);
    this.maxBatchTokens = Math.min(positiveInt("maxBatchTokens", tokens), limits.maxBatchTokens);
    this.maxBatchSeqs = Math.min(positiveInt("maxBatchSeqs", opts.maxBatchSeqs ?? 256), limits.maxBatchSeqs);
    this.maxWaiting = positiveInt("maxWaiting", opts.maxWaiting ?? 256);
    this.decodeSteps = Math.min(positiveInt("decodeSteps", opts.decodeSteps ?? 16), limits.maxSteps);
    this.asyncScheduling = (opts.asyncScheduling ?? limits.device !== "cpu") && limits.carries;
    this.maxCallMs = opts.maxCallMs ?? (this.asyncScheduling ? 5 : 10);
    if (!(this.maxCallMs > 0)) fail("config", `maxCallMs must be a positive number (got ${this.maxCallMs})`);
    this.blocks = new BlockManager(kv.numBlocks, kv.blockSize, opts.prefixCaching ?? true);
  }

  get settings(): SchedulingSettings {
    return { asyncScheduling: this.asyncScheduling, decodeSteps: this.decodeSteps, maxCallMs: this.maxCallMs };
  }

  get numRunning(): number {
    return this.running.length;
  }

  get numWaiting(): number {
    return this.waiting.length;
  }

  /** Queue a request, or refuse it at once if it could never run or the queue is full. */
  add(seq: Sequence): void {
    const n = seq.promptLen;
    const contextLength = this.config.maxPositionEmbeddings;
    if (seq.samples ? n >= contextLength : n > contextLength) {
      fail("input", `the prompt has ${n} tokens; the model's context length is ${contextLength}`);
    }
    const { numBlocks, blockSize } = this.blocks;
    const need = this.blocks.blocksFor(this.cacheTokens(seq));
    if (need > numBlocks) {
      const what = seq.kind === "generate" ? `${n} prompt tokens + maxTokens ${seq.params.maxTokens}` : `${n} tokens`;
      fail("input", `the request needs ${need} KV blocks of ${blockSize} tokens (${what}); the KV pool has ${numBlocks}`);
    }
    if (this.waiting.length >= this.maxWaiting) {
      fail("capacity", `${this.waiting.length} requests are already waiting (maxWaiting); try again later`);
    }
    this.waiting.push(seq);
  }

  /** Take a sequence out (finished, cancelled or failed) and give its blocks back at once. */
  remove(seq: Sequence): void {
    for (const queue of [this.waiting, this.running]) {
      const i = queue.indexOf(seq);
      if (i >= 0) queue.splice(i, 1);
    }
    if (!seq.blocks) return;
    this.cache(seq);
    this.blocks.release(seq.blocks);
  }

  /**
   * The next step's work, or null when there is none. With async scheduling it may be asked for while
   * `inFlight` (the one call launched and not committed) runs: it is then planned as if that call were
   * done, every sequence's positions and draws counted on, and a decode row takes its input from its
   * sequence's row there (StepBatch.fromPrevious). A sequence may end within that call (a stop token or
   * string): its tokens in this one are dropped then.
   */
  schedule(inFlight: ScheduledStep | null = null): ScheduledStep | null {
    if (inFlight && !this.asyncScheduling) return null;
    const ahead = aheadOf(inFlight);
    let budget = this.maxBatchTokens;
    const rows: Row[] = [];
    const add = (seq: Sequence, queryLen: number) => {
      rows.push({ seq, queryLen, ahead: ahead.get(seq) ?? idle });
      budget -= queryLen;
    };
    const prefill = (seq: Sequence) => {
      const at = seq.computed + (ahead.get(seq)?.positions ?? 0);
      if (at < seq.promptLen) add(seq, Math.min(seq.promptLen - at, budget));
    };
    for (const seq of this.running) if (budget > 0 && this.decodes(seq, ahead.get(seq))) add(seq, 1);
    for (const seq of this.running) if (budget > 0) prefill(seq);
    // A step must hold a decode token of every running sequence: that caps how many run at once.
    const maxRunning = Math.min(this.maxBatchTokens, this.maxBatchSeqs);
    while (budget > 0 && this.waiting.length > 0 && this.running.length < maxRunning) {
      const seq = this.waiting[0];
      if (!this.admit(seq)) break; // the oldest goes first, even if a younger one would fit
      this.waiting.shift();
      this.running.push(seq);
      prefill(seq);
    }
    if (rows.length === 0) return null;
    const steps = Math.max(1, this.decodeRun(rows));
    return { batch: this.buildBatch(rows, steps, inFlight !== null), seqs: rows.map((r) => r.seq), queryLens: rows.map((r) => r.queryLen) };
  }

  /**
   * Whether the sequence decodes in the next step: it is past its prompt (counting the call in flight) and
   * has room for another token; with a call in flight, that call samples for it.
   */
  private decodes(seq: Sequence, ahead: Ahead | undefined): boolean {
    if (!seq.samples) return false;
    if (!ahead) return !seq.inPrefill;
    return ahead.draws > 0 && seq.computed + ahead.positions < this.cacheTokens(seq);
  }

  /**
   * How many decode steps the rows may run in one call: 0 unless every running sequence is in it and
   * decodes, none needs the host between tokens (penalties read the growing history: a call in flight
   * with one of them is thus one step long, and a row carried from it lacks only its input in its history)
   * and nobody waits for admission; then as many as fit in the call's time, and no sequence runs past its
   * token budget or reserved cache within them (counting the steps of the call in flight).
   */
  private decodeRun(rows: Row[]): number {
    if (this.waiting.length > 0 || rows.length !== this.running.length) return 0;
    let steps = this.msPerStep > 0 ? Math.min(this.decodeSteps, Math.floor(this.maxCallMs / this.msPerStep)) : this.decodeSteps;
    for (const { seq, queryLen, ahead } of rows) {
      const at = seq.computed + ahead.positions;
      if (queryLen !== 1 || at < seq.promptLen || usesPenalties(seq.params) || seq.needsPromptLogits) return 0;
      steps = Math.min(steps, this.cacheTokens(seq) - at);
    }
    return Math.max(0, steps);
  }

  /** How long a step took on the backend, launch to result: decode-only calls update the time per step. */
  observe(step: ScheduledStep, ms: number): void {
    if (step.batch.tokens.length !== step.seqs.length) return; // a prefill chunk's time says nothing of decoding
    const perStep = ms / (step.batch.steps ?? 1);
    this.msPerStep = this.msPerStep === 0 ? perStep : 0.8 * this.msPerStep + 0.2 * perStep;
  }

  /**
   * After the backend ran a step: `n` more of the sequence's tokens have their K/V in the cache (a prefill
   * chunk, or one per decode step).
   */
  commit(seq: Sequence, n: number): void {
    seq.computed += n;
  }

  /**
   * Offer the sequence's full blocks to the prefix cache. Apart from commit() because hashing the blocks
   * is the costly part: the engine does it while the device runs the next step. Tokens computed but then
   * dropped (after a stop string) are not offered.
   */
  cache(seq: Sequence): void {
    if (seq.blocks) this.blocks.commit(seq.blocks, seq.tokens, Math.min(seq.computed, seq.tokens.length));
  }

  /**
   * The most tokens a sequence's cache will hold: its prompt and every generated token but the last (the
   * sequence ends as it samples that one, so it is never fed back), within the context length; the prompt
   * alone for one that samples nothing.
   */
  private cacheTokens(seq: Sequence): number {
    if (!seq.samples) return seq.promptLen;
    return Math.min(seq.promptLen + seq.params.maxTokens, this.config.maxPositionEmbeddings) - 1;
  }

  private admit(seq: Sequence): boolean {
    const alloc = this.blocks.allocate(seq.tokens, this.cacheTokens(seq), !seq.needsPromptLogits);
    if (!alloc) return false;
    seq.blocks = alloc;
    seq.computed = alloc.cachedTokens;
    seq.times.admitted = performance.now();
    return true;
  }

  /** The batch of `steps` steps; `carry`: decode rows with a call in flight take their input from it. */
  private buildBatch(rows: Row[], steps: number, carry: boolean): StepBatch {
    const numSeqs = rows.length;
    const queryStarts = new Int32Array(numSeqs + 1);
    const contextLens = new Int32Array(numSeqs);
    const sample = new Uint8Array(numSeqs);
    const fromPrevious = new Int32Array(numSeqs).fill(-1);
    rows.forEach(({ seq, queryLen, ahead }, i) => {
      queryStarts[i + 1] = queryStarts[i] + queryLen;
      contextLens[i] = seq.computed + ahead.positions + queryLen;
      // It samples once the cache holds every token it has, those the call in flight draws included.
      sample[i] = seq.samplesAt(contextLens[i] - ahead.draws) ? 1 : 0;
      if (ahead.draws > 0) fromPrevious[i] = ahead.row;
      this.blocks.grow(seq.blocks!, contextLens[i] + steps - 1);
    });

    // Host tokens for every row whose input is known here; a carried row's entry is a placeholder.
    const tokens = new Int32Array(queryStarts[numSeqs]);
    rows.forEach(({ seq, queryLen, ahead }, i) => {
      if (ahead.draws === 0) tokens.set(seq.tokens.slice(contextLens[i] - queryLen, contextLens[i]), queryStarts[i]);
    });

    // One width for the batch, covering every position the steps write; a shorter row's tail is never read.
    const blocksFor = (len: number) => this.blocks.blocksFor(len + steps - 1);
    const blockTableWidth = Math.max(...contextLens.map(blocksFor));
    const blockTables = new Int32Array(numSeqs * blockTableWidth);
    rows.forEach(({ seq }, i) => {
      blockTables.set(seq.blocks!.table.slice(0, blocksFor(contextLens[i])), i * blockTableWidth);
    });

    const allLogits = rows.some(({ seq, queryLen }, i) => contextLens[i] - queryLen < seq.promptLen && seq.needsPromptLogits);
    const batch: StepBatch = {
      tokens,
      queryStarts,
      contextLens,
      blockTables,
      blockTableWidth,
      sample,
      sampling: samplingBatch(rows, sample),
      returnLogits: allLogits ? "all" : "none",
      steps,
    };
    if (carry) batch.fromPrevious = fromPrevious;
    return batch;
  }
}

/** A sequence's part in a step: its new tokens, and what the call in flight adds before them. */
interface Row {
  seq: Sequence;
  queryLen: number;
  ahead: Ahead;
}

/** What a call in flight adds to a sequence, not yet committed: positions, draws, and its row there. */
interface Ahead {
  positions: number;
  draws: number;
  row: number;
}

const idle: Ahead = { positions: 0, draws: 0, row: -1 };

function aheadOf(step: ScheduledStep | null): Map<Sequence, Ahead> {
  const ahead = new Map<Sequence, Ahead>();
  if (!step) return ahead;
  const steps = step.batch.steps ?? 1;
  step.seqs.forEach((seq, row) => {
    const draws = step.batch.sample[row] ? steps : 0;
    ahead.set(seq, { positions: step.queryLens[row] + steps - 1, draws, row });
  });
  return ahead;
}

/** Each row's draw counter counts on past the draws of the call in flight. */
function samplingBatch(rows: Row[], sample: Uint8Array): SamplingBatch {
  const seqs = rows.map((r) => r.seq);
  const n = seqs.length;
  const b: SamplingBatch = {
    temperature: new Float32Array(n),
    topK: new Int32Array(n),
    topP: new Float32Array(n),
    minP: new Float32Array(n),
    repetitionPenalty: new Float32Array(n),
    frequencyPenalty: new Float32Array(n),
    presencePenalty: new Float32Array(n),
    seed: new Uint32Array(n),
    counter: new Uint32Array(n),
    history: new Int32Array(0),
    historyStarts: new Int32Array(n + 1),
    promptLens: new Int32Array(n),
    topLogprobs: 0,
  };
  // Only the penalties read the history, and only sequences about to sample a token need it.
  const withHistory = seqs.map((seq, i) => sample[i] === 1 && usesPenalties(seq.params));
  seqs.forEach((seq, i) => {
    const p = seq.params;
    b.temperature[i] = p.temperature;
    b.topK[i] = p.topK;
    b.topP[i] = p.topP;
    b.minP[i] = p.minP;
    b.repetitionPenalty[i] = p.repetitionPenalty;
    b.frequencyPenalty[i] = p.frequencyPenalty;
    b.presencePenalty[i] = p.presencePenalty;
    b.seed[i] = p.seed;
    b.counter[i] = seq.generated + rows[i].ahead.draws;
    b.historyStarts[i + 1] = b.historyStarts[i] + (withHistory[i] ? seq.tokens.length : 0);
    b.promptLens[i] = withHistory[i] ? seq.promptLen : 0;
    if (sample[i]) b.topLogprobs = Math.max(b.topLogprobs, p.logprobs ?? 0);
  });
  b.history = new Int32Array(b.historyStarts[n]);
  seqs.forEach((seq, i) => {
    if (withHistory[i]) b.history.set(seq.tokens, b.historyStarts[i]);
  });
  return b;
}

function positiveInt(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1) fail("config", `${name} must be a positive integer (got ${value})`);
  return value;
}
