// Sampling on the GPU, following the CPU reference (src/engine/cpu/sampler.ts) rule for rule: log-probs from
// the raw logits, penalties, then greedy or temperature sampling with top-k / top-p / min-p expressed as
// probability thresholds (found by radix select on the float bits, so nothing is sorted), and one counter-based
// uniform draw per token. One block per sequence. Bytes: the logits row a few times over (from L2);
// negligible next to the weights; a top-k or top-p row reads it three more times per threshold.
#pragma once
#include "common.cuh"

namespace decima {

constexpr int kSampleThreads = 1024;
constexpr int kMaxTopLogprobs = 20;

struct SamplingArgs {
  const float* temperature;
  const int* top_k;
  const float* top_p;
  const float* min_p;
  const float* repetition;
  const float* frequency;
  const float* presence;
  const uint32_t* seed;
  const uint32_t* counter;
  const uint8_t* sample;     // per sequence: 0 = skip
  const int* pen_starts;     // [seq + 1]: distinct history tokens per sequence
  const int* pen_tokens;
  const int* pen_counts;     // occurrences among the generated tokens
  float* pen_saved;          // the raw logits of the penalised tokens
};

struct SampleOut {
  int* tokens;
  float* logprobs;
  int* top_ids;     // [seq][top_n]
  float* top_lps;
};

__host__ __device__ inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}
// The shared counter-based draw (src/engine/sampling-rng.ts): uniform in [0, 1) with 24 bits.
__host__ __device__ inline float uniform_draw(uint32_t seed, uint32_t counter) {
  return (float)(fmix32(seed ^ fmix32(counter ^ 0x9e3779b9u)) >> 8) * (1.0f / 16777216.0f);
}

// One block per row: the raw log-sum-exp and top_n alternatives, the penalties (in place: `logits` is the
// step's scratch, already copied out where raw logits were asked for), then the greedy pick or the
// threshold sampling. `probs` is scratch of seqs x vocab floats.
void launch_sample(const Launch& l, float* logits, float* probs, int seqs, int vocab, int top_n, const SamplingArgs& a, const SampleOut& out);

}  // namespace decima
