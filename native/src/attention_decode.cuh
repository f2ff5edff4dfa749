// Decode attention (one new query token per sequence) over the paged KV cache, flash-decoding style.
//
// One thread-block cluster per (sequence, KV head). It serves every query head that shares the KV head
// (grouped-query attention), so each K and V vector is read once for all of them. The cluster's blocks split
// the context into equal spans; a block walks its span in chunks of kPartition positions (one at short
// contexts), each chunk's K and V copied to shared memory in one round of asynchronous copies, with an
// online softmax across chunks. The blocks then merge through distributed shared memory: each pushes its
// partial sums for every slice of the output to the slice's owner and meets the others at one cluster
// barrier, so no partial result goes through global memory and no block waits on an atomic counter.
//
// Everything but the newest position is known before the QKV product this kernel follows has finished:
// the sequence's metadata (no kernel of a step writes it; the step's first kernel lets its dependents start
// only after the previous step has finished) and the K and V of earlier positions. So the first chunk's
// copies are issued before waiting for the previous kernel (PDL); after it, only the query and the newest
// position's K and V. Bytes: the context's K and V once (context x kv_heads x hd x 2 x 2); FLOPs: 4 x
// context x heads x hd. At decode sizes it is latency-bound: the critical path after the wait is one round
// trip to L2, a chunk's arithmetic (about a microsecond) and the cluster barrier.
#pragma once
#include "cluster.cuh"
#include "common.cuh"
#include "gemv.cuh"

