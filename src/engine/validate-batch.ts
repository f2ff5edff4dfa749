import { fail } from "../errors.js";
import type { ModelConfig } from "../model/config.js";
import type { Backend, KvCacheShape, SamplingBatch, StepBatch } from "./backend.js";

/**
 * Refuse a step batch that a backend cannot run as asked: wrong array lengths, token ids outside the
 * vocabulary, contexts past the model's positions, block tables too short or naming blocks outside the
 * pool, sampling parameters out of range. Both backends call it, so they refuse the same batches, with one
 * line that names the field at fault.
 */
export function validateBatch(batch: StepBatch, backend: Pick<Backend, "config" | "kv" | "maxSteps" | "carries">): void {
  const { config, kv } = backend;
  const { tokens, queryStarts, contextLens, blockTables, blockTableWidth, sample } = batch;
  const numSeqs = queryStarts.length - 1;
  checkSteps(batch, backend.maxSteps);
  if (numSeqs < 1) bad(`queryStarts has ${queryStarts.length} entries; it needs one per sequence plus one`);
  if (queryStarts[0] !== 0 || queryStarts[numSeqs] !== tokens.length) {
    bad(`queryStarts must run from 0 to the number of tokens (${tokens.length})`);
  }
  expectLength("contextLens", contextLens, numSeqs);
  expectLength("sample", sample, numSeqs);
  if (!Number.isInteger(blockTableWidth) || blockTableWidth < 0) {
    bad(`blockTableWidth = ${blockTableWidth} must be a non-negative integer`);
  }
  if (blockTables.length < numSeqs * blockTableWidth) {
    const needed = numSeqs * blockTableWidth;
    bad(`blockTables has ${blockTables.length} entries; ${numSeqs} rows of ${blockTableWidth} need ${needed}`);
  }
  for (let t = 0; t < tokens.length; t++) checkToken(`tokens[${t}]`, tokens[t], config.vocabSize);
  for (let i = 0; i < numSeqs; i++) checkSequence(batch, i, config, kv);
  checkSampling(batch.sampling, sample, config.vocabSize);
  checkFromPrevious(batch, numSeqs, backend.carries);
}

/** Several steps at once are for plain decode batches only (see StepBatch.steps). */
function checkSteps(batch: StepBatch, maxSteps: number): void {
  const steps = batch.steps ?? 1;
  if (!Number.isInteger(steps) || steps < 1 || steps > maxSteps) bad(`steps = ${steps} must be an integer in 1..${maxSteps}`);
  if (steps === 1) return;
  if (batch.tokens.length !== batch.contextLens.length) bad(`steps = ${steps} needs one new token per sequence`);
  if ((batch.returnLogits ?? "none") !== "none") bad(`steps = ${steps} cannot return logits`);
  if (batch.sample.some((v) => v !== 1)) bad(`steps = ${steps} needs every sequence to sample`);
  if (batch.sampling.history.length > 0) bad(`steps = ${steps} cannot apply penalties`);
}

/** A row whose input is the step before's token decodes and samples (StepBatch.fromPrevious). */
function checkFromPrevious(batch: StepBatch, numSeqs: number, supported: boolean): void {
  const from = batch.fromPrevious;
  if (!from) return;
  expectLength("fromPrevious", from, numSeqs);
  if (!supported && from.some((row) => row !== -1)) bad("this backend takes no input from the step before (fromPrevious)");
  const { queryStarts, sample } = batch;
  for (let i = 0; i < numSeqs; i++) {
    if (from[i] === -1) continue;
    const what = `fromPrevious[${i}] = ${from[i]}`;
    if (from[i] < 0) bad(`${what} must be -1 or a row of the step before`);
    if (queryStarts[i + 1] - queryStarts[i] !== 1) bad(`${what}: sequence ${i} must have one new token`);
    if (!sample[i]) bad(`${what}: sequence ${i} must sample`);
  }
}

