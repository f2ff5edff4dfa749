// Single-kernel entry points for the tests (test/cuda-kernels.test.ts), which compare each kernel with the
// CPU reference on fresh random inputs. Not part of the engine's path: the model runs whole steps.
#include <cstring>
#include <type_traits>
#include <map>
#include <string>
#include <vector>

#include "attention_decode.cuh"
#include "attention_prefill.cuh"
#include "elementwise.cuh"
#include "gemm.h"
#include "gemv.cuh"
#include "gemv_mlp.cuh"
#include "kernel_tests.h"
#include "rope_table.h"
#include "sampling.cuh"

namespace decima {
namespace {

// A device copy of a host buffer, read back on demand, freed on scope exit.
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Dev(size_t n) : bytes(n) {
    CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 16)));
    CUDA_CHECK(cudaMemset(p, 0, std::max<size_t>(n, 16)));
  }
  explicit Dev(const Bytes& host) : Dev(host.size()) {
    if (!host.empty()) CUDA_CHECK(cudaMemcpy(p, host.data(), host.size(), cudaMemcpyHostToDevice));
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  template <typename X> X* as() const { return static_cast<X*>(p); }
  Bytes read() const {
    Bytes out(bytes);
    CUDA_CHECK(cudaDeviceSynchronize());
    if (bytes) CUDA_CHECK(cudaMemcpy(out.data(), p, bytes, cudaMemcpyDeviceToHost));
    return out;
  }
};

struct Ctx {
  const BufferMap& in;
  const ParamMap& p;
  const Bytes& buf(const std::string& k) const {
    auto it = in.find(k);
    if (it == in.end()) throw CudaError("kernel test: missing input " + k);
    return it->second;
  }
  int i(const std::string& k) const {
    auto it = p.find(k);
    if (it == p.end()) throw CudaError("kernel test: missing parameter " + k);
    return (int)it->second;
  }
  float f(const std::string& k) const { return (float)p.at(k); }
};

const Launch kEager{0, false};

// The GEMV with each epilogue (mode) and prologue (norm), over weights stored as `quant` (0 dense, 1 int8,
// 2 int4 with `group`): "w" holds the values, "scales" the fp16 scales of the quantized formats.
template <typename T> BufferMap gemv_test(const Ctx& c) {
  const int rows = c.i("rows"), cols = c.i("cols"), batch = c.i("batch"), mode = c.i("mode"), quant = c.i("quant");
  Dev w(c.buf("w"));
  Dev scales(quant ? c.buf("scales") : Bytes());
  BufferMap out;
  auto run = [&](const auto& weights, const auto& pro) {
    auto go = [&](const auto& epi, int tiles) { gemv<T>(kEager, weights, rows, cols, batch, tiles, pro, epi); };
    switch (mode) {
      case 0: {  // store T
        Dev y((size_t)batch * rows * sizeof(T));
        EpiStore<T> e{};
        e.rows = rows, e.out = y.as<T>(), e.ld = rows;
        go(e, RowsLinear::tiles(rows));
        out["y"] = y.read();
        break;
      }
      case 1: {  // residual add
        Dev y(c.buf("resid_out"));
        EpiResidual e{};
        e.rows = rows, e.resid = y.as<float>(), e.ld = rows;
        go(e, RowsLinear::tiles(rows));
        out["y"] = y.read();
        break;
      }
      case 2: {  // fp32 logits
        Dev y((size_t)batch * rows * 4);
        EpiLogits e{};
        e.rows = rows, e.out = y.as<float>(), e.ld = rows;
        go(e, RowsLinear::tiles(rows));
        out["y"] = y.read();
        break;
      }
      default: {  // SiLU(gate) x up over [gate; up]
        const int inter = rows / 2;
        Dev y((size_t)batch * inter * sizeof(T));
        go(EpiSiluMul<T>{inter, y.as<T>(), inter}, EpiSiluMul<T>::tiles(inter));
        out["y"] = y.read();
      }
    }
  };
  auto with_prologue = [&](const auto& weights) {
    if (c.i("norm")) {
      Dev resid(c.buf("x")), gain(c.buf("gain"));
      run(weights, ProRmsNorm<T>{resid.as<float>(), cols, gain.as<T>(), c.f("eps")});
    } else {
      Dev x(c.buf("x"));
      run(weights, ProPlain<T>{x.as<T>(), cols});
    }
  };
  const int group = c.i("group");
  with_weight_format<T>(quant, w.p, scales.as<half>(), cols, group, with_prologue);
  if (quant) {  // the cuBLASLt path's dequantization too
    Dev dq((size_t)rows * cols * sizeof(T));
    with_weight_format<T>(quant, w.p, scales.as<half>(), cols, group, [&](const auto& wq) {
      using W = std::decay_t<decltype(wq)>;
      if constexpr (!std::is_same_v<W, DenseW<T>>) launch(kEager, dequantize_kernel<T, W>, dim3(64), dim3(256), 0, wq, rows, dq.as<T>());
    });
    out["dequantized"] = dq.read();
  }
  return out;
}