namespace decima {

constexpr int kPartition = 64;  // positions per chunk in shared memory
constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kMaxDecodeCluster = 16;

struct DecodeAttnArgs {
  const int* seqs;          // which sequences (indices into the per-sequence arrays)
  const int* query_starts;  // token row of each sequence's query
  const int* context_lens;
  const int* block_tables;  // [seq][table_width]
  int table_width;
  int heads, kv_heads, block_size;
  float scale;
};

template <int HD> constexpr int kv_stride() { return HD + 8; }  // 16-byte rows, spread over banks

// The O projection fused in (int4 weights on the tensor cores, one sequence per cluster): the cluster of a
// KV head owns O's columns of its query heads, G x HD of them (whole int4 steps), and each block of it
// hidden / cluster rows of those. A lane loads its weights into registers on entry, before the wait for the
// QKV product, so that after the merge only the products and the additions into the residual stream remain:
// the O product's own kernel (its launch, wait and ramp-up) goes away. Each block needs every head's merged
// output, so the blocks send their partial sums to every peer, not to a slice's owner. The fp32 additions
// of the KV heads' clusters arrive in no fixed order (RunnerOptions::fused_o turns this off).
//
// Bytes: O's int4 columns of the KV head once per sequence; FLOPs 2 x hidden x heads x HD per sequence.
// Measured on the 1B shape (BENCHMARKS.md): inside the kernel the O part costs about what the separate
// product did (about 4 µs in eager launches: the broadcast of every partial sum, the products, the
// additions), and the blocks (146 registers, weights held through the attention) hold an SM alone, so
// they cannot start beside the QKV product's. One sequence: no change (0.636-0.647 against 0.643-0.644 ms
// a step); two: 0.750-0.758 to 0.711-0.713 ms, as the O GEMV costs more with two rows and this does not;
// four and eight: slower (+3%, +16%), their clusters no longer in one wave. So steps of up to two.
constexpr int kAttnOMaxSeqs = 2;
constexpr int kAttnOItems = 8;  // a lane's int4 steps of O: (tiles of 16 rows) x (steps of 128 columns)
// Whether a KV head's query columns are whole steps that tile a lane's items.
constexpr bool attn_o_columns(int q_cols) { return q_cols % 128 == 0 && kAttnOItems % (q_cols / 128) == 0; }
template <typename T> struct AttnOProj {
  Int4W<T> w;     // O: [hidden][heads x HD]
  int hidden;
  float* resid;   // [rows][ld]: gains each query row's product
  float* copy;    // nullptr, or a copy of the stream that gains it too (the fused MLP reads it)
  int ld;
};
struct NoOProj {};

// Whether the fused O projection takes a layer: int4 on the tensor cores, clusters, whole steps per KV head,
// whole row tiles per block and no more than kAttnOItems steps per lane.
inline bool attention_o_fits(int quant, int group, int hidden, int heads, int kv_heads, int hd, int cluster) {
  const int q_cols = heads / kv_heads * hd, tiles = hidden / cluster / 16;
  return quant == 2 && gemv_on_tensor_cores(quant, group, heads * hd, 1) && cluster > 1 && attn_o_columns(q_cols) && hidden % (16 * cluster) == 0 &&
         ceil_div(tiles, kDecodeWarps) * (q_cols / 128) <= kAttnOItems;
}

template <typename T, int HD> size_t attention_decode_smem(int group, int cluster, bool fused_o) {
  const size_t received = fused_o ? (size_t)cluster * group * HD : (size_t)group * HD;  // partial sums from the peers
  return sizeof(T) * 2 * (size_t)kPartition * kv_stride<HD>()                 // the K and V chunk
         + sizeof(float) * ((size_t)group * HD + (size_t)group * kPartition   // queries, scores
                            + received + 2 * (size_t)cluster * group          // partials received: sums, (max, sum)
                            + 3 * group);                                     // per head: max, sum, rescale
}

// Positions [from, to) of K and V into the chunk's shared-memory rows, counted from `first`.
template <typename T, int HD>
__device__ __forceinline__ void copy_kv(T* ks, T* vs, const T* k_cache, const T* v_cache, const int* table, int from, int to, int first,
                                        const DecodeAttnArgs& a) {
  constexpr int VPR = HD / 8;  // 16-byte vectors per row
  for (int i = threadIdx.x; i < (to - from) * VPR; i += blockDim.x) {
    const int pos = from + i / VPR, c = i % VPR;
    const size_t at = kv_index(table[pos / a.block_size] * a.block_size + pos % a.block_size, blockIdx.y, a.kv_heads, a.block_size, HD) + c * 8;
    const int r = (pos - first) * kv_stride<HD>() + c * 8;
    cp_async16(ks + r, k_cache + at);
    cp_async16(vs + r, v_cache + at);
  }
}

// The fused O projection's lane (g, t) of warp w: its k-th item is step k % steps of the KV head's columns
// in the block's row tile w + k / steps x kDecodeWarps.
template <int G, int HD, typename T>
__device__ __forceinline__ void o_load(const AttnOProj<T>& op, MmaItem (&items)[kAttnOItems], int kv_head, int rank, int cluster) {
  constexpr int steps = G * HD / MmaInt4<T>::kStep;
  static_assert(attn_o_columns(G * HD), "whole int4 steps per KV head");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tiles = op.hidden / cluster / 16, row0 = rank * (op.hidden / cluster);
#pragma unroll
  for (int k = 0; k < kAttnOItems; k++) {
    const int tile = warp + k / steps * kDecodeWarps, r = row0 + tile * 16 + (lane >> 2);
    items[k] = tile < tiles ? mma_item(op.w, r, r + 8, (kv_head * steps + k % steps) * 4 + (lane & 3), op.hidden) : MmaItem{};
  }
}

// The block's rows of O times the merged heads (x, in MmaLayout order), added into the query row's stream.
template <int G, int HD, typename T>
__device__ __forceinline__ void o_product(const AttnOProj<T>& op, const MmaItem (&items)[kAttnOItems], const T* x, int row, int rank, int cluster) {
  using M = MmaInt4<T>;
  constexpr int steps = G * HD / M::kStep;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3, tiles = op.hidden / cluster / 16;
#pragma unroll
  for (int k0 = 0; k0 < kAttnOItems; k0 += steps) {
    const int tile = warp + k0 / steps * kDecodeWarps;
    if (tile >= tiles) break;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // lane (g, t): rows g and g + 8; all batch columns hold this row's x
#pragma unroll
    for (int s = 0; s < steps; s++) mma_accumulate<M>(acc, items[k0 + s], x + s * M::kStep + t * (M::kStep / 4), t);
    if (t == 0) {
      const int r = rank * (op.hidden / cluster) + tile * 16 + (lane >> 2);
      float* dst[2] = {op.resid, op.copy};
      for (float* d : dst) {
        if (!d) continue;
        atomicAdd(d + (size_t)row * op.ld + r, acc[0]);
        atomicAdd(d + (size_t)row * op.ld + r + 8, acc[2]);
      }
    }
  }
}

// G: query heads per KV head, a compile-time constant so that the loops over heads unroll. The cluster is
// gridDim.x blocks wide (1 to kMaxDecodeCluster). OP: NoOProj (the output goes to `out`) or AttnOProj.
template <typename T, int HD, int G, class OP>
__device__ __forceinline__ void attention_decode_block(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache,
                                                       const T* __restrict__ v_cache, T* __restrict__ out, int out_ld, const DecodeAttnArgs& a,
                                                       const OP& op) {
  static_assert(HD % 8 == 0, "16-byte rows");
  constexpr bool kFusedO = !std::is_same_v<OP, NoOProj>;
  constexpr int kPairs = (G * HD / 2 + kDecodeThreads - 1) / kDecodeThreads;  // (head, dimension pair)s per thread
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);                                   // [kPartition][kv_stride]
  T* vs = ks + kPartition * kv_stride<HD>();                                // [kPartition][kv_stride]
  float* qs = reinterpret_cast<float*>(vs + kPartition * kv_stride<HD>());  // [G][HD], scaled
  float* sc = qs + G * HD;                                                  // [G][kPartition]: scores, then probabilities
  float* recv_o = sc + G * kPartition;                                      // [cluster][slice]: peers' sums for my slice
  float* recv_ml = recv_o + (kFusedO ? gridDim.x : 1) * G * HD;            // [cluster][G][2]: peers' (max, sum)
  float* stats = recv_ml + 2 * gridDim.x * G;                               // [G][3]: running max, running sum, rescale

