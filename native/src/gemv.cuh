// Decode-time matrix products for a few activation rows: y[b][r] = sum_k W[r][k] x[b][k].
//
// Bytes: every weight once (rows x cols x its storage size: 2 for fp16/bf16, 1 for int8, 1/2 for int4,
// plus scales); FLOPs: 2 x rows x cols x batch. Far under any compute limit: what counts is keeping
// enough weight loads in flight. A block owns tiles of 16 rows (two groups of 8 that an epilogue pairs);
// each warp streams one row of each group over the full width (or, in products with few tiles, over its
// column split's part) with lane-strided 16-byte loads (an instruction reads 512 contiguous bytes), P loads
// deep per row, the first ones issued before waiting for the previous kernel (PDL); sums by shuffles. The
// grid is persistent: a block builds its activations once in shared memory (the prologue: a plain copy, or
// the RMSNorm of the fp32 residual stream), then walks tiles. Quantized weights are dequantized in registers as they stream
// (the formats of src/model/weights.ts); int8 from two rows on, and int4 in groups of 128 columns or more,
// go to a tensor-core kernel instead (gemv_mma_kernel, below). Larger batches go to cuBLASLt (faster there, measured with
// bench/gemv-kernels.ts and `decima bench`).
#pragma once
#include "common.cuh"

namespace decima {

constexpr int kGemvWarps = 8;  // per column split
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvMaxSplits = 2;
constexpr int kGemvMaxBatch = 2;     // rows of the CUDA-core kernel
constexpr int kGemvMmaMaxBatch = 8;  // rows of the tensor-core kernel: the n of an mma
constexpr int kGemvPad = 32;  // shared-memory row padding (elements)

__device__ __forceinline__ uint4 load_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// ---- prologues: fill xs[b][L::at(k)] (rows of `stride` elements; rows at or past `batch` are zero) -------
// Both issue all their loads at once (latency, not bandwidth, is what a prologue costs): the plain copy with
// asynchronous 16-byte copies straight into shared memory, the RMSNorm with a warp per row. The caller
// synchronises the block afterwards. L is where a column sits in its row: in order for the CUDA-core
// kernel, permuted for the tensor-core one (MmaLayout, below).

struct PlainLayout {
  static constexpr bool kInOrder = true;
  static constexpr int kPad = kGemvPad;
  __device__ static int at(int k) { return k; }
};

// The tensor-core kernel's B fragments (gemv_mma_kernel): each 8-column chunk stored as columns
// 0 4 1 5 2 6 3 7, so that a fragment's columns (s, s + 4, s + 1, s + 5) are one 8-byte read; the four
// chunks a lane reads in turn have bit 1 of their index flipped in the lanes of t = 2, 3 (c ^ (c >> 2 & 2)),
// so that the four lanes of a row (t = 0..3, 64 bytes apart) read four different bank groups; and rows are
// one 16-byte chunk longer, so that two batch rows' reads meet in no bank either.
struct MmaLayout {
  static constexpr bool kInOrder = false;
  static constexpr int kPad = 8;
  __device__ static int at(int k) {
    const int c = k >> 3, j = k & 7;
    return ((c ^ ((c >> 2) & 2)) << 3) | ((j & 3) << 1) | (j >> 2);
  }
  // One aligned chunk (columns 8c .. 8c + 7, stored at at(8c)) into that order.
  __device__ static uint4 permute8(const uint4& v) {
    return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
  }
};

__device__ __forceinline__ void cp_async16(void* smem, const void* global) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T> struct ProPlain {
  const T* x;  // [batch][ld]
  int ld;
  template <class L> __device__ void load(T* xs, int rows, int stride, int batch, int cols) const {
    const int vecs = stride / 8;
    for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
      const int b = i / vecs, c = i % vecs;
      const bool in = b < batch && c * 8 < cols;
      if constexpr (L::kInOrder) {
        T* dst = xs + (size_t)b * stride + c * 8;
        if (in) cp_async16(dst, x + (size_t)b * ld + c * 8);
        else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      } else {  // through registers, to permute
        const uint4 v = in ? *reinterpret_cast<const uint4*>(x + (size_t)b * ld + c * 8) : make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(xs + (size_t)b * stride + L::at(c * 8)) = L::permute8(v);
      }
    }
    if constexpr (L::kInOrder) cp_async_wait_all();
  }
};

// Llama's RMSNorm of the fp32 residual stream, rounded once to T: x * rsqrt(mean(x^2) + eps) * gain. Every
// thread takes a slice of every row, so the loads of all rows leave together and one barrier joins the sums.
template <typename T> struct ProRmsNorm {
  const float* resid;  // [batch][ld]
  int ld;
  const T* gain;
  float eps;
  float* copy = nullptr;  // [batch][ld]: where given, the grid's blocks copy resid there, a share each
  template <class L> __device__ void load(T* xs, int rows, int stride, int batch, int cols) const {
    if (copy)
      for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < batch * cols; i += gridDim.x * blockDim.x)
        copy[(size_t)(i / cols) * ld + i % cols] = resid[(size_t)(i / cols) * ld + i % cols];
    __shared__ float part[kGemvWarps * kGemvMaxSplits][kGemvMmaMaxBatch];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = min(rows, batch);
    for (int b = 0; b < n; b++) {
      const float* r = resid + (size_t)b * ld;
      float ss = 0.f;
      for (int k = threadIdx.x * 4; k < cols; k += blockDim.x * 4) {
        const float4 v = *reinterpret_cast<const float4*>(r + k);
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
      ss = warp_sum(ss);
      if (lane == 0) part[warp][b] = ss;
    }
    __syncthreads();
    for (int b = 0; b < rows; b++) {
      T* dst = xs + (size_t)b * stride;
      if (b >= n) {
        for (int k = threadIdx.x; k < stride; k += blockDim.x) dst[L::at(k)] = from_float<T>(0.f);
        continue;
      }
      float ss = 0.f;
#pragma unroll
      for (int w = 0; w < (int)(blockDim.x >> 5); w++) ss += part[w][b];
      const float rstd = rsqrtf(ss / cols + eps);
      const float* r = resid + (size_t)b * ld;
      for (int k = threadIdx.x * 4; k < stride; k += blockDim.x * 4) {
        if (k >= cols) {
#pragma unroll
          for (int e = 0; e < 4; e++) dst[L::at(k + e)] = from_float<T>(0.f);
          continue;
        }
        const float4 v = *reinterpret_cast<const float4*>(r + k);
        const float f[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; e++) dst[L::at(k + e)] = from_float<T>(f[e] * rstd * to_float(gain[k + e]));
      }
    }
  }
};