// The fused MLP (gemv_mlp.cuh) over int4 weights in groups of `group`: "x" is the fp32 residual, which the
// kernel normalises and adds into, as the model does with its copy and its stream.
template <typename T> BufferMap mlp_test(const Ctx& c) {
  const int hidden = c.i("hidden"), inter = c.i("inter"), batch = c.i("batch"), group = c.i("group");
  if (!gemv_mlp_fits(2, group, hidden, inter)) throw CudaError("kernel test: the fused MLP does not take these shapes");
  Dev wg(c.buf("w_gate_up")), sg(c.buf("scales_gate_up")), wd(c.buf("w_down")), sd(c.buf("scales_down"));
  Dev resid(c.buf("x")), gain(c.buf("gain")), y(c.buf("x"));
  const ProRmsNorm<T> pro{resid.as<float>(), hidden, gain.as<T>(), c.f("eps")};
  gemv_mlp<T>(kEager, Int4W<T>::make(wg.as<uint8_t>(), sg.as<half>(), hidden, group), Int4W<T>::make(wd.as<uint8_t>(), sd.as<half>(), inter, group),
              hidden, inter, batch, pro, y.as<float>(), hidden);
  return {{"y", y.read()}};
}

// Q/K/V with RoPE and the cache write: through the fused GEMV epilogue (fused = 1) or, on the prefill
// path, through cuBLASLt and the separate kernel.
template <typename T, int HD> BufferMap qkv_test(const Ctx& c) {
  const int heads = c.i("heads"), kv = c.i("kv_heads"), bs = c.i("block_size"), n = c.i("tokens"), hidden = c.i("hidden");
  const int rows = (heads + 2 * kv) * HD;
  Dev w(c.buf("w")), x(c.buf("x")), gain(c.buf("gain")), pos(c.buf("positions")), slots(c.buf("slots"));
  Dev kc(c.buf("k_cache")), vc(c.buf("v_cache")), q((size_t)n * heads * HD * sizeof(T));
  const std::vector<float2> table = rope_table(c.f("theta"), c.f("factor"), HD, c.i("max_pos"));
  Dev rope(table.size() * sizeof(float2));
  CUDA_CHECK(cudaMemcpy(rope.p, table.data(), rope.bytes, cudaMemcpyHostToDevice));
  const RopeArgs ra{rope.as<float2>(), pos.as<int>(), slots.as<int>()};
  const ProRmsNorm<T> pro{x.as<float>(), hidden, gain.as<T>(), c.f("eps")};
  if (c.i("fused")) {
    EpiQkvRope<T> e{HD, heads, kv, bs, q.as<T>(), heads * HD, kc.as<T>(), vc.as<T>(), ra};
    gemv<T>(kEager, DenseW<T>{w.as<T>(), hidden}, rows, hidden, n, EpiQkvRope<T>::tiles(HD, heads, kv), pro, e);
  } else {
    Dev xn((size_t)n * hidden * sizeof(T)), qkv((size_t)n * rows * sizeof(T));
    launch(kEager, rmsnorm_kernel<T>, dim3(n), dim3(256), 0, (const float*)x.as<float>(), (const int*)nullptr, (const T*)gain.as<T>(), xn.as<T>(),
           hidden, c.f("eps"));
    Gemm gemm(32u << 20);
    gemm.run(0, dtype_of<T>(), w.p, xn.p, qkv.p, n, rows, hidden, false, false);
    launch(kEager, rope_kv_write_kernel<T>, dim3(n), dim3(128), 0, (const T*)qkv.as<T>(), HD, heads, kv, bs, q.as<T>(), kc.as<T>(), vc.as<T>(), ra);
  }
  return {{"q", q.read()}, {"k_cache", kc.read()}, {"v_cache", vc.read()}};
}

