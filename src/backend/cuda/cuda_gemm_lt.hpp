// GEMMs with fused epilogues through cuBLASLt: the bias add, bias + GELU (keeping GELU's input),
// and the bias gradient, inside the matrix product instead of separate passes over its result.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "backend/backend.hpp"

namespace tutti::cuda {

class LtGemm {
 public:
  // tf32: the fp32 products on the tensor cores' tf32 mode, as cuBLAS's TUTTI_CUDA_TF32 setting.
  // tune: the first call of each problem times up to kTuneCandidates of the heuristic's algorithms
  // (fastest) on the call's own operands (every output is overwritten, so any run leaves the right
  // result) and keeps the fastest, instead of the heuristic's first; the choice then depends on timing.
  LtGemm(cudaStream_t stream, bool tf32, bool tune);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Runs the product with its epilogue on the stream; false (nothing done) where cuBLASLt has no
  // algorithm for it or the case is outside what is fused (batch > 1, beta != 0, an empty size,
  // GELU's aux leading dimension not a multiple of 8, a bf16 C with BGRADA, a residual beside
  // anything but the bias into an fp32 C).
  bool run(const EpilogueGemmOf<float>& g);
  bool run(const EpilogueGemmOf<BFloat16>& g);
  // A product with no epilogue (bf16 A and B, batch 1, beta 0), as cublasGemmEx would: for tuning.
  bool run_plain(const GemmBf16& g);
  bool tuning() const { return tune_; }

 private:
  struct Problem {  // column-major, after the row-major swap (see cuda_gemm_lt.cpp)
    cudaDataType_t ab_type;
    bool trans_a, trans_b;
    int64_t m, n, k, lda, ldb, ldc;
    cublasLtEpilogue_t epilogue;  // CUBLASLT_EPILOGUE_DEFAULT: none
    const void *a, *b;
    void* d;
    cudaDataType_t d_type;  // fp32, or bf16 (then bias and aux are bf16 too)
    const void* bias;
    void* aux;
    float* bias_grad;
    const void* c = nullptr;  // added to the product (beta 1), laid out as D; nullptr: beta 0
  };
  template <class T>
  static bool problem_of(const GemmOf<T>& g, cudaDataType_t ab_type, Problem& p);
  template <class T>
  bool dispatch(const EpilogueGemmOf<T>& g, cudaDataType_t ab_type);
  bool run_problem(const Problem& p);
  cublasStatus_t matmul(cublasLtMatmulDesc_t desc, const Problem& p, cublasLtMatrixLayout_t a,
                        cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t& algo);
  cublasLtMatmulAlgo_t fastest(const cublasLtMatmulHeuristicResult_t* results, int count, cublasLtMatmulDesc_t desc,
                               const Problem& p, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                               cublasLtMatrixLayout_t d);
  static constexpr int kTuneCandidates = 16;
  static constexpr int kTuneRounds = 5;

  using Key = std::tuple<int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int>;
  struct Found {
    bool ok = false;
    bool ran = false;  // cublasLtMatmul accepted it once (a type the heuristic offered may still be refused)
    cublasLtMatmulAlgo_t algo{};
  };

  cudaStream_t stream_;
  bool tf32_, tune_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::mutex cache_mutex_;
  std::map<Key, Found> cache_;  // the heuristic's pick per problem shape
};

}  // namespace tutti::cuda