// ---- weight formats: how 16 bytes of a row become values ----------------------------------------------
// `load` fetches a row's 16-byte vector v with what it needs beside it (its scale), as a Vec; `dot` adds
// the products of a warp's two rows' vectors v with x (batch rows of shared memory) into their
// accumulators, each x read and converted once for both rows. Quantized values become floats by exponent
// tricks, not by the int-to-float unit, which runs at a quarter of the FMA rate and would need one
// conversion per weight (the change took the batch-1 step from 1.158 to 1.091 ms with int8 and from
// 1.136 to 0.984 ms with int4, BENCHMARKS.md).

template <typename T> struct DenseW {
  static constexpr int kQuant = 0;   // model.h's Quant
  static constexpr int kPerVec = 8;  // values per 16 bytes
  using Vec = uint4;
  const T* w;
  int cols;
  __device__ Vec load(int row, int v) const { return load_stream(w + (size_t)row * cols + v * kPerVec); }
  DenseW from_row(int r) const { return {w + (size_t)r * cols, cols}; }
  template <int B>
  __device__ void dot(const Vec& lo, const Vec& hi, int v, const T* xs, int stride, float (&acc_lo)[B], float (&acc_hi)[B]) const {
    float wl[8], wh[8];
    unpack8(lo, wl, T());
    unpack8(hi, wh, T());
#pragma unroll
    for (int b = 0; b < B; b++) {
      float x[8];
      unpack8(*reinterpret_cast<const uint4*>(xs + (size_t)b * stride + v * kPerVec), x, T());
#pragma unroll
      for (int e = 0; e < 8; e++) {
        acc_lo[b] = fmaf(wl[e], x[e], acc_lo[b]);
        acc_hi[b] = fmaf(wh[e], x[e], acc_hi[b]);
      }
    }
  }
  __device__ void values(const Vec& q, float (&out)[kPerVec]) const { unpack8(q, out, T()); }
};

// Four int8 values: each byte, offset to unsigned, becomes the low mantissa byte of 2^23 (a byte permute),
// and one subtraction of 2^23 + 128 leaves the value, exactly.
__device__ __forceinline__ void s8x4_to_float(uint32_t w, float* out) {
  const uint32_t u = w ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; i++) out[i] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540 | i)) - 8388736.f;
}

// Eight int4 values stored as q + 8, column 2j in byte j's low nibble: two nibbles at a time OR'ed into
// the mantissas of fp16 1024s give 1024 + q + 8 exactly, and one packed subtraction of 1032 leaves q.
__device__ __forceinline__ void s4x8_to_float(uint32_t w, float* out) {
  const half2 bias = __half2half2(__ushort_as_half(0x6408));  // 1032
#pragma unroll
  for (int s = 0; s < 4; s++) {
    const uint32_t bits = ((w >> (4 * s)) & 0x000F000Fu) | 0x64006400u;  // columns s and 4 + s
    const float2 f = __half22float2(__hsub2(*reinterpret_cast<const half2*>(&bits), bias));
    out[s] = f.x;
    out[4 + s] = f.y;
  }
}

// Word h of a vector, h known only at run time, without an array in local memory.
__device__ __forceinline__ uint32_t word(const uint4& q, int h) { return h < 2 ? (h ? q.y : q.x) : (h == 2 ? q.z : q.w); }