template <typename T, int HD> BufferMap attention_test(const Ctx& c) {
  const int heads = c.i("heads"), kv = c.i("kv_heads"), bs = c.i("block_size"), seqs = c.i("seqs"), width = c.i("table_width");
  const int tokens = c.i("tokens");
  Dev q(c.buf("q")), kc(c.buf("k_cache")), vc(c.buf("v_cache")), qs(c.buf("query_starts")), cl(c.buf("context_lens")), bt(c.buf("block_tables"));
  Dev out((size_t)tokens * heads * HD * sizeof(T));
  std::vector<int> all(seqs);
  for (int i = 0; i < seqs; i++) all[i] = i;
  Dev list(Bytes((const uint8_t*)all.data(), (const uint8_t*)(all.data() + seqs)));
  if (c.i("prefill")) {
    PrefillAttnArgs a{list.as<int>(), qs.as<int>(), cl.as<int>(), bt.as<int>(), width, heads, kv, bs, 1.4426950408889634f / std::sqrt((float)HD)};
    attention_prefill<T, HD>(kEager, seqs, c.i("max_query_len"), q.as<T>(), heads * HD, kc.as<T>(), vc.as<T>(), out.as<T>(), heads * HD, a);
  } else {
    DecodeAttnArgs a{list.as<int>(), qs.as<int>(), cl.as<int>(), bt.as<int>(), width, heads, kv, bs, 1.f / std::sqrt((float)HD)};
    const int cluster = c.i("cluster") ? c.i("cluster") : decode_cluster(seqs);
    if (c.in.count("w_o")) {  // the int4 O projection fused in: "resid" ([tokens][hidden] fp32) and its copy gain it
      const int hidden = c.i("hidden"), group = c.i("group");
      if (!attention_o_fits(2, group, hidden, heads, kv, HD, cluster)) throw CudaError("kernel test: the fused O projection does not take these shapes");
      Dev wo(c.buf("w_o")), so(c.buf("scales_o")), resid(c.buf("resid")), copy(c.buf("resid"));
      const AttnOProj<T> op{Int4W<T>::make(wo.as<uint8_t>(), so.as<half>(), heads * HD, group), hidden, resid.as<float>(), copy.as<float>(), hidden};
      attention_decode<T, HD>(kEager, seqs, q.as<T>(), heads * HD, kc.as<T>(), vc.as<T>(), nullptr, heads * HD, a, cluster, op);
      return {{"resid", resid.read()}, {"copy", copy.read()}};
    }
    attention_decode<T, HD>(kEager, seqs, q.as<T>(), heads * HD, kc.as<T>(), vc.as<T>(), out.as<T>(), heads * HD, a, cluster);
  }
  return {{"out", out.read()}};
}

