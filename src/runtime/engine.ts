import type { Backend, StepBatch, StepResult } from "../engine/backend.js";
import { loadBackend, resolveDevice } from "../engine/create-backend.js";
import { DecimaError, fail } from "../errors.js";
import type { ModelConfig } from "../model/config.js";
import type { FloatDType } from "../model/dtype.js";
import { resolveModel } from "../model/model-dir.js";
import { fimPromptIds } from "../tokenizer/fim.js";
import { Tokenizer } from "../tokenizer/tokenizer.js";
import { EventChannel } from "./event-channel.js";
import { type SamplingOptions, parseSamplingParams } from "./sampling-params.js";
import { type ScheduledStep, Scheduler, type SchedulerOptions, type SchedulingSettings } from "./scheduler.js";
import { Sequence, type SequenceKind } from "./sequence.js";
import type { FinishReason } from "./stop.js";

export interface GenerateRequest extends SamplingOptions {
  /** Text (tokenized with the model's tokenizer) or token ids. */
  prompt: string | number[];
  /** Fill in the middle: generate what goes between `prompt` and `suffix`. */
  suffix?: string;
  /** Ends the request at the next step ("abort"). */
  signal?: AbortSignal;
}

export interface TopLogprob {
  id: number;
  logprob: number;
}

/** A generated token (stop tokens are not), with the text that became final with it (may be ""). */
export interface TokenEvent {
  type: "token";
  id: number;
  text: string;
  logprob: number;
  /** The `logprobs` most likely alternatives, best first, when asked for. */
  top?: TopLogprob[];
}

/** Text held back (a possible start of a stop string, an unfinished character) released at the end. */
export interface TextEvent {
  type: "text";
  text: string;
}

/** With `promptLogprobs`: once the prompt is computed, before any token, its ids and their log-probs. */
export interface PromptEvent {
  type: "prompt";
  tokens: number[];
  /** log P(tokens[i] | tokens[..i]); null for the first. */
  logprobs: (number | null)[];
}

export interface GenerateTimings {
  queuedMs: number;
  /** From admission until the prompt was computed (with the first token, where one is sampled). */
  promptMs: number;
  /** 0 where no token came. */
  timeToFirstTokenMs: number;
  decodeMs: number;
  /** Tokens after the first, per second of decoding. */
  tokensPerSecond: number;
}

/** The last event of every request. `text` is the concatenation of all event texts. */
export interface DoneEvent {
  type: "done";
  finishReason: FinishReason;
  promptTokens: number[];
  tokens: number[];
  text: string;
  /** With `promptLogprobs`: each prompt token's log-prob (null for the first). */
  promptLogprobs?: (number | null)[];
  cachedPromptTokens: number;
  timings: GenerateTimings;
}

export type GenerateEvent = TokenEvent | TextEvent | PromptEvent | DoneEvent;

/** For metrics: the counts now, and totals since the engine started. */
export interface EngineStats {
  running: number;
  waiting: number;
  /** KV blocks that sequences hold (cached blocks nobody holds are not counted). */
  kvBlocksUsed: number;
  kvBlocksTotal: number;
  /** Full prompt blocks looked up in the prefix cache, and those found. */
  prefixCacheQueries: number;
  prefixCacheHits: number;
  /** Prompt tokens of requests whose prefill completed, cached ones included. */
  promptTokensTotal: number;
  generatedTokensTotal: number;
}

export interface EngineParts extends SchedulerOptions {
  backend: Backend;
  tokenizer: Tokenizer;
  modelId: string;
}

export interface EngineLoadOptions extends SchedulerOptions {
  /** A model directory or a Hugging Face hub id. */
  model: string;
  device?: "cpu" | "cuda" | "auto";
  dtype?: FloatDType;
  numBlocks?: number;
  blockSize?: number;
  kvMemoryFraction?: number;
  /**
   * On the GPU, tune and capture the decode graphs of every batch size up to this many sequences at load
   * (default 1): servers want them all, or a batch size met for the first time stalls a step.
   */
  warmupSeqs?: number;
}

