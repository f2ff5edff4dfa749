// Every decoder layer of a decode step of one or two sequences, as one persistent kernel.
//
// Why: a batch-1 step is five dependent phases per layer (QKV, attention, O, gate/up, down). As separate
// kernels each phase pays a launch, its blocks' start and the drain of the kernel before it: 3-4.5 µs per
// GEMV whatever its bytes (BENCHMARKS.md), most of the step once the weights are quantized. Here the blocks
// stay resident and meet at a grid-wide barrier between phases, and a block that arrives issues its next
// phase's first weight loads (they depend on nothing) before it waits, so the weights keep streaming
// through the barrier. The phases run the standalone kernels' device code (gemv_tiles,
// attention_decode_item), so both paths compute the same values.
//
// Bytes: every layer's weights once and the context's K and V once, as the standalone kernels; the limit is
// bandwidth in the large phases and, in the small ones, the barrier: an arrival and a poll through L2
// (about a microsecond).
#pragma once
#include "attention_decode.cuh"
#include "common.cuh"
#include "gemv.cuh"

#include <vector>

namespace decima {

// A barrier over every block of a resident grid, split so that a block can issue loads between arriving
// and waiting. The counter only grows: a launch makes `arrivals` arrivals per block, so a launch finds it
// at a multiple of blocks x arrivals (one counter per grid size) and its k-th barrier opens at base + k x
// blocks. Only thread 0 of a block keeps the target. Arrival is a release reduction after the block's own
// barrier, waiting an acquire load (CUTLASS's pattern; a fence and an atomic measured the same or slower).
struct GridBarrier {
  unsigned long long* count;
  unsigned long long target;
  unsigned blocks, arrivals;
  bool begun;
  unsigned long long* trace;  // DECIMA_PROFILE: block 0's clock at every barrier it leaves, else null
  int passed;

  // The first wait of a launch is for the kernel before it (PDL); the launch's first arrival then
  // finds the base (no block can be two barriers ahead of the slowest one's first arrival).
  __device__ void wait() {
    if (!begun) {
      begun = true;
      pdl_wait();
      if (threadIdx.x == 0) {
        const unsigned long long per_launch = (unsigned long long)blocks * arrivals;
        target = atomicAdd(count, 1ull) / per_launch * per_launch + blocks;
      }
      stamp();
      return;
    }
    if (threadIdx.x == 0) {
      unsigned long long seen;
      do {
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(count) : "memory");
      } while (seen < target);
    }
    stamp();
    __syncthreads();
  }
  __device__ void arrive() {
    __syncthreads();
    if (threadIdx.x == 0) {
      asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(count), "l"(1ull) : "memory");
      target += blocks;
    }
  }
  __device__ void stamp() {
    if (trace && blockIdx.x == 0 && threadIdx.x == 0) {
      unsigned long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      trace[passed] = t;
    }
    passed++;
  }
};

// Where a block's tiles are: slot x SMs + its SM's dense index. A phase with fewer tiles than blocks (O and
// down have 128) then spreads over every SM, whatever order the hardware placed the blocks in (with
// blockIdx, O took 9.8 µs and 7.9 with this, BENCHMARKS.md). Each SM holds exactly blocks / SMs of a
// full-occupancy grid, so a per-SM ticket counter that only grows gives each a distinct slot.
struct SmSpread {
  const int* sm_index;               // %smid -> 0..sms-1
  unsigned long long* tickets;       // per %smid
  int sms;
  __device__ int block() const {
    __shared__ int placed;
    if (threadIdx.x == 0) {
      unsigned smid;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
      const unsigned long long per_sm = gridDim.x / sms;
      placed = (int)(atomicAdd(tickets + smid, 1ull) % per_sm) * sms + sm_index[smid];
    }
    __syncthreads();
    return placed;
  }
};

// One decoder layer as the fused kernel reads it (an array in device memory, built at load).
template <typename T, class W> struct FusedLayer {
  W qkv, o, gate_up, down;
  const T *in_norm, *post_norm;
  T *k_cache, *v_cache;
  int heads, kv_heads, inter;
};

// What a step shares across layers.
template <typename T> struct FusedStep {
  float* resid;  // [batch][hidden], fp32
  T *q, *attn, *act;
  int hidden, batch, layers, block_size;
  float eps;
  RopeArgs rope;
  DecodeAttnArgs attn_args;  // heads and KV heads are set per layer
  unsigned long long* barrier;
  SmSpread spread;
  unsigned long long* trace;  // kFusedPhases x layers + 1 clocks, or null
};

constexpr int kFusedPhases = 5;  // per layer: QKV, attention, O, gate/up, down

