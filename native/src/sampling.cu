#include <climits>

#include <cub/block/block_scan.cuh>

#include "sampling.cuh"

namespace decima {
namespace {

// Block-wide argmax; ties go to the lowest id. Every thread gets the winner.
__device__ inline void block_argmax(float& v, int& id, float* sv, int* si) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (ov > v || (ov == v && oi < id)) { v = ov; id = oi; }
  }
  __syncthreads();
  if (lane == 0) { sv[warp] = v; si[warp] = id; }
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
  id = lane < (int)(blockDim.x >> 5) ? si[lane] : INT_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (ov > v || (ov == v && oi < id)) { v = ov; id = oi; }
  }
}

// f(i, x[i]) for every i < n this thread owns (i = threadIdx.x + k x blockDim.x, in increasing k), with
// kInFlight loads issued before the first use: one at a time, a pass over a 49,152-entry row was a chain of
// 48 round trips to L2 per thread. Each thread's order is the plain loop's, so every sum is unchanged.
constexpr int kInFlight = 8;
template <class F> __device__ __forceinline__ void row_pass(const float* x, int n, F f) {
  for (int i0 = threadIdx.x; i0 < n; i0 += kInFlight * blockDim.x) {
    float v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; u++) {
      const int i = i0 + u * blockDim.x;
      v[u] = i < n ? x[i] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kInFlight; u++)
      if (i0 + u * blockDim.x < n) f(i0 + u * blockDim.x, v[u]);
  }
}

// Radix select on the probabilities' float bits (they are non-negative, so bit order is value order): the
// largest t with W(t) >= goal, where W(t) is the weight of the entries >= t that are also >= `floor`. An
// entry weighs 1 (top-k) or its probability in units of 2^-31, rounded (top-p): integers, so every
// histogram is exact and no order of the atomics moves a result, and 32 bits wide, which shared-memory
// atomics add natively (64-bit adds became compare-and-swap loops: 47% of a top-p row's time). Three
// passes, of 10, 11 and 10 bits, each histogram only the entries under the prefix found so far; the
// result is the bits of an entry. A pass per bit, 31 in all, took 199 µs of a top-p row, one SM issuing
// every instruction. `goal` is called with the total weight of the entries >= floor, after the first pass.
using Weight = uint32_t;
constexpr int kRadixBins = 2048;
constexpr float kMassUnit = 2147483648.f;  // 2^31: the weights of probabilities summing to 1 fit 32 bits
using RadixScan = cub::BlockScan<Weight, kSampleThreads>;
struct RadixShared {
  Weight bins[kRadixBins];
  typename RadixScan::TempStorage scan;
  uint32_t digit;
  Weight above;
};