/** A sequence's tokens taken from a step's result (entries `at`), waiting to become text and events. */
interface Taken {
  seq: Sequence;
  at: number[];
  /** Its prompt's last chunk was in the step. */
  promptDone: boolean;
}

/** A step asked of the backend; `started`: when it launched, or when the call ahead of it ended. */
interface InFlight {
  step: ScheduledStep;
  result: Promise<StepResult>;
  started: number;
}

interface Request {
  seq: Sequence;
  events: EventChannel<GenerateEvent>;
  detach: () => void;
}

/**
 * The embeddable engine: many concurrent generate() calls, batched together by one loop that drives the
 * backend. The loop builds a step, awaits it, turns its sampled tokens into events, and repeats while
 * there is work; with none it waits on a promise (nothing spins).
 */
export class Engine {
  readonly tokenizer: Tokenizer;
  readonly modelId: string;
  private readonly backend: Backend;
  private readonly scheduler: Scheduler;
  private readonly eosIds: number[];
  private readonly requests = new Map<Sequence, Request>();
  private readonly looping: Promise<void>;
  private closed = false;
  private closing: Promise<void> | null = null;
  private wake: (() => void) | null = null;
  private promptTokensTotal = 0;
  private generatedTokensTotal = 0;

  /** Load a model directory or hub id: its config, tokenizer and weights, onto a backend. */
  static async load(opts: EngineLoadOptions): Promise<Engine> {
    const { dir, config } = await resolveModel(opts.model);
    const tokenizer = await Tokenizer.load(dir);
    const backend = await loadBackend(dir, config, {
      device: resolveDevice(opts.device ?? "auto"),
      dtype: opts.dtype,
      maxBatchTokens: opts.maxBatchTokens,
      maxBatchSeqs: opts.maxBatchSeqs,
      numBlocks: opts.numBlocks,
      blockSize: opts.blockSize,
      kvMemoryFraction: opts.kvMemoryFraction,
      warmupSeqs: opts.warmupSeqs,
    });
    try {
      return new Engine({ ...opts, backend, tokenizer, modelId: opts.model });
    } catch (err) {
      await backend.close(); // a bad scheduler option must not leave device memory behind
      throw err;
    }
  }

  constructor(parts: EngineParts) {
    this.backend = parts.backend;
    this.tokenizer = parts.tokenizer;
    this.modelId = parts.modelId;
    this.scheduler = new Scheduler(parts.backend.config, parts.backend.kv, parts, parts.backend);
    const eos = parts.tokenizer.eosTokenId;
    this.eosIds = [...new Set([...this.config.eosTokenIds, ...(eos === null ? [] : [eos])])];
    // The loop catches a step's failure itself; anything else is a bug, which closes the engine rather
    // than leave requests hanging.
    this.looping = this.loop().catch((err) => {
      this.closed = true;
      this.failAll(err);
    });
  }

  get config(): ModelConfig {
    return this.backend.config;
  }

  get device(): "cpu" | "cuda" {
    return this.backend.device;
  }

  /** The scheduling rules in effect, defaults resolved. */
  get scheduling(): SchedulingSettings {
    return this.scheduler.settings;
  }

  /** What runs the model ("cuda bfloat16 on NVIDIA H100 80GB HBM3"), and the weight bytes a decode step reads. */
  get backendInfo(): { description: string; weightBytes: number } {
    return { description: this.backend.description, weightBytes: this.backend.weightBytes };
  }

  /**
   * Stream a request's events, ending with "done". A bad request rejects the first next() with a
   * DecimaError; leaving the loop early cancels the request.
   */
  async *generate(request: GenerateRequest): AsyncGenerator<GenerateEvent, void, undefined> {
    for await (const batch of this.generateBatches(request)) yield* batch;
  }

