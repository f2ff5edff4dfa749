#include "gemm.h"

#include <string>

namespace decima {

static void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw CudaError(std::string("cuBLASLt ") + what + " failed (status " + std::to_string((int)s) + ")");
}

Gemm::Gemm(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  check_lt(cublasLtCreate(&handle_), "create");
  CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

Gemm::~Gemm() {
  for (auto& [key, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.desc);
  }
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

// cuBLASLt is column-major: row-major Y[M][N] is column-major N x M, so compute Y^T = W X^T with W
// (row-major N x K = column-major K x N) transposed and X^T (column-major K x M) as is.
Gemm::Plan& Gemm::plan(DType dtype, int m, int n, int k, bool y_fp32, bool accumulate) {
  const Key key{(int)dtype, m, n, k, y_fp32, accumulate};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  const cudaDataType_t ab = dtype == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
  const cudaDataType_t cd = y_fp32 ? CUDA_R_32F : ab;
  Plan p{};
  check_lt(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  const cublasOperation_t trans = CUBLAS_OP_T;
  check_lt(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)), "transa");
  check_lt(cublasLtMatrixLayoutCreate(&p.a, ab, k, n, k), "layout A");
  check_lt(cublasLtMatrixLayoutCreate(&p.b, ab, k, m, k), "layout B");
  check_lt(cublasLtMatrixLayoutCreate(&p.c, cd, n, m, n), "layout C");
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  const int found = candidates(p, results);
  if (found == 0) throw CudaError("cuBLASLt has no algorithm for a " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) + " product");
  p.algo = results[0].algo;
  return plans_.emplace(key, p).first->second;
}

// cuBLASLt's algorithms for a plan, best guess first.
int Gemm::candidates(const Plan& p, cublasLtMatmulHeuristicResult_t (&results)[kCandidates]) {
  cublasLtMatmulPreference_t pref;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), "preference");
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof(workspace_bytes_)),
           "workspace");
  int found = 0;
  const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c, pref, kCandidates, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lt(s, "heuristic");
  return found;
}

// The heuristic's first choice is often far from the best for decode-sized products (a few rows): time
// every candidate on this shape, into scratch output, and keep the fastest. Each timed run starts with
// the weights out of L2 (a write over twice its size in between), as in a decode step, where every
// matrix comes from device memory: timed back to back, a 10 MB matrix would stay in L2 and favour
// algorithms that only win there. Not possible while a stream is being captured: the model runs each
// decode shape eagerly, tuning on, before capturing it.
void Gemm::tune(Plan& p, cudaStream_t stream, const void* w, const void* x, int m, int n, bool y_fp32) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream, &capturing));
  if (!tuning_ || capturing != cudaStreamCaptureStatusNone || p.tuned) return;
  p.tuned = true;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  const int found = candidates(p, results);
  int dev = 0, l2 = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const size_t bytes = (size_t)m * n * (y_fp32 ? 4 : 2), flush_bytes = 2 * (size_t)l2;
  void *scratch = nullptr, *flush = nullptr;
  CUDA_CHECK(cudaMalloc(&scratch, bytes));
  CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  const float alpha = 1.f, beta = 0.f;
  float best = 1e30f;
  for (int i = 0; i < found; i++) {
    auto run = [&] {
      return cublasLtMatmul(handle_, p.desc, &alpha, w, p.a, x, p.b, &beta, scratch, p.c, scratch, p.c, &results[i].algo, workspace_,
                            workspace_bytes_, stream);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; an algorithm that refuses is skipped
    float total = 0;
    for (int r = 0; r < 5; r++) {
      CUDA_CHECK(cudaMemsetAsync(flush, r, flush_bytes, stream));
      CUDA_CHECK(cudaEventRecord(a, stream));
      run();
      CUDA_CHECK(cudaEventRecord(b, stream));
      CUDA_CHECK(cudaEventSynchronize(b));
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
      total += ms;
    }
    if (total < best) {
      best = total;
      p.algo = results[i].algo;
    }
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  CUDA_CHECK(cudaFree(flush));
  CUDA_CHECK(cudaFree(scratch));
}

void Gemm::run(cudaStream_t stream, DType dtype, const void* w, const void* x, void* y, int m, int n, int k, bool y_fp32, bool accumulate) {
  Plan& p = plan(dtype, m, n, k, y_fp32, accumulate);
  tune(p, stream, w, x, m, n, y_fp32);
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  check_lt(cublasLtMatmul(handle_, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, workspace_, workspace_bytes_, stream),
           "matmul");
}

}  // namespace decima