template <class Goal>
__device__ uint32_t radix_threshold(const float* p, int vocab, uint32_t floor, bool by_mass, Goal goal, RadixShared& sh) {
  static_assert(kRadixBins == 2 * kSampleThreads, "a thread owns two bins");
  uint32_t prefix = 0;  // the digits found so far
  Weight above = 0, need = 0;  // weight of the entries past the prefix's range; weight still to find
#pragma unroll
  for (int d = 0; d < 3; d++) {
    const int width = d == 1 ? 11 : 10, shift = d == 0 ? 21 : d == 1 ? 10 : 0, top = shift + width;
    for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) sh.bins[i] = 0;
    __syncthreads();
    row_pass(p, vocab, [&](int, float x) {
      const uint32_t b = __float_as_uint(x);
      if (b < floor || (b >> top) != prefix) return;
      atomicAdd(&sh.bins[(b >> shift) & ((1u << width) - 1)], by_mass ? __float2uint_rn(x * kMassUnit) : 1u);
    });
    __syncthreads();
    // Thread i owns digits 2047 - 2i and 2046 - 2i: an inclusive scan in thread order sums from the top.
    const int hi = kRadixBins - 1 - 2 * threadIdx.x;
    const Weight w_hi = sh.bins[hi], w_lo = sh.bins[hi - 1];
    Weight before, total;
    RadixScan(sh.scan).ExclusiveSum(w_hi + w_lo, before, total);
    if (d == 0) need = max(goal(total), (Weight)1);  // at least one unit: t is an entry's value
    if (need > before && need <= before + w_hi + w_lo) {
      const bool in_hi = need <= before + w_hi;
      sh.digit = in_hi ? hi : hi - 1;
      sh.above = above + before + (in_hi ? 0 : w_hi);
    }
    __syncthreads();
    prefix = (prefix << width) | sh.digit;
    need -= sh.above - above;
    above = sh.above;
    __syncthreads();  // sh is rewritten by the next pass
  }
  return prefix;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(float* __restrict__ logits, float* __restrict__ probs, int vocab, int top_n, SamplingArgs a, SampleOut out) {
  using Scan = cub::BlockScan<float, kSampleThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ RadixShared radix;
  __shared__ float scratch[32];
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ int chosen;
  __shared__ int picked[kMaxTopLogprobs];
  pdl_launch_dependents();
  pdl_wait();
  const int s = blockIdx.x;
  if (!a.sample[s]) {
    if (threadIdx.x == 0) { out.tokens[s] = -1; out.logprobs[s] = 0.f; }
    return;
  }
  float* row = logits + (size_t)s * vocab;

  // One pass over the raw logits: the maximum (first on ties), and the sum of exponentials online.
  float best = -INFINITY, sum = 0.f;
  int best_id = INT_MAX;
  row_pass(row, vocab, [&](int i, float v) {
    if (v > best) {
      sum = sum * __expf(best - v) + 1.f;
      best = v;
      best_id = i;
    } else {
      sum += __expf(v - best);
    }
  });
  const float m = best;
  block_argmax(best, best_id, sv, si);
  const float lse = best + __logf(block_sum(m == -INFINITY ? 0.f : sum * __expf(m - best), scratch));

  for (int n = 0; n < top_n; n++) {  // the alternatives, by repeated argmax (top_n <= 20)
    float v = -INFINITY;
    int id = INT_MAX;
    row_pass(row, vocab, [&](int i, float x) {
      bool taken = false;
      for (int j = 0; j < n; j++) taken |= picked[j] == i;
      if (!taken && (x > v || (x == v && i < id))) { v = x; id = i; }
    });
    block_argmax(v, id, sv, si);
    if (threadIdx.x == 0) {
      picked[n] = id;
      out.top_ids[s * top_n + n] = id;
      out.top_lps[s * top_n + n] = v - lse;
    }
    __syncthreads();
  }

  // Penalties, in place; they move the pick, not the reported log-probs.
  const int pen0 = a.pen_starts[s], pen1 = a.pen_starts[s + 1];
  if (pen1 > pen0) {
    const float rep = a.repetition[s], freq = a.frequency[s], pres = a.presence[s];
    __syncthreads();  // every thread is done reading the raw row
    for (int e = pen0 + threadIdx.x; e < pen1; e += blockDim.x) {
      const int tok = a.pen_tokens[e], count = a.pen_counts[e];
      float l = row[tok];
      a.pen_saved[e] = l;
      l = l > 0.f ? l / rep : l * rep;
      if (count > 0) l -= count * freq + pres;
      row[tok] = l;
    }
    __syncthreads();
  }
  if (pen1 > pen0) {
    best = -INFINITY;
    best_id = INT_MAX;
    row_pass(row, vocab, [&](int i, float x) {
      if (x > best) { best = x; best_id = i; }
    });
    block_argmax(best, best_id, sv, si);
  }

  const float temp = a.temperature[s];
  if (temp > 0.f) {
    float* p = probs + (size_t)s * vocab;
    float z = 0.f;
    row_pass(row, vocab, [&](int i, float x) {
      const float e = __expf((x - best) / temp);
      p[i] = e;
      z += e;
    });
    z = block_sum(z, scratch);
    row_pass(p, vocab, [&](int i, float x) { p[i] = x / z; });
    __syncthreads();
    const float pmax = 1.f / z;
    uint32_t t = 0;
    const int k = a.top_k[s];
    if (k > 0 && k < vocab) t = radix_threshold(p, vocab, 0, false, [&](Weight) { return (Weight)k; }, radix);
    const float top_p = a.top_p[s];
    if (top_p < 1.f) {
      // The kept mass times top_p, rounded up: W(t) >= goal holds exactly when mass >= top_p x kept mass.
      auto goal = [&](Weight kept) { return (Weight)ceil((double)top_p * kept); };
      t = radix_threshold(p, vocab, t, true, goal, radix);
    }
    const float min_p = a.min_p[s];
    if (min_p > 0.f) {
      const uint32_t tm = __float_as_uint(min_p * pmax);
      t = t > tm ? t : tm;
    }
    // Walk the kept tokens in id order to where the running mass passes u x (kept mass).
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int lo = threadIdx.x * per, hi = min(lo + per, vocab);
    float local = 0.f;
    int last_kept = -1;
    for (int i = lo; i < hi; i++)
      if (__float_as_uint(p[i]) >= t) { local += p[i]; last_kept = i; }
    float before, total;
    Scan(scan_tmp).ExclusiveSum(local, before, total);
    const float target = uniform_draw(a.seed[s], a.counter[s]) * total;
    if (threadIdx.x == 0) chosen = INT_MAX;
    __syncthreads();
    if (before <= target && target < before + local) {
      float run = before;
      for (int i = lo; i < hi; i++) {
        if (__float_as_uint(p[i]) < t) continue;
        run += p[i];
        if (run > target) { atomicMin(&chosen, i); break; }
      }
    }
    // Rounding can leave the target past every running sum: then the last kept token wins.
    const float lk = block_max((float)last_kept, scratch);
    __syncthreads();
    best_id = chosen != INT_MAX ? chosen : (int)lk;
  }
  if (threadIdx.x == 0) {
    // The sampled token's raw logit: a penalised token's was saved before the penalty changed it.
    float raw = row[best_id];
    for (int e = pen0; e < pen1; e++)
      if (a.pen_tokens[e] == best_id) raw = a.pen_saved[e];
    out.tokens[s] = best_id;
    out.logprobs[s] = raw - lse;
  }
}

}  // namespace

void launch_sample(const Launch& l, float* logits, float* probs, int seqs, int vocab, int top_n, const SamplingArgs& a, const SampleOut& out) {
  launch(l, sample_kernel, dim3(seqs), dim3(kSampleThreads), 0, logits, probs, vocab, top_n, a, out);
}

}  // namespace decima
