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

template <typename T, int HD> size_t attention_decode_smem(int group, int cluster) {
  return sizeof(T) * 2 * (size_t)kPartition * kv_stride<HD>()                    // the K and V chunk
         + sizeof(float) * ((size_t)group * HD + (size_t)group * kPartition      // queries, scores
                            + (size_t)group * HD + 2 * (size_t)cluster * group   // partials received: sums, (max, sum)
                            + 3 * group);                                        // per head: max, sum, rescale
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

// G: query heads per KV head, a compile-time constant so that the loops over heads unroll. The cluster is
// gridDim.x blocks wide (1 to kMaxDecodeCluster).
template <typename T, int HD, int G>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            T* __restrict__ out, int out_ld, DecodeAttnArgs a) {
  static_assert(HD % 8 == 0, "16-byte rows");
  constexpr int kPairs = (G * HD / 2 + kDecodeThreads - 1) / kDecodeThreads;  // (head, dimension pair)s per thread
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);                                   // [kPartition][kv_stride]
  T* vs = ks + kPartition * kv_stride<HD>();                                // [kPartition][kv_stride]
  float* qs = reinterpret_cast<float*>(vs + kPartition * kv_stride<HD>());  // [G][HD], scaled
  float* sc = qs + G * HD;                                                  // [G][kPartition]: scores, then probabilities
  float* recv_o = sc + G * kPartition;                                      // [cluster][slice]: peers' sums for my slice
  float* recv_ml = recv_o + G * HD;                                         // [cluster][G][2]: peers' (max, sum)
  float* stats = recv_ml + 2 * gridDim.x * G;                               // [G][3]: running max, running sum, rescale

  pdl_launch_dependents();
  const int cluster = gridDim.x, rank = cluster_rank(), g = blockIdx.y, s = a.seqs[blockIdx.z];
  const int ctx = a.context_lens[s], row = a.query_starts[s], newest = ctx - 1;
  const int* table = a.block_tables + (size_t)s * a.table_width;
  const int span = ceil_div(ctx, cluster), begin = min(ctx, rank * span), end = min(ctx, begin + span);
  const int first_end = min(end, begin + kPartition);
  copy_kv<T, HD>(ks, vs, k_cache, v_cache, table, begin, min(first_end, newest), begin, a);
  pdl_wait();
  if (newest >= begin && newest < first_end) copy_kv<T, HD>(ks, vs, k_cache, v_cache, table, newest, ctx, begin, a);
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) qs[i] = to_float(q[(size_t)row * q_ld + g * G * HD + i]) * a.scale;
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
  // for a slice, and its (max, sum) per head, to the slice's owner.
  const int slice = G * HD / cluster;
#pragma unroll
  for (int k = 0; k < kPairs; k++) {
    const int i = threadIdx.x + k * kDecodeThreads;
    if (i >= G * HD / 2) break;
    const int o = 2 * i;  // h * HD + d
    *reinterpret_cast<float2*>(cluster_peer(recv_o, o / slice) + rank * slice + o % slice) = acc[k];
  }
  for (int i = threadIdx.x; i < G * cluster; i += blockDim.x) {
    const int h = i % G, owner = i / G;
    *reinterpret_cast<float2*>(cluster_peer(recv_ml, owner) + 2 * (rank * G + h)) = make_float2(stats[3 * h], stats[3 * h + 1]);
  }
  cluster_sync();

  // Merge my slice: rescale each block's sums to the largest max.
  for (int i = threadIdx.x; i < slice; i += blockDim.x) {
    const int o = rank * slice + i, h = o / HD;
    float m = -INFINITY;
    for (int j = 0; j < cluster; j++) m = fmaxf(m, recv_ml[2 * (j * G + h)]);
    float l = 0.f, sum = 0.f;
    for (int j = 0; j < cluster; j++) {
      const float w = __expf(recv_ml[2 * (j * G + h)] - m);
      l += w * recv_ml[2 * (j * G + h) + 1];
      sum += w * recv_o[j * slice + i];
    }
    out[(size_t)row * out_ld + g * G * HD + o] = from_float<T>(sum / l);
  }
}

// Blocks per cluster: enough to spread a 1B model's context over the SMs at batch 1 (4 KV heads x 8), and
// 8 is the largest size every cluster-capable GPU must schedule. One block where clusters don't exist.
inline int decode_cluster() {
  static const int size = device_attribute(cudaDevAttrClusterLaunch) ? 8 : 1;
  return size;
}

template <typename T, int HD, int G>
void attention_decode_g(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                        const DecodeAttnArgs& a, int cluster) {
  auto kernel = attention_decode_kernel<T, HD, G>;
  const size_t smem = attention_decode_smem<T, HD>(G, cluster);
  static size_t configured = 48 * 1024;
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  if (cluster > 8) CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  launch(l, cluster, kernel, dim3(cluster, a.kv_heads, num_seqs), dim3(kDecodeThreads), smem, q, q_ld, k_cache, v_cache, out, out_ld, a);
}

// `cluster` (blocks per sequence and KV head, a power of two up to kMaxDecodeCluster) is the device's
// choice unless a test picks one.
template <typename T, int HD>
void attention_decode(const Launch& l, int num_seqs, const T* q, int q_ld, const T* k_cache, const T* v_cache, T* out, int out_ld,
                      const DecodeAttnArgs& a, int cluster = decode_cluster()) {
  switch (a.heads / a.kv_heads) {
    case 1: return attention_decode_g<T, HD, 1>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster);
    case 2: return attention_decode_g<T, HD, 2>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster);
    case 4: return attention_decode_g<T, HD, 4>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster);
    case 8: return attention_decode_g<T, HD, 8>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster);
    case 16: return attention_decode_g<T, HD, 16>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster);
    case 32: return attention_decode_g<T, HD, 32>(l, num_seqs, q, q_ld, k_cache, v_cache, out, out_ld, a, cluster);
  }
  throw CudaError("decode attention: " + std::to_string(a.heads / a.kv_heads) + " query heads per KV head (1, 2, 4, 8, 16 or 32 are built)");
}

}  // namespace decima