// What the quantized formats share: a vector travels with its scale (an L1 hit after the first of its
// row or group, and no tile ends waiting on a load of it); its N values, made floats eight at a time by the
// format's to_float8 (so that only eight are live: two batch rows of int4 took 171 registers converting all
// 32 at once, one block per SM), are dotted with x and scaled once. A vector's x is N / 8 chunks of 16
// bytes, and neighbouring lanes' vectors are N x 2 bytes apart in shared memory: taken in the same order,
// the eight lanes of a 16-byte load's phase would meet on N / 16 bank groups (int4: 4-way conflicts). With
// two batch rows each lane starts at chunk lane x (N / 8) / 8 instead, so a phase reads eight distinct
// groups (int4 two-row gate/up 22.4 to 13.9 µs); one row reads half as much and lost more to the rotation's
// arithmetic than it gained (int8 step 1.03 to 1.06 ms), so it keeps the plain order.
template <typename T, class F, int N> struct ScaledW {
  static constexpr int kPerVec = N;  // values per 16 bytes
  struct Vec {
    uint4 q;
    float scale;
  };
  template <int B>
  __device__ void dot(const Vec& lo, const Vec& hi, int v, const T* xs, int stride, float (&acc_lo)[B], float (&acc_hi)[B]) const {
    float part_lo[B], part_hi[B];
#pragma unroll
    for (int b = 0; b < B; b++) part_lo[b] = part_hi[b] = 0.f;
#pragma unroll
    for (int i = 0; i < N / 8; i++) {
      const int h = B > 1 ? (i + ((threadIdx.x & 31) * (N / 8) >> 3)) % (N / 8) : i;
      float wl[8], wh[8];
      F::to_float8(lo.q, h, wl);
      F::to_float8(hi.q, h, wh);
#pragma unroll
      for (int b = 0; b < B; b++) {
        float x[8];
        unpack8(*reinterpret_cast<const uint4*>(xs + (size_t)b * stride + v * N + h * 8), x, T());
#pragma unroll
        for (int e = 0; e < 8; e++) {
          part_lo[b] = fmaf(wl[e], x[e], part_lo[b]);
          part_hi[b] = fmaf(wh[e], x[e], part_hi[b]);
        }
      }
    }
#pragma unroll
    for (int b = 0; b < B; b++) {
      acc_lo[b] = fmaf(part_lo[b], lo.scale, acc_lo[b]);
      acc_hi[b] = fmaf(part_hi[b], hi.scale, acc_hi[b]);
    }
  }
  __device__ void values(const Vec& w, float (&out)[N]) const {
#pragma unroll
    for (int h = 0; h < N / 8; h++) F::to_float8(w.q, h, out + 8 * h);
#pragma unroll
    for (int e = 0; e < N; e++) out[e] *= w.scale;
  }
};

// W8A16: int8 values, a scale per row.
template <typename T> struct Int8W : ScaledW<T, Int8W<T>, 16> {
  using Vec = typename ScaledW<T, Int8W<T>, 16>::Vec;
  static constexpr int kQuant = 1;
  const int8_t* q;
  const half* scales;  // [rows]
  int cols;
  static Int8W make(const int8_t* q, const half* scales, int cols) { return {{}, q, scales, cols}; }
  Int8W from_row(int r) const { return make(q + (size_t)r * cols, scales + r, cols); }
  int group() const { return 0; }
  // Where a row's 16-byte vector v and its scale are.
  __device__ const int8_t* vec(int row, int v) const { return q + (size_t)row * cols + v * 16; }
  __device__ const half* scale(int row, int) const { return scales + row; }
  __device__ Vec load(int row, int v) const { return {load_stream(vec(row, v)), __half2float(*scale(row, v))}; }
  // Values 8h .. 8h + 7 of the vector.
  static __device__ void to_float8(const uint4& q, int h, float* out) {
    s8x4_to_float(h ? q.z : q.x, out);
    s8x4_to_float(h ? q.w : q.y, out + 4);
  }
};

// W4A16: int4 values stored as q + 8 (column 2j in the low nibble), a scale per row and group of columns.
// A 16-byte vector (32 columns) lies inside one group; groups are 32 x a power of two columns, so a
// vector's group is a shift away.
template <typename T> struct Int4W : ScaledW<T, Int4W<T>, 32> {
  using Vec = typename ScaledW<T, Int4W<T>, 32>::Vec;
  static constexpr int kQuant = 2;
  const uint8_t* q;
  const half* scales;  // [rows][groups]
  int cols, groups, group_shift;
  static Int4W make(const uint8_t* q, const half* scales, int cols, int group) {
    int shift = 0;
    while ((32 << shift) < group) shift++;
    if ((32 << shift) != group) throw CudaError("int4: group size " + std::to_string(group) + " is not 32 x a power of two");
    return {{}, q, scales, cols, cols / group, shift};
  }
  Int4W from_row(int r) const { return {{}, q + (size_t)r * (cols / 2), scales + (size_t)r * groups, cols, groups, group_shift}; }
  int group() const { return 32 << group_shift; }
  // Where a row's 16-byte vector v and its scale are.
  __device__ const uint8_t* vec(int row, int v) const { return q + (size_t)row * (cols / 2) + v * 16; }
  __device__ const half* scale(int row, int v) const { return scales + (size_t)row * groups + (v >> group_shift); }
  __device__ Vec load(int row, int v) const { return {load_stream(vec(row, v)), __half2float(*scale(row, v))}; }
  // Values 8h .. 8h + 7 of the vector.
  static __device__ void to_float8(const uint4& q, int h, float* out) { s4x8_to_float(word(q, h), out); }
};

// A linear layer's weights as the format coded `quant` reads them (0: 16-bit, 1: int8, 2: int4, as
// model.h's Quant; `scales` and `group` unused where the format has none): f(format).
template <typename T, class F>
void with_weight_format(int quant, const void* data, const half* scales, int cols, int group, F&& f) {
  switch (quant) {
    case 0: return f(DenseW<T>{static_cast<const T*>(data), cols});
    case 1: return f(Int8W<T>::make(static_cast<const int8_t*>(data), scales, cols));
    case 2: return f(Int4W<T>::make(static_cast<const uint8_t*>(data), scales, cols, group));
  }
  throw CudaError("unknown weight format " + std::to_string(quant));
}

// Quantized weights as T, for the cuBLASLt path (prefill, larger batches): one 16-byte vector per thread.
// Bytes: the quantized matrix read once, rows x cols x 2 written (then read again by the product).
template <typename T, class W> __global__ void dequantize_kernel(W w, int rows, T* __restrict__ out) {
  pdl_launch_dependents();
  pdl_wait();
  const int vecs = w.cols / W::kPerVec;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)rows * vecs; i += (size_t)gridDim.x * blockDim.x) {
    const int row = (int)(i / vecs), v = (int)(i % vecs);
    float f[W::kPerVec];
    w.values(w.load(row, v), f);
#pragma unroll
    for (int c = 0; c < W::kPerVec / 8; c++)
      *reinterpret_cast<uint4*>(out + (size_t)row * w.cols + v * W::kPerVec + c * 8) = pack8<T>(f + c * 8);
  }
}