  /**
   * generate()'s events, grouped as they come: each item holds every event made since the consumer last
   * looked (a multi-step call's tokens together), for consumers that write them out at once (the server).
   */
  async *generateBatches(request: GenerateRequest): AsyncGenerator<GenerateEvent[], void, undefined> {
    const req = this.submit(request, "generate");
    try {
      yield* req.events.batches();
    } finally {
      this.cancel(req.seq);
    }
  }

  /** Generate to the end; the "done" event. */
  async complete(request: GenerateRequest): Promise<DoneEvent> {
    for await (const event of this.generate(request)) if (event.type === "done") return event;
    throw new Error("generate() ended without a done event");
  }

  /** Teacher-forced logits at every position of `tokens` (vocabSize floats each); no prefix cache. */
  async logits(tokens: number[]): Promise<Float32Array[]> {
    const req = this.submit({ prompt: tokens }, "logits");
    for await (const _ of req.events);
    return req.seq.logitRows!;
  }

  stats(): EngineStats {
    const blocks = this.scheduler.blocks;
    return {
      running: this.scheduler.numRunning,
      waiting: this.scheduler.numWaiting,
      kvBlocksUsed: blocks.usedBlocks,
      kvBlocksTotal: blocks.numBlocks,
      prefixCacheQueries: blocks.queries,
      prefixCacheHits: blocks.hits,
      promptTokensTotal: this.promptTokensTotal,
      generatedTokensTotal: this.generatedTokensTotal,
    };
  }

  /** Stop the loop (after the step in flight), fail every pending request, release the backend. */
  close(): Promise<void> {
    if (!this.closing) {
      this.closed = true;
      this.closing = this.shutdown();
    }
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    this.kick();
    await this.looping;
    this.failAll(new DecimaError("capacity", "the engine was closed"));
    await this.backend.close();
  }

  private submit(request: GenerateRequest, kind: SequenceKind): Request {
    if (this.closed) fail("capacity", "the engine is closed");
    const params = parseSamplingParams(request);
    const ctx = { tokenizer: this.tokenizer, eosIds: this.eosIds, contextLength: this.config.maxPositionEmbeddings };
    const seq = new Sequence(this.promptIds(request), params, kind, ctx);
    this.scheduler.add(seq);

    const signal = request.signal;
    const onAbort = () => this.cancel(seq);
    signal?.addEventListener("abort", onAbort, { once: true });
    const detach = () => signal?.removeEventListener("abort", onAbort);
    const req = { seq, events: new EventChannel<GenerateEvent>(), detach };
    this.requests.set(seq, req);
    if (signal?.aborted) seq.cancelled = true;
    this.kick();
    return req;
  }