  pdl_launch_dependents();
  const int cluster = gridDim.x, rank = cluster_rank(), g = blockIdx.y, s = a.seqs[blockIdx.z];
  MmaItem o_items[kFusedO ? kAttnOItems : 1];
  if constexpr (kFusedO) o_load<G, HD>(op, o_items, g, rank, cluster);
  const int ctx = a.context_lens[s], row = a.query_starts[s], newest = ctx - 1;
  const int* table = a.block_tables + (size_t)s * a.table_width;
  const int span = ceil_div(ctx, cluster), begin = min(ctx, rank * span), end = min(ctx, begin + span);
  const int first_end = min(end, begin + kPartition);
  copy_kv<T, HD>(ks, vs, k_cache, v_cache, table, begin, min(first_end, newest), begin, a);
  pdl_wait();
  if (newest >= begin && newest < first_end) copy_kv<T, HD>(ks, vs, k_cache, v_cache, table, newest, ctx, begin, a);
  // The query, every load in flight at once (a loop with the block's size as its stride waits for each
  // load in turn: one row's step 0.660 to 0.654 ms with int4, BENCHMARKS.md).
  constexpr int kQ = (G * HD + kDecodeThreads - 1) / kDecodeThreads;
  T qv[kQ];
#pragma unroll
  for (int u = 0; u < kQ; u++) {
    const int i = u * kDecodeThreads + threadIdx.x;
    qv[u] = i < G * HD ? q[(size_t)row * q_ld + g * G * HD + i] : from_float<T>(0.f);
  }
#pragma unroll
  for (int u = 0; u < kQ; u++) {
    const int i = u * kDecodeThreads + threadIdx.x;
    if (i < G * HD) qs[i] = to_float(qv[u]) * a.scale;
  }
  if (threadIdx.x < G) {
    stats[3 * threadIdx.x] = -INFINITY;
    stats[3 * threadIdx.x + 1] = 0.f;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  float2 acc[kPairs] = {};
  for (int t0 = begin; t0 < end; t0 += kPartition) {
    const int n = min(kPartition, end - t0);
    if (t0 != begin) copy_kv<T, HD>(ks, vs, k_cache, v_cache, table, t0, t0 + n, t0, a);
    cp_async_wait_all();
    __syncthreads();

    // Scores: a thread per (head, position); a warp shares its head, so its query reads are broadcasts.
    for (int i = threadIdx.x; i < G * kPartition; i += blockDim.x) {
      const int h = i / kPartition, t = i % kPartition;
      if (t >= n) continue;
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < HD / 8; c++) {
        float kf[8];
        unpack8(*reinterpret_cast<const uint4*>(ks + t * kv_stride<HD>() + c * 8), kf, T());
#pragma unroll
        for (int j = 0; j < 8; j++) dot = fmaf(qs[h * HD + c * 8 + j], kf[j], dot);
      }
      sc[h * kPartition + t] = dot;
    }
    __syncthreads();

    // Online softmax per head: a warp per head moves the running max and sum past this chunk.
    for (int h = warp; h < G; h += kDecodeWarps) {
      float m = -INFINITY;
      for (int i = lane; i < n; i += 32) m = fmaxf(m, sc[h * kPartition + i]);
      m = fmaxf(warp_max(m), stats[3 * h]);
      float l = 0.f;
      for (int i = lane; i < n; i += 32) {
        const float p = __expf(sc[h * kPartition + i] - m);
        sc[h * kPartition + i] = p;
        l += p;
      }
      l = warp_sum(l);
      __syncwarp();
      if (lane == 0) {
        const float rescale = __expf(stats[3 * h] - m);
        stats[3 * h] = m;
        stats[3 * h + 1] = stats[3 * h + 1] * rescale + l;
        stats[3 * h + 2] = rescale;
      }
    }
    __syncthreads();

    // P V: a thread per (head, pair of dimensions), over the chunk's rows in shared memory.
#pragma unroll
    for (int k = 0; k < kPairs; k++) {
      const int i = threadIdx.x + k * kDecodeThreads;
      if (i >= G * HD / 2) break;
      const int h = i / (HD / 2), d = 2 * (i % (HD / 2));
      const float rescale = stats[3 * h + 2];
      float o0 = acc[k].x * rescale, o1 = acc[k].y * rescale;
      for (int t = 0; t < n; t++) {
        const float p = sc[h * kPartition + t];
        const uint32_t pair = *reinterpret_cast<const uint32_t*>(vs + t * kv_stride<HD>() + d);
        const T* v = reinterpret_cast<const T*>(&pair);
        o0 = fmaf(p, to_float(v[0]), o0);
        o1 = fmaf(p, to_float(v[1]), o1);
      }
      acc[k] = make_float2(o0, o1);
    }
    __syncthreads();  // the next chunk's copies overwrite K, V and the probabilities
  }
  if (begin == end) __syncthreads();  // a block with no positions: its initial statistics