// ---- epilogues -------------------------------------------------------------------------------------------
// A block's 16 rows are two groups of 8, starting at rows `lo` and `hi`; lane-level results arrive as
// (i, b, v_lo, v_hi): rows lo + i and hi + i, batch row b. Pairing the groups puts a RoPE pair, or a gate
// row and its up row, in the same thread.

struct TileRows {
  int lo, hi;
};

// 16 consecutive rows per block.
struct RowsLinear {
  int rows;
  __device__ TileRows tile(int block) const { return {block * 16, block * 16 + 8}; }
  static int tiles(int rows) { return ceil_div(rows, 16); }
  __device__ bool valid(int row) const { return row < rows; }
};

// residual[b][r] += y: the O and down projections add straight into the fp32 residual stream. Both reads
// leave before either write (one memory round trip, not two). With `copy`, the sums go there too (same
// ld): the fused MLP (gemv_mlp.cuh) normalises the copy while its additions land in the stream.
struct EpiResidual : RowsLinear {
  float* resid;
  int ld;
  float* copy;
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    const size_t at = (size_t)b * ld;
    float* r = resid + at;
    const bool has_lo = valid(t.lo + i), has_hi = valid(t.hi + i);
    const float new_lo = (has_lo ? r[t.lo + i] : 0.f) + lo, new_hi = (has_hi ? r[t.hi + i] : 0.f) + hi;
    if (has_lo) r[t.lo + i] = new_lo;
    if (has_hi) r[t.hi + i] = new_hi;
    if (copy) {
      if (has_lo) copy[at + t.lo + i] = new_lo;
      if (has_hi) copy[at + t.hi + i] = new_hi;
    }
  }
};

// fp32 logits for the sampler.
struct EpiLogits : RowsLinear {
  float* out;
  int ld;
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (valid(t.lo + i)) out[(size_t)b * ld + t.lo + i] = lo;
    if (valid(t.hi + i)) out[(size_t)b * ld + t.hi + i] = hi;
  }
};

// Plain T output (tests).
template <typename T> struct EpiStore : RowsLinear {
  T* out;
  int ld;
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (valid(t.lo + i)) out[(size_t)b * ld + t.lo + i] = from_float<T>(lo);
    if (valid(t.hi + i)) out[(size_t)b * ld + t.hi + i] = from_float<T>(hi);
  }
};

// Gate/up packed as [gate; up]: a block takes gate rows i..i+7 and their up rows, writes silu(g) x u.
template <typename T> struct EpiSiluMul {
  int inter;
  T* out;
  int ld;
  __device__ TileRows tile(int block) const { return {block * 8, inter + block * 8}; }
  static int tiles(int inter) { return ceil_div(inter, 8); }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    if (t.lo + i >= inter) return;
    const float g = round_to<T>(lo), u = round_to<T>(hi);
    out[(size_t)b * ld + t.lo + i] = from_float<T>(g / (1.f + __expf(-g)) * u);
  }
};

// Where a token's K and V go: slot = block * block_size + offset; cache layout [block][kv_head][offset][HD].
__device__ __forceinline__ size_t kv_index(int slot, int kv_head, int kv_heads, int block_size, int hd) {
  const int block = slot / block_size, off = slot % block_size;
  return (((size_t)block * kv_heads + kv_head) * block_size + off) * hd;
}

// Rotary embedding as Hugging Face's Llama applies it (rotate_half): element p pairs with p + HD/2.
// `table` holds (cos, sin) per position and frequency, [max_pos][HD/2].
struct RopeArgs {
  const float2* table;
  const int* positions;  // per token
  const int* slots;      // per token: where its K/V go
};

// Fused Q/K/V: rows are [Q heads | K heads | V heads] x HD. A block takes 8 rotation pairs (p, p + HD/2) of
// one head, so RoPE is applied before anything is written; K and V go straight into the paged cache.
template <typename T> struct EpiQkvRope {
  int hd, heads, kv_heads, block_size;
  T* q;  // [batch][q_ld]
  int q_ld;
  T* k_cache;
  T* v_cache;
  RopeArgs rope;
  __device__ TileRows tile(int block) const {
    const int per_head = hd / 16, head = block / per_head, p = (block % per_head) * 8;
    return {head * hd + p, head * hd + p + hd / 2};
  }
  static int tiles(int hd, int heads, int kv_heads) { return (heads + 2 * kv_heads) * (hd / 16); }
  __device__ void store(const TileRows& t, int i, int b, float lo, float hi) const {
    const int head = t.lo / hd, p = t.lo % hd + i;
    float x1 = round_to<T>(lo), x2 = round_to<T>(hi);
    if (head < heads + kv_heads) {  // Q and K rotate; V does not
      const float2 cs = rope.table[(size_t)rope.positions[b] * (hd / 2) + p];
      const float y1 = x1 * cs.x - x2 * cs.y, y2 = x2 * cs.x + x1 * cs.y;
      x1 = y1;
      x2 = y2;
    }
    T* dst;
    if (head < heads) {
      dst = q + (size_t)b * q_ld + head * hd + p;
    } else {
      const bool is_k = head < heads + kv_heads;
      const int g = is_k ? head - heads : head - heads - kv_heads;
      dst = (is_k ? k_cache : v_cache) + kv_index(rope.slots[b], g, kv_heads, block_size, hd) + p;
    }
    dst[0] = from_float<T>(x1);
    dst[hd / 2] = from_float<T>(x2);
  }
};

// ---- the kernel ------------------------------------------------------------------------------------------

