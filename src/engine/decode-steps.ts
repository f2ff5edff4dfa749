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
 * StepBatch.continues for a backend without a device-side loop: calls run one after another in the order
 * asked for, and a continuing batch's inputs are the tokens the call before it sampled last. The CUDA
 * backend keeps those tokens on the GPU instead; this is its spec.
 */
export class StepSequence {
  private tail: Promise<unknown> = Promise.resolve();
  /** The tokens the last call sampled at its last step, when it was a decode batch (one per sequence). */
  private last: Int32Array | null = null;

  /** `validate` refuses a batch the backend cannot run (validateBatch), before its continuity is checked. */
  constructor(
    private readonly validate: (batch: StepBatch) => void,
    private readonly run: (batch: StepBatch) => Promise<StepResult>,
  ) {}

  step(batch: StepBatch): Promise<StepResult> {
    const result = this.tail.then(() => this.next(batch));
    this.tail = result.catch(() => undefined);
    return result;
  }

  private async next(batch: StepBatch): Promise<StepResult> {
    const last = this.last;
    this.last = null;
    this.validate(batch);
    const n = batch.contextLens.length;
    if (batch.continues && last?.length !== n) {
      fail("input", `step batch: a continuing batch of ${n} sequences must follow a decode step of as many`);
    }
    const result = await this.run(batch.continues ? { ...batch, tokens: last! } : batch);
    const decode = batch.tokens.length === n && batch.sample.every((v) => v === 1) && (batch.returnLogits ?? "none") === "none";
    if (decode) this.last = result.tokens.slice(result.tokens.length - n);
    return result;
  }
}