  // Push: the output (G x HD values) is cut into one slice per block; each block sends its partial sums
  // for a slice, and its (max, sum) per head, to the slice's owner. With O fused in, every block owns it all.
  const int slice = kFusedO ? G * HD : G * HD / cluster;
#pragma unroll
  for (int k = 0; k < kPairs; k++) {
    const int i = threadIdx.x + k * kDecodeThreads;
    if (i >= G * HD / 2) break;
    const int o = 2 * i;  // h * HD + d
    for (int r = kFusedO ? 0 : o / slice; r <= (kFusedO ? cluster - 1 : o / slice); r++)
      *reinterpret_cast<float2*>(cluster_peer(recv_o, r) + rank * slice + o % slice) = acc[k];
  }
  for (int i = threadIdx.x; i < G * cluster; i += blockDim.x) {
    const int h = i % G, owner = i / G;
    *reinterpret_cast<float2*>(cluster_peer(recv_ml, owner) + 2 * (rank * G + h)) = make_float2(stats[3 * h], stats[3 * h + 1]);
  }
  cluster_sync();

  // Merge my slice: rescale each block's sums to the largest max.
  T* merged = ks;  // with O fused in: [G x HD] in the tensor-core kernel's order (the K chunk is spent)
  for (int i = threadIdx.x; i < slice; i += blockDim.x) {
    const int o = (kFusedO ? 0 : rank * slice) + i, h = o / HD;
    float m = -INFINITY;
    for (int j = 0; j < cluster; j++) m = fmaxf(m, recv_ml[2 * (j * G + h)]);
    float l = 0.f, sum = 0.f;
    for (int j = 0; j < cluster; j++) {
      const float w = __expf(recv_ml[2 * (j * G + h)] - m);
      l += w * recv_ml[2 * (j * G + h) + 1];
      sum += w * recv_o[j * slice + i];
    }
    if constexpr (kFusedO) merged[MmaLayout::at(o)] = from_float<T>(sum / l);
    else out[(size_t)row * out_ld + g * G * HD + o] = from_float<T>(sum / l);
  }
  if constexpr (kFusedO) {
    __syncthreads();
    o_product<G, HD>(op, o_items, merged, row, rank, cluster);
  }
}