__device__ __forceinline__ void named_barrier(int id, int threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }

// S column splits: S groups of kGemvWarps warps, group s taking the s-th part of every row's columns; at a
// tile's end the other groups' sums meet group 0's in shared memory, added in a fixed order.
template <typename T, int B, int P, int S, class W, class Pro, class Epi>
__global__ void __launch_bounds__(kGemvThreads * S) gemv_kernel(W w, int rows, int cols, int batch, int tiles, Pro pro, Epi epi) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int stride = cols + PlainLayout::kPad;
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int warp = (threadIdx.x >> 5) % kGemvWarps, split = threadIdx.x / kGemvThreads, lane = threadIdx.x & 31;
  const int chunk = ceil_div(cols / W::kPerVec, S);                      // 16-byte vectors per row and split
  const int v0 = split * chunk, vecs = min(cols / W::kPerVec - v0, chunk);  // this split's: v0 .. v0 + vecs
  const int per_tile = ceil_div(vecs, 32);      // per lane
  const int my_tiles = blockIdx.x < tiles ? ceil_div(tiles - blockIdx.x, gridDim.x) : 0;
  const int items = my_tiles * per_tile;
  // Loads run P items ahead of use; an item is vector v0 + lane + 32k of the warp's two rows in the block's
  // n-th tile (blockIdx.x + n x gridDim.x), both walked by counters. (Dividing the item's index by
  // per_tile instead, twice per item, cost issue slots the quantized formats need: alone, int8 at one row,
  // LM head 37.6 to 31.8 µs and gate/up 13.2 to 9.6; 16-bit LM head 52.6 to 49.4; BENCHMARKS.md.)
  using Vec = typename W::Vec;
  int load_n = 0, load_k = 0;
  TileRows load_rows = epi.tile(blockIdx.x);
  auto load = [&](Vec& lo, Vec& hi) {
    lo = hi = Vec{};
    if (load_n >= my_tiles) return;
    const int v = lane + load_k * 32;
    if (v < vecs) {
      if (load_rows.lo + warp < rows) lo = w.load(load_rows.lo + warp, v0 + v);
      if (load_rows.hi + warp < rows) hi = w.load(load_rows.hi + warp, v0 + v);
    }
    if (++load_k == per_tile) load_k = 0, load_rows = epi.tile(blockIdx.x + ++load_n * gridDim.x);
  };

  // The weights depend on nothing earlier in the step: start streaming them before waiting.
  Vec w_lo[P], w_hi[P];
#pragma unroll
  for (int u = 0; u < P; u++) load(w_lo[u], w_hi[u]);
  pdl_launch_dependents();
  pdl_wait();
  pro.template load<PlainLayout>(xs, B, stride, batch, cols);
  __syncthreads();

  float acc_lo[B], acc_hi[B];
#pragma unroll
  for (int b = 0; b < B; b++) acc_lo[b] = acc_hi[b] = 0.f;
  int n = 0, k = 0;  // the item in use: tile n, vector slot k
  for (int j0 = 0; j0 < items; j0 += P) {
#pragma unroll
    for (int u = 0; u < P; u++) {
      if (j0 + u >= items) break;
      const int v = lane + k * 32;
      if (v < vecs) w.template dot<B>(w_lo[u], w_hi[u], v0 + v, xs, stride, acc_lo, acc_hi);
      load(w_lo[u], w_hi[u]);
      if (++k == per_tile) {  // the tile's rows are done: sum over the warp
        const TileRows t = epi.tile(blockIdx.x + n * gridDim.x);
        k = 0;
        n++;
        // Every lane gets the sums; lane b stores batch row b, so the rows' stores (read-modify-writes
        // for the residual) go out together instead of one after another.
        float lo = 0.f, hi = 0.f;
#pragma unroll
        for (int b = 0; b < B; b++) {
          const float s_lo = warp_sum(acc_lo[b]), s_hi = warp_sum(acc_hi[b]);
          if (lane == b) lo = s_lo, hi = s_hi;
          acc_lo[b] = acc_hi[b] = 0.f;
        }
        if constexpr (S == 1) {
          if (lane < batch) epi.store(t, warp, lane, lo, hi);
        } else {
          __shared__ float2 split_sums[S - 1][kGemvWarps][kGemvMaxBatch];
          if (split > 0 && lane < batch) split_sums[split - 1][warp][lane] = make_float2(lo, hi);
          named_barrier(1 + warp, 32 * S);  // the warps of this row pair, one per split
          if (split == 0 && lane < batch) {
#pragma unroll
            for (int g = 0; g < S - 1; g++) {
              lo += split_sums[g][warp][lane].x;
              hi += split_sums[g][warp][lane].y;
            }
            epi.store(t, warp, lane, lo, hi);
          }
          named_barrier(1 + warp, 32 * S);  // read before the next tile's sums overwrite them
        }
      }
    }
  }
}

// ---- quantized weights on the tensor cores ---------------------------------------------------------------
// The CUDA-core kernel above is bound by instruction issue on int4 (Nsight Compute, 1B gate/up at one row:
// 62% of issue slots busy with the memory 22% busy, about 6.7M warp instructions), and each batch row past
// the first adds its arithmetic again. Here mma.sync m16n8k16 (fp32 accumulators) does the multiply-adds: A
// is 16 weight rows x 16 columns, B the same 16 columns of up to 8 batch rows (lane g supplies batch row g;
// rows past the batch repeat the last one, and their sums are dropped), so eight rows cost what one does.
// Lane (g = lane / 4, t = lane % 4) streams the 16-byte vectors 4u + t of the tile's rows g and g + 8
// (TileRows lo + g and hi + g): a warp reads 16 rows x 64 bytes per step, a step being 128 columns of int4
// (one group of scales) or 64 of int8. The 16 k slots of an mma need not be consecutive columns, only the
// same columns in A and B: each format takes its columns in the order its bytes unpack (MmaInt4, MmaInt8)
// and stores x in that order. Measured steps (BENCHMARKS.md): int4 at one row unchanged within the runs'
// spread, two 0.94 to 0.77 ms; four and eight 3.0 to 1.2 and 1.5 ms; int8 at two 1.01 to 0.96 ms, four and
// eight 2.6 to 1.13 and 1.39 ms (cuBLASLt on weights dequantized every step before).

