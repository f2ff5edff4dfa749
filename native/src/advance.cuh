// The tail of a captured decode step: feed each sampled token back as the next input and move every
// sequence one position on, so that replaying the graph runs the next step with no host in between.
#pragma once
#include "common.cuh"

namespace decima {

struct AdvanceArgs {
  int* tokens;
  int* positions;
  int* slots;
  int* context_lens;
  uint32_t* counter;
  const int* block_tables;
  int table_width, block_size, scratch_block;
  const int* sampled;
  const float* logprobs;
  const int* top_ids;
  const float* top_lps;
  int top_n;
  int* step;  // which step of the run this is
  int* out_tokens;  // [step][n]
  float* out_logprobs;
  int* out_top_ids;  // [step][n][top_n]
  float* out_top_lps;
};

__global__ void advance_kernel(int n, AdvanceArgs a) {
  pdl_launch_dependents();
  pdl_wait();
  const int step = *a.step;
  __syncthreads();
  if (threadIdx.x == 0) *a.step = step + 1;
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    const int tok = a.sampled[s];
    a.out_tokens[step * n + s] = tok;
    a.out_logprobs[step * n + s] = a.logprobs[s];
    for (int j = 0; j < a.top_n; j++) {
      a.out_top_ids[(step * n + s) * a.top_n + j] = a.top_ids[s * a.top_n + j];
      a.out_top_lps[(step * n + s) * a.top_n + j] = a.top_lps[s * a.top_n + j];
    }
    const int pos = a.positions[s] + 1;
    const int entry = pos / a.block_size;
    const int block = entry < a.table_width ? a.block_tables[s * a.table_width + entry] : a.scratch_block;
    a.tokens[s] = tok;
    a.positions[s] = pos;
    a.context_lens[s] = pos + 1;
    a.slots[s] = block * a.block_size + pos % a.block_size;
    a.counter[s] += 1;
  }
}

}  // namespace decima
