// Tensor-core matrix products through cuBLASLt, for prefill and batches past the GEMV kernels' range.
#pragma once
#include <cublasLt.h>

#include <map>
#include <tuple>

#include "common.cuh"

namespace decima {

class Gemm {
 public:
  explicit Gemm(size_t workspace_bytes);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Y[M][N] = X[M][K] W[N][K]^T (row-major, as PyTorch's Linear), plus Y when `accumulate`.
  // X and W are `dtype`; Y is fp32 (`y_fp32`, e.g. the residual stream or logits) or `dtype`.
  void run(cudaStream_t stream, DType dtype, const void* w, const void* x, void* y, int m, int n, int k, bool y_fp32, bool accumulate);
  // While one lives, new shapes get every candidate algorithm timed (decode steps, before their graph is
  // captured); otherwise they take the heuristic's first choice (prefill: a new token count each time, and
  // the heuristic suits them). Scoped, so that a failure can't leave tuning on.
  class Tuning {
   public:
    explicit Tuning(Gemm& g) : g_(g) { g_.tuning_ = true; }
    ~Tuning() { g_.tuning_ = false; }
    Tuning(const Tuning&) = delete;
    Tuning& operator=(const Tuning&) = delete;

   private:
    Gemm& g_;
  };

 private:
  using Key = std::tuple<int, int, int, int, bool, bool>;
  static constexpr int kCandidates = 16;
  struct Plan {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    bool tuned;
  };
  Plan& plan(DType dtype, int m, int n, int k, bool y_fp32, bool accumulate);
  void tune(Plan& p, cudaStream_t stream, const void* w, const void* x, int m, int n, bool y_fp32);
  int candidates(const Plan& p, cublasLtMatmulHeuristicResult_t (&results)[kCandidates]);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_;
  std::map<Key, Plan> plans_;
  bool tuning_ = false;
};

}  // namespace decima