// A T pair holding 1024 (half) or 128 (bfloat16), the powers of two whose last mantissa bit weighs 1, in
// both halves, and that plus 8: OR-ing a nibble into the first and subtracting the second leaves its q.
template <typename T> struct Nibble;
template <> struct Nibble<half> {
  using Pair = half2;
  static constexpr uint32_t kOne = 0x64006400u, kBias = 0x64086408u;  // 1024, 1032
};
template <> struct Nibble<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kOne = 0x43004300u, kBias = 0x43084308u;  // 128, 136: 7 mantissa bits hold a nibble
};

// (a & b) | c in one instruction (the compiler emits two).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Nibbles s and s + 4 of w (stored as q + 8) as the two q of a T pair.
template <typename T> __device__ __forceinline__ uint32_t s4x2(uint32_t w, int s) {
  using P = typename Nibble<T>::Pair;
  const uint32_t biased = and_or(w >> (4 * s), 0x000F000Fu, Nibble<T>::kOne), bias = Nibble<T>::kBias;
  const P q = __hsub2(*reinterpret_cast<const P*>(&biased), *reinterpret_cast<const P*>(&bias));
  return *reinterpret_cast<const uint32_t*>(&q);
}

// Bytes 2p and 2p + 1 of w (int8) as a T pair, exactly: half by the exponent trick (1024 + the byte
// offset to unsigned, less 1152); bfloat16's 7 mantissa bits cannot hold a byte, so through fp32.
template <typename T> __device__ __forceinline__ uint32_t s8x2(uint32_t w, int p) {
  if constexpr (std::is_same_v<T, half>) {
    const uint32_t biased = __byte_perm(w ^ 0x80808080u, 0x64646464u, p ? 0x4342 : 0x4140), bias = 0x64806480u;
    const half2 q = __hsub2(*reinterpret_cast<const half2*>(&biased), *reinterpret_cast<const half2*>(&bias));
    return *reinterpret_cast<const uint32_t*>(&q);
  } else {
    float f[4];
    s8x4_to_float(w, f);
    const __nv_bfloat162 q = __floats2bfloat162_rn(f[2 * p], f[2 * p + 1]);
    return *reinterpret_cast<const uint32_t*>(&q);
  }
}

// c += A B for one m16n8k16 tile of T operands, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, half>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A step of int4: the exponent trick of s4x2 puts nibbles s and s + 4 of a 32-bit word (columns s and
// s + 4) in the two halves of an A register, k slots 2t and 2t + 1; nibbles s + 1 and s + 5 fill k slots
// 2t + 8 and 2t + 9; MmaLayout stores x in that order. Eight mma, as two chains of four.
template <typename T> struct MmaInt4 {
  using Layout = MmaLayout;
  static constexpr int kStep = 128;  // columns
  __device__ static void step(float (&c)[2][4], const uint4& qlo, const uint4& qhi, const T* xc, int t) {
    const uint32_t lo[4] = {qlo.x, qlo.y, qlo.z, qlo.w}, hi[4] = {qhi.x, qhi.y, qhi.z, qhi.w};
    const int flip = t & 2;
#pragma unroll
    for (int h = 0; h < 4; h++) {
      const uint4 x = *reinterpret_cast<const uint4*>(xc + ((h ^ flip) << 3));
      mma16816<T>(c[h & 1], s4x2<T>(lo[h], 0), s4x2<T>(hi[h], 0), s4x2<T>(lo[h], 1), s4x2<T>(hi[h], 1), x.x, x.y);
      mma16816<T>(c[h & 1], s4x2<T>(lo[h], 2), s4x2<T>(hi[h], 2), s4x2<T>(lo[h], 3), s4x2<T>(hi[h], 3), x.z, x.w);
    }
  }
};

// x in column order, rows one 16-byte chunk longer: a row's four lanes read 32 contiguous bytes each, and
// the next batch row's reads start 16 bytes further round the banks.
struct MmaInOrderLayout : PlainLayout {
  static constexpr int kPad = 8;
};

// A step of int8: lane t's vector is columns 16t .. 16t + 15 of the step, and word m of it (columns
// 16t + 4m .. + 3) fills k slots 2t, 2t + 1 (bytes 0, 1) and 2t + 8, 2t + 9 (bytes 2, 3) of the m-th mma;
// its B registers are then x's columns in order, 8 bytes at 16t + 4m. Four mma, as two chains of two.
template <typename T> struct MmaInt8 {
  using Layout = MmaInOrderLayout;
  static constexpr int kStep = 64;
  __device__ static void step(float (&c)[2][4], const uint4& qlo, const uint4& qhi, const T* xc, int) {
    const uint32_t lo[4] = {qlo.x, qlo.y, qlo.z, qlo.w}, hi[4] = {qhi.x, qhi.y, qhi.z, qhi.w};
    const uint4 x0 = *reinterpret_cast<const uint4*>(xc), x1 = *reinterpret_cast<const uint4*>(xc + 8);
    const uint32_t x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int m = 0; m < 4; m++) mma16816<T>(c[m & 1], s8x2<T>(lo[m], 0), s8x2<T>(hi[m], 0), s8x2<T>(lo[m], 1), s8x2<T>(hi[m], 1), x[2 * m], x[2 * m + 1]);
  }
};