template <typename T> BufferMap small_kernels_test(const std::string& name, const Ctx& c) {
  if (name == "embedding") {
    const int n = c.i("tokens"), hidden = c.i("hidden");
    Dev e(c.buf("embed")), t(c.buf("tokens")), r((size_t)n * hidden * 4);
    launch(kEager, embedding_kernel<T>, dim3(n), dim3(256), 0, (const T*)e.as<T>(), (const int*)t.as<int>(), r.as<float>(), hidden);
    return {{"resid", r.read()}};
  }
  if (name == "rmsnorm") {
    const int n = c.i("rows"), hidden = c.i("hidden");
    Dev x(c.buf("x")), g(c.buf("gain")), rows(c.buf("gather")), y((size_t)n * hidden * sizeof(T));
    launch(kEager, rmsnorm_kernel<T>, dim3(n), dim3(256), 0, (const float*)x.as<float>(), (const int*)rows.as<int>(), (const T*)g.as<T>(), y.as<T>(),
           hidden, c.f("eps"));
    return {{"y", y.read()}};
  }
  if (name == "silu_mul") {
    const int n = c.i("tokens"), inter = c.i("inter");
    Dev gu(c.buf("gate_up")), y((size_t)n * inter * sizeof(T));
    launch(kEager, silu_mul_kernel<T>, dim3(ceil_div(inter, 256), n), dim3(256), 0, (const T*)gu.as<T>(), y.as<T>(), inter);
    return {{"y", y.read()}};
  }
  if (name == "gemm") {
    const int m = c.i("m"), n = c.i("n"), k = c.i("k"), fp32 = c.i("y_fp32");
    Dev w(c.buf("w")), x(c.buf("x")), y(c.buf("y"));
    Gemm gemm(32u << 20);
    gemm.run(0, dtype_of<T>(), w.p, x.p, y.p, m, n, k, fp32, c.i("accumulate"));
    return {{"y", y.read()}};
  }
  throw CudaError("kernel test: unknown kernel " + name);
}

BufferMap sample_test(const Ctx& c) {
  const int seqs = c.i("seqs"), vocab = c.i("vocab"), top_n = c.i("top_n");
  Dev logits(c.buf("logits")), probs((size_t)seqs * vocab * 4);
  Dev temp(c.buf("temperature")), tk(c.buf("top_k")), tp(c.buf("top_p")), mp(c.buf("min_p")), rep(c.buf("repetition")), fr(c.buf("frequency")),
      pr(c.buf("presence")), seed(c.buf("seed")), ctr(c.buf("counter")), smp(c.buf("sample")), ps(c.buf("pen_starts")), pt(c.buf("pen_tokens")),
      pc(c.buf("pen_counts")), saved(c.buf("pen_tokens").size());
  Dev tokens(seqs * 4), lps(seqs * 4), tids((size_t)seqs * std::max(top_n, 1) * 4), tlps((size_t)seqs * std::max(top_n, 1) * 4);
  SamplingArgs a{temp.as<float>(), tk.as<int>(), tp.as<float>(), mp.as<float>(), rep.as<float>(), fr.as<float>(), pr.as<float>(),
                 seed.as<uint32_t>(), ctr.as<uint32_t>(), smp.as<uint8_t>(), ps.as<int>(), pt.as<int>(), pc.as<int>(), saved.as<float>()};
  SampleOut out{tokens.as<int>(), lps.as<float>(), tids.as<int>(), tlps.as<float>()};
  launch_sample(kEager, logits.as<float>(), probs.as<float>(), seqs, vocab, top_n, a, out);
  return {{"tokens", tokens.read()}, {"logprobs", lps.read()}, {"top_ids", tids.read()}, {"top_logprobs", tlps.read()}};
}