function checkSequence(batch: StepBatch, i: number, config: ModelConfig, kv: KvCacheShape): void {
  const queryLen = batch.queryStarts[i + 1] - batch.queryStarts[i];
  // The cache this call fills: with several steps, the last one writes position contextLen + steps - 2.
  const contextLen = batch.contextLens[i] + (batch.steps ?? 1) - 1;
  if (queryLen < 1) bad(`sequence ${i} has ${queryLen} new tokens (queryStarts[${i}..${i + 1}])`);
  if (batch.contextLens[i] < queryLen) bad(`contextLens[${i}] = ${batch.contextLens[i]} is less than its ${queryLen} new tokens`);
  if (contextLen > config.maxPositionEmbeddings) {
    bad(`contextLens[${i}] = ${contextLen} exceeds the model's ${config.maxPositionEmbeddings} positions`);
  }
  const blocks = Math.ceil(contextLen / kv.blockSize);
  const width = batch.blockTableWidth;
  if (blocks > width) {
    bad(`sequence ${i} needs ${blocks} KV blocks for ${contextLen} tokens; blockTableWidth is ${width}`);
  }
  for (let b = 0; b < blocks; b++) {
    const at = i * width + b;
    const block = batch.blockTables[at];
    if (!(block >= 0 && block < kv.numBlocks)) {
      bad(`blockTables[${at}] = ${block} (sequence ${i}) is outside the KV pool of ${kv.numBlocks} blocks`);
    }
  }
}

const perSequenceArrays = [
  "temperature",
  "topK",
  "topP",
  "minP",
  "repetitionPenalty",
  "frequencyPenalty",
  "presencePenalty",
  "seed",
  "counter",
  "promptLens",
] as const;

/** The values each sampling parameter may hold, besides being finite. */
const samplingLimits = [
  ["temperature", (v: number) => v >= 0, ">= 0"],
  ["topK", (v: number) => v >= 0, ">= 0"],
  ["topP", (v: number) => v > 0 && v <= 1, "in (0, 1]"],
  ["minP", (v: number) => v >= 0 && v <= 1, "in [0, 1]"],
  ["repetitionPenalty", (v: number) => v > 0, "> 0"],
  ["frequencyPenalty", () => true, "finite"],
  ["presencePenalty", () => true, "finite"],
] as const;

function checkSampling(s: SamplingBatch, sample: Uint8Array, vocabSize: number): void {
  const numSeqs = sample.length;
  for (const name of perSequenceArrays) expectLength(`sampling.${name}`, s[name], numSeqs);
  expectLength("sampling.historyStarts", s.historyStarts, numSeqs + 1);
  if (!Number.isInteger(s.topLogprobs) || s.topLogprobs < 0 || s.topLogprobs > vocabSize) {
    bad(`sampling.topLogprobs = ${s.topLogprobs} must be an integer from 0 to the vocabulary size ${vocabSize}`);
  }
  for (let i = 0; i < numSeqs; i++) {
    if (!sample[i]) continue;
    for (const [name, ok, rule] of samplingLimits) {
      const value = s[name][i];
      if (!(Number.isFinite(value) && ok(value))) bad(`sampling.${name}[${i}] = ${value} must be ${rule}`);
    }
    checkHistory(s, i, vocabSize);
  }
}

function checkHistory(s: SamplingBatch, i: number, vocabSize: number): void {
  const start = s.historyStarts[i];
  const end = s.historyStarts[i + 1];
  if (!(start >= 0 && start <= end && end <= s.history.length)) {
    const range = `sampling.historyStarts[${i}..${i + 1}] = ${start}..${end}`;
    bad(`${range} is not a range of the ${s.history.length} history tokens`);
  }
  if (!(s.promptLens[i] >= 0 && s.promptLens[i] <= end - start)) {
    bad(`sampling.promptLens[${i}] = ${s.promptLens[i]} exceeds the sequence's ${end - start} history tokens`);
  }
  for (let t = start; t < end; t++) checkToken(`sampling.history[${t}]`, s.history[t], vocabSize);
}

function checkToken(what: string, id: number, vocabSize: number): void {
  if (!(id >= 0 && id < vocabSize)) bad(`${what} = ${id} is outside the vocabulary (0..${vocabSize - 1})`);
}

function expectLength(name: string, values: ArrayLike<number>, length: number): void {
  if (values.length !== length) bad(`${name} has ${values.length} entries, expected ${length}`);
}

function bad(message: string): never {
  fail("input", `step batch: ${message}`);
}