template <class W> struct MmaOf;
template <typename T> struct MmaOf<Int4W<T>> { using type = MmaInt4<T>; };
template <typename T> struct MmaOf<Int8W<T>> { using type = MmaInt8<T>; };

// A lane's part of a step of two weight rows, lo and hi (A's rows g and g + 8): the vector v of each with
// its scale. Rows at or past `rows` read as zeros.
struct MmaItem {
  uint4 lo, hi;
  float s_lo, s_hi;
};
template <class F> __device__ __forceinline__ MmaItem mma_item(const F& w, int lo, int hi, int v, int rows) {
  MmaItem it{};
  if (lo < rows) it.lo = load_stream(w.vec(lo, v)), it.s_lo = __half2float(*w.scale(lo, v));
  if (hi < rows) it.hi = load_stream(w.vec(hi, v)), it.s_hi = __half2float(*w.scale(hi, v));
  return it;
}

// acc += the step's products with x (the lane's quarter of the step at xc), each row's scaled once. Lane
// (g, t) holds rows g and g + 8 (acc 0-1 and 2-3) of batch rows 2t and 2t + 1.
template <class M, typename T> __device__ __forceinline__ void mma_accumulate(float (&acc)[4], const MmaItem& it, const T* xc, int t) {
  float c[2][4] = {};
  M::step(c, it.lo, it.hi, xc, t);
  acc[0] = fmaf(c[0][0] + c[1][0], it.s_lo, acc[0]);
  acc[1] = fmaf(c[0][1] + c[1][1], it.s_lo, acc[1]);
  acc[2] = fmaf(c[0][2] + c[1][2], it.s_hi, acc[2]);
  acc[3] = fmaf(c[0][3] + c[1][3], it.s_hi, acc[3]);
}

// W warps per block split a tile's steps (16 where there are no more tiles than SMs, as in the O and down
// products, so that an SM has more loads in flight than one block of 8 warps), and add their sums in a
// fixed order.
template <typename T, int P, int W, class F, class Pro, class Epi>
__global__ void __launch_bounds__(W * 32) gemv_mma_kernel(F w, int rows, int cols, int batch, int tiles, Pro pro, Epi epi) {
  using M = typename MmaOf<F>::type;
  using L = typename M::Layout;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float4 sums[W][32];  // a warp's tile sums: lane (g, t) rows g and g + 8 of batch rows 2t, 2t + 1
  const int stride = cols + L::kPad;
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int steps = cols / M::kStep, per_tile = ceil_div(steps, W);  // a warp's steps per tile
  const int my_tiles = blockIdx.x < tiles ? ceil_div(tiles - blockIdx.x, gridDim.x) : 0;
  // Loads run P items ahead of use; an item is the warp's k-th step (warp + k x W) of its block's n-th tile
  // (blockIdx.x + n x gridDim.x), both walked by counters.
  int load_n = 0, load_k = 0;
  TileRows load_rows = epi.tile(blockIdx.x);
  auto load = [&](MmaItem& it) {
    it = MmaItem{};
    if (load_n >= my_tiles) return;
    const int step = warp + load_k * W;
    if (step < steps) it = mma_item(w, load_rows.lo + g, load_rows.hi + g, step * 4 + t, rows);
    if (++load_k == per_tile) load_k = 0, load_rows = epi.tile(blockIdx.x + ++load_n * gridDim.x);
  };

  MmaItem buf[P];
#pragma unroll
  for (int u = 0; u < P; u++) load(buf[u]);
  pdl_launch_dependents();
  pdl_wait();
  pro.template load<L>(xs, batch, stride, batch, cols);
  __syncthreads();

  // The lane's x: batch row g (or the last), its quarter of a step.
  const T* xrow = xs + (size_t)min(g, batch - 1) * stride + t * (M::kStep / 4);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const int items = my_tiles * per_tile;
  int n = 0, k = 0;  // the item in use: tile n, step slot k
  for (int j0 = 0; j0 < items; j0 += P) {
#pragma unroll
    for (int u = 0; u < P; u++) {
      if (j0 + u >= items) break;
      const int step = warp + k * W;
      if (step < steps) mma_accumulate<M>(acc, buf[u], xrow + step * M::kStep, t);
      load(buf[u]);
      if (++k == per_tile) {  // the tile's steps are done: add the warps' sums
        if (2 * t < batch) sums[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        __syncthreads();
        if (warp == 0 && 2 * t < batch) {  // lane (g, t): rows lo + g and hi + g of batch rows 2t and 2t + 1
          float4 v = sums[0][lane];
#pragma unroll
          for (int m = 1; m < W; m++) {
            const float4 o = sums[m][lane];
            v.x += o.x, v.y += o.y, v.z += o.z, v.w += o.w;
          }
          const TileRows tr = epi.tile(blockIdx.x + n * gridDim.x);
          epi.store(tr, g, 2 * t, v.x, v.z);
          if (2 * t + 1 < batch) epi.store(tr, g, 2 * t + 1, v.y, v.w);
        }
        __syncthreads();
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        k = 0;
        n++;
      }
    }
  }
}

inline int sm_count() {
  static const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  return sms;
}

// The persistent grid: as many blocks as fit on the GPU at once; a product with no more tiles than that
// runs a block per tile.
template <typename K> int resident_blocks(K kernel, int threads, size_t smem) {
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return std::max(1, per_sm) * sm_count();
}

// Launches the persistent grid of `kernel` (blocks of `threads`, `smem` bytes of x): the caller keeps
// `configured`, per instantiation, to raise the dynamic shared-memory limit once. It starts at 0, not 48
// KB: without the attribute, a kernel's dynamic shared memory may only fill 48 KB less its static shared
// memory (the tensor-core kernel's 8 KB at 16 warps leaves four rows of 5,888 columns, 47 KB, over it).
template <class... Params, class... Args>
void launch_gemv_grid(const Launch& l, void (*kernel)(Params...), size_t& configured, int threads, size_t smem, int tiles, const Args&... args) {
  if (smem > configured) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = smem;
  }
  const int grid = std::min(tiles, resident_blocks(kernel, threads, smem));
  launch(l, kernel, dim3(grid), dim3(threads), smem, args...);
}