// Time the GEMV with the residual epilogue, as the O and down projections run: `copies` weight matrices in
// rotation (together past L2), each launch captured in one CUDA graph of `iters` launches. Returns the
// mean microseconds per launch in "us" (an fp32 scalar).
template <typename T> BufferMap gemv_bench(const Ctx& c) {
  const int rows = c.i("rows"), cols = c.i("cols"), batch = c.i("batch"), copies = c.i("copies"), iters = c.i("iters");
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const Launch l{stream, c.i("pdl") != 0};
  const int quant = c.i("quant"), group = 128;  // 0: 16-bit, 1: int8, 2: int4
  const size_t wbytes = quant == 0 ? (size_t)rows * cols * sizeof(T) : quant == 1 ? (size_t)rows * cols : (size_t)rows * cols / 2;
  Dev w(wbytes * copies), x((size_t)batch * cols * sizeof(T)), y((size_t)batch * rows * 4);
  Dev scales((size_t)rows * (cols / group) * sizeof(half));
  CUDA_CHECK(cudaMemset(w.p, 0x3c, wbytes * copies));  // small finite values; the time does not depend on them
  CUDA_CHECK(cudaMemset(scales.p, 0x1c, scales.bytes));
  CUDA_CHECK(cudaMemset(x.p, 0x3c, x.bytes));
  EpiResidual e{};
  e.rows = rows;
  e.resid = y.as<float>();
  e.ld = rows;
  Dev resid((size_t)batch * cols * 4), gain((size_t)cols * sizeof(T));
  CUDA_CHECK(cudaMemset(resid.p, 0x3c, resid.bytes));
  CUDA_CHECK(cudaMemset(gain.p, 0x3c, gain.bytes));
  const bool norm = c.i("norm") != 0;  // the prologue of the QKV, gate/up and LM-head products
  auto run = [&](int i) {
    with_weight_format<T>(quant, w.as<char>() + (i % copies) * wbytes, scales.as<half>(), cols, group, [&](const auto& wi) {
      if (norm) gemv<T>(l, wi, rows, cols, batch, RowsLinear::tiles(rows), ProRmsNorm<T>{resid.as<float>(), cols, gain.as<T>(), 1e-5f}, e);
      else gemv<T>(l, wi, rows, cols, batch, RowsLinear::tiles(rows), ProPlain<T>{x.as<T>(), cols}, e);
    });
  };
  run(0);  // configures the kernel outside the capture
  cudaGraph_t graph;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < iters; i++) run(i);
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  CUDA_CHECK(cudaGraphLaunch(exec, stream));  // warm-up
  CUDA_CHECK(cudaEventRecord(a, stream));
  CUDA_CHECK(cudaGraphLaunch(exec, stream));
  CUDA_CHECK(cudaEventRecord(b, stream));
  CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  const float us = ms * 1000.f / iters;
  Bytes out(4);
  std::memcpy(out.data(), &us, 4);
  return {{"us", out}};
}

template <typename T> BufferMap dispatch_t(const std::string& name, const Ctx& c) {
  if (name == "gemv") return gemv_test<T>(c);
  if (name == "bench_gemv") return gemv_bench<T>(c);
  if (name == "mlp") return mlp_test<T>(c);
  if (name == "qkv" || name == "attention") {
    const int hd = c.i("head_dim");
    if (hd != 64 && hd != 128) throw CudaError("kernel test: head size " + std::to_string(hd));
    if (name == "qkv") return hd == 64 ? qkv_test<T, 64>(c) : qkv_test<T, 128>(c);
    return hd == 64 ? attention_test<T, 64>(c) : attention_test<T, 128>(c);
  }
  return small_kernels_test<T>(name, c);
}

}  // namespace

BufferMap run_kernel_test(const std::string& name, const BufferMap& inputs, const ParamMap& params) {
  const Ctx c{inputs, params};
  BufferMap out;
  if (name == "sample") out = sample_test(c);
  else out = c.i("dtype") == (int)DType::F16 ? dispatch_t<half>(name, c) : dispatch_t<__nv_bfloat16>(name, c);
  CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace decima
