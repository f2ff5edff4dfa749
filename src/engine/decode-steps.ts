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