template <typename T, int B, int S, class W, class Pro, class Epi>
void gemv_launch(const Launch& l, const W& w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  // Loads in flight per lane. A quantized row is 2-4x shorter than a 16-bit one, so a block holds fewer
  // vectors ahead anyway; a shallower pipeline frees registers for a third block per SM (int4, 1B
  // gate/up: 124 to 80 registers; step 0.785 to 0.72 ms, int8 0.89 to 0.84 ms).
  constexpr int P = W::kPerVec >= 16 ? 4 : 8;
  static size_t configured = 0;
  const size_t smem = (size_t)B * (cols + PlainLayout::kPad) * sizeof(T);
  launch_gemv_grid(l, gemv_kernel<T, B, P, S, W, Pro, Epi>, configured, kGemvThreads * S, smem, tiles, w, rows, cols, batch, tiles, pro, epi);
}

template <typename T, int W, class F, class Pro, class Epi>
void gemv_mma_launch(const Launch& l, const F& w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  static size_t configured = 0;
  const size_t smem = (size_t)batch * (cols + MmaOf<F>::type::Layout::kPad) * sizeof(T);
  launch_gemv_grid(l, gemv_mma_kernel<T, 4, W, F, Pro, Epi>, configured, W * 32, smem, tiles, w, rows, cols, batch, tiles, pro, epi);
}

template <typename T, class F, class Pro, class Epi>
void gemv_mma(const Launch& l, const F& w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  if (tiles <= sm_count()) gemv_mma_launch<T, 2 * kGemvWarps>(l, w, rows, cols, batch, tiles, pro, epi);
  else gemv_mma_launch<T, kGemvWarps>(l, w, rows, cols, batch, tiles, pro, epi);
}

// A product with no more tiles than SMs (the 1B shape's O and down: 128 tiles of 16 rows) would give each
// SM one block of 8 warps, too few to hide its loads' latency (Nsight Compute on int4 down: 12.5%
// occupancy, 7 cycles between a warp's instructions): its columns split over two warp groups, each at
// least a warp's 32 vectors wide. (With more tiles than SMs, as QKV's 160, blocks of 16 warps take two
// rounds: measured slower, 5.2 to 6.2 µs.)
template <typename T, int B, class W, class Pro, class Epi>
void gemv_split(const Launch& l, const W& w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  constexpr int S = kGemvMaxSplits;
  if (tiles <= sm_count() && cols / W::kPerVec >= S * 32) gemv_launch<T, B, S>(l, w, rows, cols, batch, tiles, pro, epi);
  else gemv_launch<T, B, 1>(l, w, rows, cols, batch, tiles, pro, epi);
}

// Which products of `cols` columns and `batch` rows run on the tensor cores, for weights stored as `quant`
// (model.h's Quant) in groups of `group`: int4 in groups of 128 columns or more (a warp's step is one
// group), and int8 in multiples of 64 columns (a step) from two rows on (at one row the CUDA-core kernel
// is faster: int8 step 0.79-0.80 ms against 0.83, BENCHMARKS.md); up to 8 rows, an mma's n. Once the
// CUDA-core kernel walked its items by counters, int8 at two rows and int4 at one ran faster on it alone
// (most products by 5-20%), but no step did: int8 two rows unchanged, int4 one row 0.633-0.639 to
// 0.669-0.673 ms, as its fused MLP and O need the tensor-core formats.
inline bool gemv_on_tensor_cores(int quant, int group, int cols, int batch) {
  if (batch > kGemvMmaMaxBatch) return false;
  return (quant == 2 && group >= 128) || (quant == 1 && cols % 64 == 0 && batch >= 2);
}

// How many activation rows a GEMV takes: 8 on the tensor cores, else 2 (the CUDA-core kernel).
inline int gemv_max_batch(int quant, int group, int cols) { return gemv_on_tensor_cores(quant, group, cols, kGemvMmaMaxBatch) ? kGemvMmaMaxBatch : kGemvMaxBatch; }

// `rows` bounds the weight rows read; `tiles` (16 rows each) comes from the epilogue's tiling.
template <typename T, class W, class Pro, class Epi>
void gemv(const Launch& l, const W& w, int rows, int cols, int batch, int tiles, const Pro& pro, const Epi& epi) {
  if constexpr (W::kQuant != 0) {
    if (gemv_on_tensor_cores(W::kQuant, w.group(), cols, batch)) return gemv_mma<T>(l, w, rows, cols, batch, tiles, pro, epi);
  }
  if (batch == 1) gemv_split<T, 1>(l, w, rows, cols, batch, tiles, pro, epi);
  else if (batch == 2) gemv_split<T, 2>(l, w, rows, cols, batch, tiles, pro, epi);
  else throw CudaError("gemv: batch " + std::to_string(batch) + " (the GEMV kernels take 1 or 2 rows)");
}

}  // namespace decima
