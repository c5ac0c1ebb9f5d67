// cuBLASLt products with fused epilogues. tutti's GEMMs are row-major and cuBLASLt's column-major:
// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so A and B swap places and m and
// n swap, as in CudaBackend::run_gemm. In those column-major terms a linear layer's bias (one per
// output feature, a row-major column) is one per row of D, which is what CUBLASLT_EPILOGUE_BIAS
// broadcasts, and the bias gradient of dW = x^T g (column sums of g over the k = N rows) is the sum
// of the column-major A (= g) over k: CUBLASLT_EPILOGUE_BGRADA. GELU's input goes to the aux
// matrix, laid out as D (leading dimension ldc, which cuBLASLt wants a multiple of 8); the MLP's
// backward reads it back in CUBLASLT_EPILOGUE_DGELU. (DGELU_BGRAD, which would also sum c_fc's bias
// gradient, ran at 0.44 ms against DGELU's 0.15 on GPT-2's shape, H200: the bias gradient comes from
// c_fc's dW product, BGRADA, instead.)
// Bias, bias gradient and aux are of D's type (cuBLASLt's default types): fp32, or bf16 where D is
// (bias, bias + GELU; an fp32 bias beside a bf16 D was refused on an H200). A combination cuBLASLt
// refuses at its first call is declined from then on, and runs unfused.
#include "backend/cuda/cuda_gemm_lt.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "backend/cuda/cuda_check.hpp"

namespace tutti::cuda {
namespace {

// Owned cuBLASLt descriptors.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  MatmulDesc(cublasComputeType_t compute) { CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, compute, CUDA_R_32F)); }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(desc); }
  MatmulDesc(const MatmulDesc&) = delete;
  MatmulDesc& operator=(const MatmulDesc&) = delete;
  template <class V>
  void set(cublasLtMatmulDescAttributes_t attr, const V& value) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
  }
};

struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols),
                                            ld));
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(layout); }
  Layout(const Layout&) = delete;
  Layout& operator=(const Layout&) = delete;
};

struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  Preference() { CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref)); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(pref); }
  Preference(const Preference&) = delete;
  Preference& operator=(const Preference&) = delete;
  template <class V>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
  }
};

// The largest power of two, up to 16, that divides the address (what the algorithm may assume).
uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 16;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

cublasLtEpilogue_t lt_epilogue(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::bias_gelu: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GemmEpilogue::bias_grad: return CUBLASLT_EPILOGUE_BGRADA;
    case GemmEpilogue::dgelu: return CUBLASLT_EPILOGUE_DGELU;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

}  // namespace

LtGemm::LtGemm(cudaStream_t stream, bool tf32, bool tune) : stream_(stream), tf32_(tf32), tune_(tune) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_bytes_ = size_t{32} << 20;  // cuBLASLt's advice for Hopper
  const cudaError_t err = cudaMalloc(&workspace_, workspace_bytes_);
  if (err != cudaSuccess) {
    cublasLtDestroy(handle_);
    CUDA_CHECK(err);
  }
}

