import { fail } from "../errors.js";
import type { StepBatch, StepResult } from "./backend.js";

/**
 * StepBatch.steps for a backend without a device-side loop: run the steps one by one, feeding each sampled
 * token back as its sequence's next input. The CUDA backend does the same on the GPU; this is its spec.
 */
export async function runSteps(batch: StepBatch, stepOnce: (b: StepBatch) => Promise<StepResult>): Promise<StepResult> {
  const steps = batch.steps ?? 1;
  if (steps === 1) return stepOnce(batch);
  const n = batch.contextLens.length;
  const k = batch.sampling.topLogprobs;
  const out: StepResult = {
    tokens: new Int32Array(steps * n),
    logprobs: new Float32Array(steps * n),
    topTokens: new Int32Array(steps * n * k),
    topLogprobs: new Float32Array(steps * n * k),
  };
  let b: StepBatch = { ...batch, steps: 1 };
  for (let s = 0; s < steps; s++) {
    const r = await stepOnce(b);
    out.tokens.set(r.tokens, s * n);
    out.logprobs.set(r.logprobs, s * n);
    out.topTokens.set(r.topTokens, s * n * k);
    out.topLogprobs.set(r.topLogprobs, s * n * k);
    b = {
      ...b,
      tokens: r.tokens,
      contextLens: b.contextLens.map((c) => c + 1),
      sampling: { ...b.sampling, counter: b.sampling.counter.map((c) => c + 1) },
    };
  }
  return out;
}

/**
 * StepBatch.fromPrevious for a backend without a device-side loop: calls run one after another in the order
 * asked for, and a row that names a row of the call before takes the token that call sampled last there.
 * The CUDA backend keeps those tokens on the GPU instead; this is its spec.
 */
export class StepSequence {
  private tail: Promise<unknown> = Promise.resolve();
  /** The tokens the last call sampled at its last step, one per row (-1 where it sampled none); null after a failure. */
  private last: Int32Array | null = null;

  /** `validate` refuses a batch the backend cannot run (validateBatch), before its rows' inputs are taken. */
  constructor(
    private readonly validate: (batch: StepBatch) => void,
    private readonly run: (batch: StepBatch) => Promise<StepResult>,
  ) {}

  step(batch: StepBatch): Promise<StepResult> {
    const result = this.tail.then(() => this.next(batch));
    this.tail = result.catch(() => undefined);
    return result;
  }

  /** A refused batch is no step: it runs nothing and leaves the last step's tokens to the next batch. */
  private async next(batch: StepBatch): Promise<StepResult> {
    this.validate(batch);
    const run = batch.fromPrevious ? carried(batch, this.last) : batch;
    this.last = null; // until this step has run
    const result = await this.run(run);
    const n = batch.contextLens.length;
    this.last = result.tokens.slice(result.tokens.length - n);
    return result;
  }
}

/**
 * The batch with each carried row's input taken from `last` (the call before's last sampled tokens), and
 * appended to the row's penalty history, if it has one.
 */
function carried(batch: StepBatch, last: Int32Array | null): StepBatch {
  const tokens = batch.tokens.slice();
  const { history, historyStarts } = batch.sampling;
  const histories: number[] = [];
  const starts = new Int32Array(historyStarts.length);
  batch.fromPrevious!.forEach((row, i) => {
    const own = Array.from(history.subarray(historyStarts[i], historyStarts[i + 1]));
    if (row !== -1) {
      const token = last?.[row] ?? -1;
      if (token < 0) fail("input", `step batch: fromPrevious[${i}] = ${row} names a row the step before sampled no token for`);
      tokens[batch.queryStarts[i]] = token;
      if (own.length > 0) own.push(token);
    }
    histories.push(...own);
    starts[i + 1] = histories.length;
  });
  return { ...batch, tokens, sampling: { ...batch.sampling, history: Int32Array.from(histories), historyStarts: starts } };
}