  private promptIds({ prompt, suffix }: GenerateRequest): number[] {
    if (typeof prompt === "string") {
      const ids = suffix === undefined ? this.tokenizer.encode(prompt) : fimPromptIds(this.tokenizer, prompt, suffix);
      if (ids.length === 0) fail("input", "prompt: the text has no tokens");
      return ids;
    }
    if (!Array.isArray(prompt)) fail("input", "prompt: expected a string or an array of token ids");
    if (suffix !== undefined) fail("input", "suffix: fill-in-the-middle needs a text prompt, not token ids");
    if (prompt.length === 0) fail("input", "prompt: no tokens");
    const vocab = this.config.vocabSize;
    const bad = prompt.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= vocab);
    if (bad >= 0) fail("input", `prompt[${bad}]: token id ${prompt[bad]} is outside the vocabulary (0..${vocab - 1})`);
    return [...prompt];
  }

  /**
   * Ends the sequence when the next step is scheduled (refill). A call in flight may still write its blocks,
   * but before the step of any later owner does (backends run steps in order).
   */
  private cancel(seq: Sequence): void {
    if (seq.finishReason !== null) return;
    seq.cancelled = true;
    this.kick();
  }

  private kick(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  /**
   * The loop keeps the device busy and runs ahead of the events. When a step's result comes, its tokens go
   * into their sequences (cheap: all the next step needs, including who ended on a stop token or the
   * length), the next steps are launched, and only then are the tokens detokenized into events, while the
   * device computes; the consumers (streams, HTTP writes) run during that step too. With async scheduling the
   * next call is queued behind the one in flight before its tokens are back (Scheduler.schedule), so up to
   * two are in flight. A sequence that ends (a stop token, a stop string, a failure) may thus be in
   * steps launched already: their tokens for it are dropped, and the blocks it frees now are written by those
   * steps alone before anyone else uses them, as backends run steps in the order asked for.
   */
  private async loop(): Promise<void> {
    const inFlight: InFlight[] = [];
    for (;;) {
      this.refill(inFlight);
      const call = inFlight.shift();
      if (!call) {
        if (this.closed) return;
        await new Promise<void>((resolve) => (this.wake = resolve));
        continue;
      }
      const { step } = call;
      const settled = await call.result.then(
        (result) => ({ result, err: null }),
        (err: unknown) => ({ result: null, err }),
      );
      const now = performance.now();
      if (inFlight[0]) inFlight[0].started = now; // a queued call starts on the device as this one ends
      if (!settled.result) {
        // Only this batch's requests fail (and a call queued behind it, on the same sequences, with them);
        // the engine goes on serving the others.
        for (const seq of step.seqs) if (seq.finishReason === null) this.fail(seq, settled.err);
        continue;
      }
      const { result } = settled;
      this.scheduler.observe(step, now - call.started);
      const taken = this.commit(step, result);
      this.refill(inFlight);
      for (const seq of step.seqs) this.scheduler.cache(seq);
      this.emit(taken, result, step.batch.sampling.topLogprobs);
    }
  }

  /**
   * End what was cancelled, then start the next step when none is in flight, and (with async scheduling)
   * queue the one after it, planned from the call in flight: if there is work and the engine is not closing.
   */
  private refill(inFlight: InFlight[]): void {
    if (this.closed) return;
    for (const seq of this.requests.keys()) if (seq.cancelled) this.end(seq, "abort");
    if (inFlight.length === 0) {
      const step = this.scheduler.schedule(null);
      if (step) inFlight.push(this.launch(step));
    }
    if (inFlight.length === 1) {
      const next = this.scheduler.schedule(inFlight[0].step);
      if (next) inFlight.push(this.launch(next));
    }
  }

  private launch(step: ScheduledStep): InFlight {
    const result = this.run(step.batch);
    // A queued call can fail before the loop awaits it (its predecessor failed): the loop sees it then.
    result.catch(() => undefined);
    return { step, started: performance.now(), result };
  }

  /** backend.step, with a synchronous throw turned into a rejection. */
  private async run(batch: StepBatch): Promise<StepResult> {
    return this.backend.step(batch);
  }

  /**
   * A step's results into its sequences: KV positions committed, prompt logits kept, sampled tokens taken.
   * A sequence that ended leaves the schedule at once; its text and done event follow in emit().
   */
  private commit(step: ScheduledStep, result: StepResult): Taken[] {
    const { queryStarts, sample } = step.batch;
    const steps = step.batch.steps ?? 1;
    const n = step.seqs.length;
    const taken: Taken[] = [];
    step.seqs.forEach((seq, i) => {
      if (seq.finishReason !== null) return; // it ended after this step was launched (a stop, or a failure)
      // Prompt logits belong to positions computed.., so they are taken before commit() moves it on.
      const promptDone = seq.inPrefill && seq.computed + step.queryLens[i] === seq.promptLen;
      if (seq.inPrefill && result.logits && seq.needsPromptLogits) {
        seq.takePromptLogits(result.logits, queryStarts[i], step.queryLens[i], this.config.vocabSize);
      }
      if (promptDone) this.promptTokensTotal += seq.promptLen;
      // Step k's token is step k+1's input: each step puts one more of the sequence's tokens in the cache.
      // Tokens sampled after the sequence ended (a stop within a multi-step call) are dropped; a cancelled
      // sequence is ended by the next refill().
      const at: number[] = [];
      for (let k = 0; k < steps && seq.finishReason === null && !seq.cancelled; k++) {
        this.scheduler.commit(seq, k === 0 ? step.queryLens[i] : 1);
        if (sample[i]) {
          if (seq.take(result.tokens[k * n + i])) at.push(k * n + i);
        } else if (!seq.samples && !seq.inPrefill) {
          seq.finishReason = "length";
        }
      }
      if (seq.finishReason !== null) this.scheduler.remove(seq);
      if (at.length > 0 || promptDone || seq.finishReason !== null) taken.push({ seq, at, promptDone });
    });
    return taken;
  }

  /** Taken tokens as text and token events (result entries `at`, step-major); ended sequences' done events. */
  private emit(taken: Taken[], result: StepResult, width: number): void {
    for (const { seq, at, promptDone } of taken) {
      const req = this.requests.get(seq);
      if (!req) continue; // cancelled since, and ended already
      if (promptDone && seq.promptLogprobs && seq.kind === "generate") {
        req.events.push({ type: "prompt", tokens: seq.tokens.slice(0, seq.promptLen), logprobs: [...seq.promptLogprobs] });
      }
      for (const i of at) {
        const text = seq.detokenizeNext();
        if (text === null) break; // a stop string ended the sequence before this token
        this.generatedTokensTotal++;
        const event: TokenEvent = { type: "token", id: result.tokens[i], text, logprob: result.logprobs[i] };
        const k = seq.params.logprobs;
        if (k !== null) {
          event.top = Array.from({ length: k }, (_, j) => ({ id: result.topTokens[i * width + j], logprob: result.topLogprobs[i * width + j] }));
        }
        req.events.push(event);
      }
      if (seq.finishReason !== null) this.end(seq, seq.finishReason);
    }
  }

  private end(seq: Sequence, reason: FinishReason): void {
    const req = this.requests.get(seq)!;
    const rest = seq.finish(reason);
    if (rest) req.events.push({ type: "text", text: rest });
    req.events.push(doneEvent(seq));
    this.retire(req);
  }

  private fail(seq: Sequence, err: unknown): void {
    seq.finishReason = "abort";
    this.retire(this.requests.get(seq)!, err);
  }

  private failAll(err: unknown): void {
    for (const seq of [...this.requests.keys()]) this.fail(seq, err);
  }

  private retire(req: Request, err?: unknown): void {
    this.scheduler.remove(req.seq);
    req.events.end(err);
    req.detach();
    this.requests.delete(req.seq);
  }
}

function doneEvent(seq: Sequence): DoneEvent {
  const { arrival, admitted, firstToken, finished } = seq.times;
  const end = finished!;
  const decodeMs = firstToken === null ? 0 : end - firstToken;
  const event: DoneEvent = {
    type: "done",
    finishReason: seq.finishReason!,
    promptTokens: seq.tokens.slice(0, seq.promptLen),
    tokens: seq.output,
    text: seq.text,
    cachedPromptTokens: seq.blocks?.cachedTokens ?? 0,
    timings: {
      queuedMs: (admitted ?? end) - arrival,
      promptMs: (firstToken ?? end) - (admitted ?? end),
      timeToFirstTokenMs: firstToken === null ? 0 : firstToken - arrival,
      decodeMs,
      tokensPerSecond: seq.generated > 1 && decodeMs > 0 ? ((seq.generated - 1) * 1000) / decodeMs : 0,
    },
  };
  if (seq.promptLogprobs) event.promptLogprobs = seq.promptLogprobs;
  return event;
}
