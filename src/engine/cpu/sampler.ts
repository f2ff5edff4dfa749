import type { SamplingBatch, SamplingKnobs } from "../backend.js";
import { uniformDraw } from "../sampling-rng.js";
import { argmax, logSoftmax, softmax } from "./ops.js";

/**
 * THE sampling specification: the CUDA kernel follows it step for step. For one sequence and its fp32
 * logits row:
 *
 * 1. Reported log-probs are log_softmax of the raw logits: the sampled token's, and the `topLogprobs` most
 *    likely tokens (descending; ties: lower id first).
 * 2. Penalties, on a copy of the logits. Repetition penalty r (Hugging Face's rule) over the distinct tokens
 *    of the whole history (prompt and generated): logit > 0 ? logit / r : logit * r. Then frequency f and
 *    presence p (OpenAI's rule) over the generated part only, for each distinct token with count c:
 *    logit -= c * f + p, each operation rounded to fp32.
 * 3. Temperature 0: greedy, the argmax (lowest id on ties). Done.
 * 4. probs = softmax(logits / temperature), in fp32 with the max subtracted.
 * 5. Filters, each a threshold on probs so that a GPU needs no sort; the kept set is prob >= the largest:
 *    - top-k (0 < k < vocab): the k-th largest prob (ties at the boundary are kept);
 *    - top-p (< 1): among the kept tokens sorted by prob descending, the prob of the first at which the
 *      cumulative prob reaches top_p * (kept mass);
 *    - min-p (> 0): fp32(min_p * max prob).
 * 6. u = uniformDraw(seed, counter) in [0, 1); target = u * (kept mass); walk the kept tokens in increasing
 *    id, summing their probs, and pick the first at which the sum exceeds the target; if rounding leaves
 *    none, the last kept token. Tokens of zero probability (underflow) are never picked.
 *
 * Sums (softmax denominators, masses, cumulative probs) run in float64 here; a GPU's fp32 sums may differ in
 * the last bits, which moves a draw only when u lands within rounding of a boundary.
 */

/** One sequence's sampling parameters: its entries of a SamplingBatch. */
export interface SamplingParams extends SamplingKnobs {
  counter: number;
  /** The tokens the penalties see: the prompt's first, then the generated ones. */
  history: Int32Array;
  promptLen: number;
}

export interface SampledToken {
  token: number;
  /** log_softmax of the raw logits at `token`. */
  logprob: number;
  /** The most likely tokens, best first, and their log-probs. */
  topTokens: Int32Array;
  topLogprobs: Float32Array;
}

export function samplingParams(batch: SamplingBatch, i: number): SamplingParams {
  return {
    temperature: batch.temperature[i],
    topK: batch.topK[i],
    topP: batch.topP[i],
    minP: batch.minP[i],
    repetitionPenalty: batch.repetitionPenalty[i],
    frequencyPenalty: batch.frequencyPenalty[i],
    presencePenalty: batch.presencePenalty[i],
    seed: batch.seed[i],
    counter: batch.counter[i],
    history: batch.history.subarray(batch.historyStarts[i], batch.historyStarts[i + 1]),
    promptLen: batch.promptLens[i],
  };
}

/** Steps 1 to 6 for one sequence. */
export function sampleSequence(logits: Float32Array, params: SamplingParams, topLogprobs: number): SampledToken {
  const logprobs = new Float32Array(logits.length);
  logSoftmax(logprobs, logits);
  const token = nextToken(logits, params);
  // Ranked by the raw logits (ties: lower id first): the same order as the log-probs, without their rounding.
  const topTokens = mostLikely(logits, topLogprobs);
  return {
    token,
    logprob: logprobs[token],
    topTokens,
    topLogprobs: Float32Array.from(topTokens, (t) => logprobs[t]),
  };
}

/** Steps 2 to 6: the next token. `logits` is left as it is. */
export function nextToken(logits: Float32Array, params: SamplingParams): number {
  const x = logits.slice();
  applyPenalties(x, params);
  if (params.temperature === 0) return argmax(x);
  for (let i = 0; i < x.length; i++) x[i] /= params.temperature;
  softmax(x);
  return drawToken(x, keepThreshold(x, params), uniformDraw(params.seed, params.counter));
}

/** Step 2, in place. */
export function applyPenalties(
  logits: Float32Array,
  p: Pick<SamplingParams, "repetitionPenalty" | "frequencyPenalty" | "presencePenalty" | "history" | "promptLen">,
): void {
  const r = p.repetitionPenalty;
  if (r !== 1) {
    for (const t of new Set(p.history)) logits[t] = logits[t] > 0 ? logits[t] / r : logits[t] * r;
  }
  if (p.frequencyPenalty === 0 && p.presencePenalty === 0) return;
  const counts = new Map<number, number>();
  for (const t of p.history.subarray(p.promptLen)) counts.set(t, (counts.get(t) ?? 0) + 1);
  for (const [t, c] of counts) {
    logits[t] -= Math.fround(Math.fround(c * p.frequencyPenalty) + p.presencePenalty);
  }
}

/** Step 5: tokens with prob >= the returned threshold are kept (0 keeps all). */
export function keepThreshold(probs: Float32Array, p: Pick<SamplingParams, "topK" | "topP" | "minP">): number {
  let threshold = 0;
  if (p.topK > 0 && p.topK < probs.length) threshold = probs.slice().sort()[probs.length - p.topK];
  if (p.topP < 1) threshold = topPThreshold(probs, threshold, p.topP);
  if (p.minP > 0) threshold = Math.max(threshold, Math.fround(p.minP * probs[argmax(probs)]));
  return threshold;
}

/** The prob at which the kept tokens, most likely first, reach `topP` of the kept mass. */
function topPThreshold(probs: Float32Array, threshold: number, topP: number): number {
  const kept = probs.filter((x) => x >= threshold).sort().reverse();
  const mass = kept.reduce((sum, x) => sum + x, 0);
  let cumulative = 0;
  for (const x of kept) {
    cumulative += x;
    if (cumulative >= topP * mass) return x;
  }
  return threshold; // not reached: the sum ends at `mass`
}

/** Step 6: the kept token at which the running sum, in token order, passes u * (kept mass). */
export function drawToken(probs: Float32Array, threshold: number, u: number): number {
  let mass = 0;
  for (const x of probs) if (x >= threshold) mass += x;
  const target = u * mass;
  let sum = 0;
  let last = -1;
  for (let t = 0; t < probs.length; t++) {
    const x = probs[t];
    if (x < threshold || x === 0) continue;
    sum += x;
    last = t;
    if (sum > target) return t;
  }
  return last;
}

/** The `n` largest values' indices, largest first; the lower index first among equals. */
export function mostLikely(values: Float32Array, n: number): Int32Array {
  const best = new Int32Array(n);
  let count = 0;
  for (let t = 0; t < values.length && n > 0; t++) {
    if (count === n && !(values[t] > values[best[n - 1]])) continue;
    let i = count < n ? count++ : n - 1;
    for (; i > 0 && values[best[i - 1]] < values[t]; i--) best[i] = best[i - 1];
    best[i] = t;
  }
  return best;
}