template <typename T, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            T* __restrict__ out, int out_ld, DecodeAttnArgs a, NoOProj op) {
  attention_decode_block<T, HD, G>(q, q_ld, k_cache, v_cache, out, out_ld, a, op);
}

// With O fused in, a lane holds its O weights (80 registers) through the attention: one block per SM.
template <typename T, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads, 1)
    attention_decode_o_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                              T* __restrict__ out, int out_ld, DecodeAttnArgs a, AttnOProj<T> op) {
  attention_decode_block<T, HD, G>(q, q_ld, k_cache, v_cache, out, out_ld, a, op);
}

// Blocks per cluster in a decode step of `seqs` sequences: 8 from two sequences on, enough to spread a 1B
// model's contexts over the SMs (4 KV heads x 8 x 2), and the largest size every cluster-capable GPU must
// schedule. One sequence takes 16 (a non-portable size: attention_decode_g falls back to 8 where the GPU
// cannot schedule it), its context over twice the SMs. Measured on the H200, a step of one sequence (int4,
// int8, 16-bit engines; BENCHMARKS.md): 3-8% faster at contexts of 512-768 positions, 7-19% at 1,536-1,792,
// within 1% at 128-384; two sequences were slower with 16 (int4 13-22%, as its fused O's blocks hold an SM
// each; 16-bit 3-5%; int8 within 4% either way). One block where clusters don't exist.
inline int decode_cluster(int seqs) {
  static const bool clusters = device_attribute(cudaDevAttrClusterLaunch) != 0;
  return !clusters ? 1 : seqs == 1 ? kMaxDecodeCluster : 8;
}

// Whether the GPU runs `kernel` in clusters of `size` blocks (over 8: non-portable) of `smem` bytes each.
template <class K> bool clusters_fit(K kernel, int size, size_t smem) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(size);
  cfg.blockDim = dim3(kDecodeThreads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr = {};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = size;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess;
  cudaGetLastError();  // a refused size is an answer, not an error
  return ok && clusters > 0;
}

template <typename T, int HD, int G, class OP>
void attention_decode_g(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                        const DecodeAttnArgs& a, int cluster, const OP& op) {
  auto kernel = [] {
    if constexpr (std::is_same_v<OP, NoOProj>) return attention_decode_kernel<T, HD, G>;
    else return attention_decode_o_kernel<T, HD, G>;
  }();
  static size_t configured = 48 * 1024;
  auto configure = [&](int size) {  // the dynamic shared memory of clusters of `size`, allowed once
    const size_t smem = attention_decode_smem<T, HD>(G, size, !std::is_same_v<OP, NoOProj>);
    if (smem > configured) {
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      configured = smem;
    }
    return smem;
  };
  if (cluster > 8) {
    static const bool large = clusters_fit(kernel, cluster, configure(cluster));
    if (!large) cluster = 8;
  }
  const size_t smem = configure(cluster);
  launch(l, cluster, kernel, dim3(cluster, a.kv_heads, num_seqs), dim3(kDecodeThreads), smem, q, q_ld, k_cache, v_cache, out, out_ld, a, op);
}

// `cluster` (blocks per sequence and KV head, a power of two up to kMaxDecodeCluster) is the device's
// choice (decode_cluster) unless a test picks one. With an AttnOProj (attention_o_fits for that size) `out`
// is unused.
template <typename T, int HD, class OP = NoOProj>
void attention_decode(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                      const DecodeAttnArgs& a, int cluster = 0, const OP& op = {}) {
  if (!cluster) cluster = decode_cluster(num_seqs);
  auto run = [&](auto group) {
    constexpr int G = decltype(group)::value;
    if constexpr (std::is_same_v<OP, NoOProj> || attn_o_columns(G * HD)) attention_decode_g<T, HD, G>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster, op);
    else throw CudaError("decode attention: the O projection is fused in only for whole int4 steps per KV head (attention_o_fits)");
  };
  switch (a.heads / a.kv_heads) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    case 16: return run(std::integral_constant<int, 16>{});
    case 32: return run(std::integral_constant<int, 32>{});
  }
  throw CudaError("decode attention: " + std::to_string(a.heads / a.kv_heads) + " query heads per KV head (1, 2, 4, 8, 16 or 32 are built)");
}

}  // namespace decima
