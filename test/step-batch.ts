// Step batches for backend tests, described per sequence.
import type { StepBatch } from "../src/engine/backend.js";

export interface Seq {
  tokens: number[];
  past?: number;
  blocks: number[];
  sample?: boolean;
  temperature?: number;
  seed?: number;
  counter?: number;
  /** Prompt and generated tokens, for the penalties. */
  history?: number[];
  promptLen?: number;
  repetitionPenalty?: number;
}

export function batchOf(seqs: Seq[], returnLogits?: StepBatch["returnLogits"], topLogprobs = 0): StepBatch {
  const n = seqs.length;
  const width = Math.max(...seqs.map((s) => s.blocks.length));
  const padded = (s: Seq) => [...s.blocks, ...new Array<number>(width - s.blocks.length).fill(0)];
  const perSeq = <T extends Float32Array | Int32Array | Uint32Array>(
    make: new (values: number[]) => T,
    f: (s: Seq) => number,
  ) => new make(seqs.map(f));
  const starts = [0];
  for (const s of seqs) starts.push(starts[starts.length - 1] + s.tokens.length);
  const historyStarts = [0];
  for (const s of seqs) historyStarts.push(historyStarts[historyStarts.length - 1] + (s.history?.length ?? 0));
  return {
    tokens: Int32Array.from(seqs.flatMap((s) => s.tokens)),
    queryStarts: Int32Array.from(starts),
    contextLens: perSeq(Int32Array, (s) => (s.past ?? 0) + s.tokens.length),
    blockTables: Int32Array.from(seqs.flatMap(padded)),
    blockTableWidth: width,
    sample: Uint8Array.from(seqs, (s) => (s.sample === false ? 0 : 1)),
    returnLogits,
    sampling: {
      temperature: perSeq(Float32Array, (s) => s.temperature ?? 0),
      topK: new Int32Array(n),
      topP: new Float32Array(n).fill(1),
      minP: new Float32Array(n),
      repetitionPenalty: perSeq(Float32Array, (s) => s.repetitionPenalty ?? 1),
      frequencyPenalty: new Float32Array(n),
      presencePenalty: new Float32Array(n),
      seed: perSeq(Uint32Array, (s) => s.seed ?? 0),
      counter: perSeq(Uint32Array, (s) => s.counter ?? 0),
      history: Int32Array.from(seqs.flatMap((s) => s.history ?? [])),
      historyStarts: Int32Array.from(historyStarts),
      promptLens: perSeq(Int32Array, (s) => s.promptLen ?? 0),
      topLogprobs,
    },
  };
}