// Two blocks per SM at one row (their registers fit with a few bytes spilled outside the loops); at two rows
// the quantized formats would spill kilobytes, so one.
template <typename T, int HD, int B, class W>
__global__ void __launch_bounds__(kGemvThreads, B == 1 ? 2 : 1) decode_layers_kernel(const FusedLayer<T, W>* __restrict__ layers, FusedStep<T> s) {
  static_assert(kGemvThreads == kDecodeThreads, "one block shape serves every phase");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  GridBarrier bar{s.barrier, 0, gridDim.x, (unsigned)(kFusedPhases * s.layers), false, s.trace, 0};
  auto wait = [&] { bar.wait(); };
  const int h = s.hidden, block = s.spread.block(), blocks = gridDim.x;
  EpiResidual residual{};
  residual.rows = h;
  residual.resid = s.resid;
  residual.ld = h;
  for (int i = 0; i < s.layers; i++) {
    const FusedLayer<T, W>& L = layers[i];
    const int qw = L.heads * HD;
    const EpiSiluMul<T> silu{L.inter, s.act, L.inter};

    EpiQkvRope<T> qkv{HD, L.heads, L.kv_heads, s.block_size, s.q, qw, L.k_cache, L.v_cache, s.rope};
    gemv_tiles<T, B, kGemvDepth>(L.qkv, (L.heads + 2 * L.kv_heads) * HD, h, s.batch, EpiQkvRope<T>::tiles(HD, L.heads, L.kv_heads),
                                 ProRmsNorm<T>{s.resid, h, L.in_norm, s.eps}, qkv, xs, block, blocks, wait);
    bar.arrive();

    // Attention: items ordered partition-major, so a short context's live items are the first blocks'.
    DecodeAttnArgs a = s.attn_args;
    a.heads = L.heads;
    a.kv_heads = L.kv_heads;
    const int items = a.max_partitions * s.batch * L.kv_heads;
    for (int it = block; it < items; it += blocks)
      prefetch_partition<HD>(L.k_cache, L.v_cache, a, it / (s.batch * L.kv_heads), it % L.kv_heads, it / L.kv_heads % s.batch);
    bar.wait();
    for (int it = block; it < items; it += blocks) {
      attention_decode_item<T, HD>(s.q, qw, L.k_cache, L.v_cache, s.attn, qw, a, it / (s.batch * L.kv_heads), it % L.kv_heads,
                                   it / L.kv_heads % s.batch, smem_raw);
      __syncthreads();  // the next item reuses the shared tiles
    }
    bar.arrive();

    gemv_tiles<T, B, kGemvDepth>(L.o, h, qw, s.batch, RowsLinear::tiles(h), ProPlain<T>{s.attn, qw}, residual, xs, block, blocks, wait);
    bar.arrive();

    gemv_tiles<T, B, kGemvDepth>(L.gate_up, 2 * L.inter, h, s.batch, EpiSiluMul<T>::tiles(L.inter), ProRmsNorm<T>{s.resid, h, L.post_norm, s.eps},
                                 silu, xs, block, blocks, wait);
    bar.arrive();

    // Every block is resident by now: the LM head's blocks may be scheduled as SMs free up.
    if (i == s.layers - 1) pdl_launch_dependents();
    gemv_tiles<T, B, kGemvDepth>(L.down, h, L.inter, s.batch, RowsLinear::tiles(h), ProPlain<T>{s.act, L.inter}, residual, xs, block, blocks,
                                 wait);
    if (i + 1 < s.layers) bar.arrive();
  }
  if (s.trace) {  // the last phase's end
    __syncthreads();
    bar.stamp();
  }
}

__global__ void record_sm_kernel(int* seen, int max_smid) {
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  if (threadIdx.x == 0 && smid < (unsigned)max_smid) seen[smid] = 1;
}

// %smid -> a dense index over the SMs (the ids may have gaps), found by running many small blocks once.
inline std::vector<int> dense_sm_index(int max_smid, int* scratch) {
  CUDA_CHECK(cudaMemset(scratch, 0, max_smid * sizeof(int)));
  record_sm_kernel<<<64 * max_smid, 32>>>(scratch, max_smid);
  CUDA_CHECK(cudaGetLastError());
  std::vector<int> seen(max_smid), index(max_smid, -1);
  CUDA_CHECK(cudaMemcpy(seen.data(), scratch, max_smid * sizeof(int), cudaMemcpyDeviceToHost));
  int n = 0;
  for (int i = 0; i < max_smid; i++)
    if (seen[i]) index[i] = n++;
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (n != sms) throw CudaError("fused decoder: found " + std::to_string(n) + " SM ids for " + std::to_string(sms) + " SMs");
  return index;
}

// Shared memory for a step: the widest product's activation rows, or the attention's tiles.
template <typename T, int HD> size_t decode_layers_smem(int batch, int widest, int max_group) {
  return std::max((size_t)batch * (widest + kGemvPad) * sizeof(T), attention_decode_smem<T, HD>(max_group));
}

// The grid is every block that fits on the GPU at once (the barriers need them all resident; the launch is
// cooperative, so the driver refuses it rather than let it hang).
template <typename T, int HD, int B, class W>
void decode_layers(const Launch& l, const FusedLayer<T, W>* layers, const FusedStep<T>& s, size_t smem) {
  auto kernel = decode_layers_kernel<T, HD, B, W>;
  static size_t configured = 48 * 1024;
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  launch_ex(l, true, kernel, dim3(resident_blocks(kernel, smem)), dim3(kGemvThreads), smem, layers, s);
}

}  // namespace decima