LtGemm::~LtGemm() {
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

bool LtGemm::run(const EpilogueGemmOf<float>& g) { return dispatch(g, CUDA_R_32F); }
bool LtGemm::run(const EpilogueGemmOf<BFloat16>& g) { return dispatch(g, CUDA_R_16BF); }

// p: g's operands and D, swapped to column-major, no epilogue yet; false (p untouched) where g is
// outside what LtGemm runs (a batch, alpha != 1, beta != 0, an empty size).
template <class T>
bool LtGemm::problem_of(const GemmOf<T>& g, cudaDataType_t ab_type, Problem& p) {
  if (g.batch != 1 || g.beta != 0.0f || g.alpha != 1.0f || g.m <= 0 || g.n <= 0 || g.k <= 0) return false;
  void* d = g.c_bf16 ? static_cast<void*>(g.c_bf16) : static_cast<void*>(g.c);
  p = {ab_type, g.trans_b, g.trans_a, g.n, g.m, g.k, g.ldb, g.lda, g.ldc, CUBLASLT_EPILOGUE_DEFAULT,
       g.b,     g.a,       d,         g.c_bf16 ? CUDA_R_16BF : CUDA_R_32F, nullptr, nullptr, nullptr};
  return true;
}

bool LtGemm::run_plain(const GemmBf16& g) {
  Problem p;
  return problem_of(g, CUDA_R_16BF, p) && run_problem(p);
}

template <class T>
bool LtGemm::dispatch(const EpilogueGemmOf<T>& e, cudaDataType_t ab_type) {
  const GemmOf<T>& g = e.gemm;
  Problem p;
  if (!problem_of(g, ab_type, p)) return false;
  const bool dgelu = e.epilogue == GemmEpilogue::dgelu;
  const bool gelu = e.epilogue == GemmEpilogue::bias_gelu || dgelu;
  const bool grad = e.epilogue == GemmEpilogue::bias_grad;
  if (!dgelu && (grad ? e.bias_grad == nullptr : e.bias == nullptr)) return false;
  if (gelu && (e.aux == nullptr || g.ldc % 8 != 0)) return false;
  if (g.c_bf16 && e.epilogue == GemmEpilogue::bias_grad) return false;
  if (e.residual && (e.epilogue != GemmEpilogue::bias || g.c_bf16 || e.residual == g.c)) return false;
  p.epilogue = lt_epilogue(e.epilogue);
  p.bias = e.bias;
  p.aux = e.aux;
  p.bias_grad = e.bias_grad;
  p.c = e.residual;
  return run_problem(p);
}

// p with `algo` on the stream: D = P (+ epilogue), or D = C + P where p has a C (beta 1).
cublasStatus_t LtGemm::matmul(cublasLtMatmulDesc_t desc, const Problem& p, cublasLtMatrixLayout_t a,
                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d, const cublasLtMatmulAlgo_t& algo) {
  const float alpha = 1.0f, beta = p.c ? 1.0f : 0.0f;
  return cublasLtMatmul(handle_, desc, &alpha, p.a, a, p.b, b, &beta, p.c ? p.c : p.d, d, p.d, d, &algo, workspace_,
                        workspace_bytes_, stream_);
}

// The fastest of the heuristic's candidates on p's operands (the first, untimed, unless tuning):
// each runs once to warm up (candidates the library refuses are dropped there), then in
// kTuneRounds rounds over all of them, two launches between events each; a candidate's time is its
// fastest round (clocks and power drift between rounds: the rounds interleave the candidates, and
// the minimum is the least disturbed).
cublasLtMatmulAlgo_t LtGemm::fastest(const cublasLtMatmulHeuristicResult_t* results, int count,
                                     cublasLtMatmulDesc_t desc, const Problem& p, cublasLtMatrixLayout_t a,
                                     cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t d) {
  if (count == 1) return results[0].algo;
  // C is not D: every run writes the same D.
  auto launch = [&](const cublasLtMatmulAlgo_t& algo) { return matmul(desc, p, a, b, d, algo); };
  std::vector<int> usable;
  for (int i = 0; i < count; ++i)
    if (launch(results[i].algo) == CUBLAS_STATUS_SUCCESS) usable.push_back(i);
  if (usable.empty()) return results[0].algo;
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> best_ms(usable.size(), -1.0f);
  for (int round = 0; round < kTuneRounds; ++round)
    for (size_t c = 0; c < usable.size(); ++c) {
      CUDA_CHECK(cudaEventRecord(start, stream_));
      for (int r = 0; r < 2; ++r) CUBLAS_CHECK(launch(results[usable[c]].algo));
      CUDA_CHECK(cudaEventRecord(stop, stream_));
      CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (best_ms[c] < 0.0f || ms < best_ms[c]) best_ms[c] = ms;
    }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const size_t best = std::min_element(best_ms.begin(), best_ms.end()) - best_ms.begin();
  if (std::getenv("TUTTI_CUDA_LT_TUNE_LOG") != nullptr)
    std::fprintf(stderr, "lt tune: m %lld n %lld k %lld epilogue %d%s: heuristic's first %.4f ms, best (#%d of %d) "
                 "%.4f ms\n", static_cast<long long>(p.m), static_cast<long long>(p.n), static_cast<long long>(p.k),
                 static_cast<int>(p.epilogue), p.c ? " + C" : "", usable[0] == 0 ? best_ms[0] / 2 : -1.0f,
                 usable[best], count, best_ms[best] / 2);
  return results[usable[best]].algo;
}

bool LtGemm::run_problem(const Problem& p) {
  const bool fp32 = p.ab_type == CUDA_R_32F;
  MatmulDesc desc(fp32 && tf32_ ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N));
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N));
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(p.epilogue));
  const void* bias = p.epilogue == CUBLASLT_EPILOGUE_BGRADA ? static_cast<const void*>(p.bias_grad) : p.bias;
  if (bias != nullptr) desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  if (p.epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || p.epilogue == CUBLASLT_EPILOGUE_DGELU) {
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, static_cast<void*>(p.aux));
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.ldc);
  }
  const Layout a(p.ab_type, p.trans_a ? p.k : p.m, p.trans_a ? p.m : p.k, p.lda);
  const Layout b(p.ab_type, p.trans_b ? p.n : p.k, p.trans_b ? p.k : p.n, p.ldb);
  const Layout d(p.d_type, p.m, p.n, p.ldc);

  const uint32_t align_a = alignment(p.a), align_b = alignment(p.b);
  const uint32_t align_d = std::min(alignment(p.d), alignment(p.c ? p.c : p.d));
  const uint32_t align_e = std::min(alignment(bias), p.aux ? alignment(p.aux) : 16u);
  const Key key{static_cast<int>(p.ab_type) | static_cast<int>(p.d_type) << 8, p.trans_a, p.trans_b, p.m, p.n, p.k,
                p.lda, p.ldb, p.ldc,
                static_cast<int>(p.epilogue) | (p.c ? 1 << 16 : 0),
                static_cast<int>(align_a | align_b << 5 | align_d << 10 | align_e << 15)};
  Found found;
  {
    std::lock_guard lock(cache_mutex_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      found = it->second;
    } else {
      Preference pref;
      pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace_bytes_));
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
      pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
      cublasLtMatmulHeuristicResult_t results[kTuneCandidates]{};
      int returned = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(handle_, desc.desc, a.layout, b.layout, d.layout, d.layout, pref.pref,
                                         tune_ ? kTuneCandidates : 1, results, &returned);
      found.ok = st == CUBLAS_STATUS_SUCCESS && returned > 0;  // unsupported: the caller runs it unfused
      if (found.ok) found.algo = fastest(results, returned, desc.desc, p, a.layout, b.layout, d.layout);
      cache_.emplace(key, found);
    }
  }
  if (!found.ok) return false;
  const cublasStatus_t st = matmul(desc.desc, p, a.layout, b.layout, d.layout, found.algo);
  if (!found.ran) {  // the first call decides: refused (nothing launched), the case runs unfused from now on
    std::lock_guard lock(cache_mutex_);
    Found& cached = cache_[key];
    cached.ok = st == CUBLAS_STATUS_SUCCESS;
    cached.ran = true;
    if (!cached.ok) return false;
  }
  CUBLAS_CHECK(st);
  return true;
}

}  // namespace tutti::cuda
