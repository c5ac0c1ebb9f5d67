// The CUDA backend: device memory, copies, cuBLAS matrix products, and the launch of tutti's own
// kernels (cuda_kernels.cu), all on one stream per GPU. Work is asynchronous; only what hands
// data to the host (copy_to_host, copy_from_host, sum, sum_squares, synchronize) waits for it.
// Letters: B batch, T time, C channels, H heads, D head size (C / H).
#include "backend/cuda/cuda_backend.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/cuda_gemm_lt.hpp"
#include "backend/cuda/cuda_cudnn_attention.hpp"
#include "backend/cuda/cuda_kernels.cuh"
#include "tutti/core/error.hpp"

namespace tutti::cuda {
namespace {

static_assert(kernels::kMaxDims == kMaxDims, "cuda_kernels.cuh must pass shapes of up to tutti::kMaxDims dims");

// bf16 values as the kernels take them: their bits (the .cu files include no tutti header).
uint16_t* bits(BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }
const uint16_t* bits(const BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

// The flash kernels' base alignment (cuda_kernels.cuh): a tensor of the caching allocator has it;
// a view that starts mid-block may not.
void check_flash_aligned(const void* qkv, const void* y, const void* dy, const void* dqkv) {
  TUTTI_CHECK_AS(InvalidArgument, kernels::flash_attention_aligned(qkv, y, dy, dqkv),
                 "flash attention needs qkv, dy and dqkv 16-byte aligned and y 4; got qkv ", qkv, ", y ", y,
                 ", dy ", dy, ", dqkv ", dqkv);
}

// cuDNN's attention reads and writes its tensors 16 bytes at a time.
void check_cudnn_aligned(const void* qkv, const void* y, const void* dy, const void* dqkv) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  TUTTI_CHECK_AS(InvalidArgument, aligned(qkv) && aligned(y) && aligned(dy) && aligned(dqkv),
                 "cuDNN attention needs qkv, y, dy and dqkv 16-byte aligned; got qkv ", qkv, ", y ", y, ", dy ", dy,
                 ", dqkv ", dqkv);
}

// ------------------------------------------------------------------------------------------------
// Owned CUDA resources

class Stream {
 public:
  Stream() { CUDA_CHECK(cudaStreamCreate(&stream_)); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class CublasHandle {
 public:
  CublasHandle() { CUBLAS_CHECK(cublasCreate(&handle_)); }
  ~CublasHandle() { cublasDestroy(handle_); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// Scratch memory that only grows. Work queued on the stream may still read the old block when it
// grows: cudaFree waits for the device, so that is safe.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* reserve(size_t bytes) {
    if (bytes > bytes_) {
      CUDA_CHECK(cudaFree(data_));
      data_ = nullptr;
      bytes_ = 0;
      CUDA_CHECK(cudaMalloc(&data_, bytes));
      bytes_ = bytes;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Small host-to-device copies go through pinned buffers so that they need not wait for the GPU:
// the source is copied into the next buffer of a ring, the copy queued on the stream, and the
// caller returns (it may free the source) while the GPU still runs earlier work; a buffer is
// reused once the copy queued from it has run (its event). A training step's token batches take
// this path: the host queues the next forward while the GPU finishes the optimizer's update.
class StagedCopies {
 public:
  static constexpr size_t kMaxBytes = size_t{4} << 20;  // larger copies wait for the stream instead
  StagedCopies() = default;
  ~StagedCopies() {  // never throws (runs at exit too)
    for (Slot& s : slots_) {
      if (s.done) cudaEventSynchronize(s.done), cudaEventDestroy(s.done);
      cudaFreeHost(s.host);
    }
  }
  StagedCopies(const StagedCopies&) = delete;
  StagedCopies& operator=(const StagedCopies&) = delete;
  void copy(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    std::lock_guard lock(mutex_);
    Slot& s = slots_[next_++ % slots_.size()];
    if (s.done) {
      CUDA_CHECK(cudaEventSynchronize(s.done));  // the copy queued from it has run
    } else {  // the slot takes both or neither
      CUDA_CHECK(cudaMallocHost(&s.host, kMaxBytes));
      const cudaError_t err = cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming);
      if (err != cudaSuccess) {
        cudaFreeHost(s.host);
        s.host = nullptr;
        s.done = nullptr;
        CUDA_CHECK(err);
      }
    }
    std::memcpy(s.host, src, bytes);
    CUDA_CHECK(cudaMemcpyAsync(dst, s.host, bytes, cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaEventRecord(s.done, stream));
  }

 private:
  struct Slot {
    void* host = nullptr;
    cudaEvent_t done = nullptr;
  };
  std::mutex mutex_;
  std::array<Slot, 4> slots_;
  size_t next_ = 0;
};

// Scratch carved into 256-byte aligned pieces.
size_t aligned_bytes(size_t bytes) { return (bytes + 255) / 256 * 256; }

int checked_int(int64_t v, const char* what) {
  TUTTI_CHECK_AS(InvalidArgument, v >= 0 && v <= INT_MAX, "cuda gemm: ", what, " = ", v, " does not fit cuBLAS's int");
  return static_cast<int>(v);
}

// ------------------------------------------------------------------------------------------------
// The backend of one GPU

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index) : index_(index) {
    activate();
    stream_ = std::make_unique<Stream>();
    cublas_ = std::make_unique<CublasHandle>();
    CUBLAS_CHECK(cublasSetStream(cublas_->get(), stream_->get()));
    // Full fp32 by default so results match the CPU to ~1e-5; TUTTI_CUDA_TF32=1 trades that for
    // the tensor cores' tf32 mode (about 3e-4 relative error).
    const char* tf32 = std::getenv("TUTTI_CUDA_TF32");
    const bool use_tf32 = tf32 != nullptr && std::strcmp(tf32, "1") == 0;
    CUBLAS_CHECK(cublasSetMathMode(cublas_->get(), use_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    CUDA_CHECK(cudaDeviceGetAttribute(&limits_.multiprocessors, cudaDevAttrMultiProcessorCount, index_));
    // bf16 attention with head size 64 runs as flash attention; TUTTI_CUDA_FLASH=0 materialises
    // the probabilities instead (the reference path, and a way to compare).
    const char* flash = std::getenv("TUTTI_CUDA_FLASH");
    use_flash_ = flash == nullptr || std::strcmp(flash, "0") != 0;
    // Linear layers' bias, GELU and bias gradient fused into cuBLASLt products; TUTTI_CUDA_LT=0
    // runs them as separate kernels after cuBLAS products (to compare). Each product's algorithm
    // is picked by timing the heuristic's candidates at its first call, the plain bf16 products
    // included (LtGemm); TUTTI_CUDA_LT_TUNE=0 takes the heuristic's first, TUTTI_CUDA_LT_TUNE_LOG=1
    // prints the choices.
    const char* lt = std::getenv("TUTTI_CUDA_LT");
    const char* tune = std::getenv("TUTTI_CUDA_LT_TUNE");
    if (lt == nullptr || std::strcmp(lt, "0") != 0)
      lt_ = std::make_unique<LtGemm>(stream_->get(), use_tf32, tune == nullptr || std::strcmp(tune, "0") != 0);
    // cross_entropy keeps per-row statistics, not the (N, V) probabilities; TUTTI_CUDA_XENT=0 keeps
    // the probabilities (the unfused pair, to compare).
    const char* xent = std::getenv("TUTTI_CUDA_XENT");
    fused_xent_ = xent == nullptr || std::strcmp(xent, "0") != 0;
  }

  Device device() const override { return Device::cuda(index_); }
  const char* name() const override { return "cuda"; }
  cudaStream_t stream() const { return stream_->get(); }

  // -- memory and copies -------------------------------------------------------------------------
  void* raw_allocate(size_t bytes) override {
    activate();
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear it; the exception carries it
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      TUTTI_FAIL(Error, "out of memory on ", device().str(), " allocating ", bytes, " bytes (", free_bytes,
                 " bytes free of ", total_bytes, "); empty_cache(", device().str(), ") may return cached blocks");
    }
    CUDA_CHECK(err);
    return p;
  }

  // Never throws: it runs from Storage's destructor, and after main returns the runtime may already
  // be unloading. A real error here is sticky and the next checked call reports it.
  void raw_deallocate(void* ptr, size_t) override {
    cudaSetDevice(index_);
    cudaFree(ptr);
  }

  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    activate();
    if (bytes <= StagedCopies::kMaxBytes) return staged_.copy(dst, src, bytes, stream());
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()));
    CUDA_CHECK(cudaStreamSynchronize(stream()));  // the caller may free `src` on return
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    activate();
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()));
    CUDA_CHECK(cudaStreamSynchronize(stream()));
  }
  void copy_on_device(void* dst, const void* src, size_t bytes) override {
    activate();
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
  }
  void strided_copy(const void* src, const Shape& shape, const Strides& strides, size_t elem, void* dst) override {
    activate();
    kernels::StridedLayout layout{};
    layout.ndim = shape.ndim();
    for (int i = 0; i < shape.ndim(); ++i) {
      layout.shape[i] = shape[i];
      layout.strides[i] = strides[i];
    }
    CUDA_CHECK(kernels::strided_copy(src, layout, shape.numel(), elem, dst, limits_, stream()));
  }
  void synchronize() override {
    activate();
    CUDA_CHECK(cudaStreamSynchronize(stream()));
  }

  // -- element-wise ------------------------------------------------------------------------------
  void fill(float* dst, int64_t n, float value) override {
    activate();
    CUDA_CHECK(kernels::fill(dst, n, value, limits_, stream()));
  }
  void add(const float* a, const float* b, float* out, int64_t outer, int64_t inner) override {
    activate();
    CUDA_CHECK(kernels::add(a, b, out, outer, inner, limits_, stream()));
  }
  void axpy(float alpha, const float* x, float* y, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::axpy(alpha, x, y, n, limits_, stream()));
  }
  void scale(const float* x, float s, float* y, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::scale(x, s, y, n, limits_, stream()));
  }
  void sum_rows(const float* x, float* out, int64_t rows, int64_t cols, bool accumulate) override {
    activate();
    std::lock_guard lock(scratch_mutex_);
    void* ws = scratch_.reserve(kernels::sum_rows_workspace_bytes(rows, cols, limits_));
    CUDA_CHECK(kernels::sum_rows(x, out, rows, cols, accumulate, ws, limits_, stream()));
  }
  double sum(const float* x, int64_t n) override { return total(x, n, false); }
  double sum_squares(const float* x, int64_t n) override { return total(x, n, true); }
  void gelu_forward(const float* x, float* y, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::gelu_forward(x, y, n, limits_, stream()));
  }
  void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::gelu_backward(x, dy, dx, n, limits_, stream()));
  }
  void relu_forward(const float* x, float* y, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::relu_forward(x, y, n, limits_, stream()));
  }
  void relu_backward(const float* x, const float* dy, float* dx, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::relu_backward(x, dy, dx, n, limits_, stream()));
  }

  // -- GEMM ----------------------------------------------------------------------------------------
  void gemm(const Gemm& g) override { run_gemm(g); }
  void gemm_bf16(const GemmBf16& g) override { run_gemm(g); }
  bool gemm_epilogue(const EpilogueGemmOf<float>& g) override {
    activate();
    return lt_ && lt_->run(g);
  }
  bool gemm_epilogue_bf16(const EpilogueGemmOf<BFloat16>& g) override {
    activate();
    return lt_ && lt_->run(g);
  }

  // -- fused ops -----------------------------------------------------------------------------------
  void layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                          int64_t rows, int64_t cols, float eps) override {
    activate();
    CUDA_CHECK(kernels::layer_norm_forward(x, w, b, y, mean, rstd, rows, cols, eps, stream()));
  }
  void layer_norm_forward_bf16(const float* x, const float* w, const float* b, BFloat16* y, float* mean, float* rstd,
                               int64_t rows, int64_t cols, float eps) override {
    activate();
    CUDA_CHECK(kernels::layer_norm_forward_bf16(x, w, b, bits(y), mean, rstd, rows, cols, eps, stream()));
  }
  void layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                           float* dx, float* dw, float* db, int64_t rows, int64_t cols, bool accumulate_dx) override {
    activate();
    std::lock_guard lock(scratch_mutex_);
    void* ws = scratch_.reserve(kernels::layer_norm_backward_workspace_bytes(rows, cols, limits_));
    CUDA_CHECK(kernels::layer_norm_backward(x, w, mean, rstd, dy, dx, dw, db, nullptr, nullptr, rows, cols,
                                            accumulate_dx, ws, limits_, stream()));
  }
  void layer_norm_backward_bf16(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                                float* dx, float* dw, float* db, BFloat16* dx_bf16, float* dx_sums, int64_t rows,
                                int64_t cols, bool accumulate_dx) override {
    if (!kernels::layer_norm_backward_rounds(cols))
      return Backend::layer_norm_backward_bf16(x, w, mean, rstd, dy, dx, dw, db, dx_bf16, dx_sums, rows, cols,
                                               accumulate_dx);
    activate();
    std::lock_guard lock(scratch_mutex_);
    void* ws = scratch_.reserve(kernels::layer_norm_backward_workspace_bytes(rows, cols, limits_));
    CUDA_CHECK(kernels::layer_norm_backward(x, w, mean, rstd, dy, dx, dw, db, bits(dx_bf16), dx_sums, rows, cols,
                                            accumulate_dx, ws, limits_, stream()));
  }
  void attention_forward(const float* qkv, float* y, float* probs, int64_t B, int64_t T, int64_t C,
                         int64_t H) override;
  void attention_backward(const float* qkv, const float* probs, const float* dy, float* dqkv, int64_t B, int64_t T,
                          int64_t C, int64_t H) override;
  void attention_decode(const float* q, const float* k, const float* v, float* y, int64_t n, int64_t past,
                        int64_t C, int64_t H) override;
  void embedding_forward(const int32_t* idx, const float* table, float* out, int64_t n, int64_t C,
                         int64_t V) override {
    activate();
    CUDA_CHECK(kernels::embedding_forward(idx, table, out, n, C, V, limits_, stream()));
  }
  void embedding_backward(const int32_t* idx, const float* dout, float* dtable, int64_t n, int64_t C) override {
    activate();
    CUDA_CHECK(kernels::embedding_backward(idx, dout, dtable, n, C, limits_, stream()));
  }
  void cross_entropy_forward(const float* logits, const int32_t* targets, float* probs, float* losses, int64_t N,
                             int64_t V) override {
    activate();
    CUDA_CHECK(kernels::cross_entropy_forward(logits, targets, probs, losses, N, V, stream()));
  }
  void cross_entropy_backward(const float* probs, const int32_t* targets, float dloss, float* dlogits, int64_t N,
                              int64_t V) override {
    activate();
    CUDA_CHECK(kernels::cross_entropy_backward(probs, targets, dloss, dlogits, N, V, limits_, stream()));
  }
  bool fused_cross_entropy() const override { return fused_xent_; }
  void cross_entropy_stats(const float* logits, const int32_t* targets, float* stats, float* losses, int64_t N,
                           int64_t V) override {
    activate();
    CUDA_CHECK(kernels::cross_entropy_stats(logits, targets, stats, losses, N, V, stream()));
  }
  void cross_entropy_backward_from_stats(const float* logits, const int32_t* targets, const float* stats, float dloss,
                                         float* dlogits, int64_t N, int64_t V) override {
    activate();
    CUDA_CHECK(kernels::cross_entropy_backward_from_stats(logits, targets, stats, dloss, dlogits, N, V, stream()));
  }
  void cross_entropy_stats_bf16(const BFloat16* logits, const int32_t* targets, float* stats, float* losses, int64_t N,
                                int64_t V) override {
    activate();
    CUDA_CHECK(kernels::cross_entropy_stats_bf16(bits(logits), targets, stats, losses, N, V, stream()));
  }
  void cross_entropy_backward_from_stats_bf16(const BFloat16* logits, const int32_t* targets, const float* stats,
                                              float dloss, BFloat16* dlogits, int64_t N, int64_t V) override {
    activate();
    CUDA_CHECK(kernels::cross_entropy_backward_from_stats_bf16(bits(logits), targets, stats, dloss, bits(dlogits), N, V,
                                                               stream()));
  }
  void vocab_cross_entropy_stats(const float* logits, const int32_t* targets, int64_t first, float* stats, int64_t N,
                                 int64_t V) override {
    activate();
    CUDA_CHECK(kernels::vocab_cross_entropy_stats(logits, targets, first, stats, N, V, stream()));
  }
  void vocab_cross_entropy_backward(const float* logits, const int32_t* targets, int64_t first, const float* lse,
                                    float dloss, float* dlogits, int64_t N, int64_t V) override {
    activate();
    CUDA_CHECK(kernels::vocab_cross_entropy_backward(logits, targets, first, lse, dloss, dlogits, N, V, limits_,
                                                     stream()));
  }
  void softmax(const float* x, float* y, int64_t rows, int64_t cols) override {
    activate();
    CUDA_CHECK(kernels::softmax(x, y, rows, cols, stream()));
  }
  // One launch for every tensor. Its table stays in device memory and is uploaded again only when
  // the tensors change (DataParallel passes the same ones every step; optim::AdamW's gradients may
  // move), through the staged copies: the upload waits for nothing.
  void adamw(std::span<const AdamWTensor> tensors, const AdamWStep& s) override {
    activate();
    const kernels::AdamWFolded folded{s.beta1,
                                      s.beta2,
                                      s.eps,
                                      1.0f - s.lr * s.weight_decay,
                                      s.lr / s.bias_correction1,
                                      1.0f / std::sqrt(s.bias_correction2),
                                      s.grad_scale};
    using kernels::aligned;
    std::vector<kernels::AdamWSlice> table;
    int64_t blocks = 0;
    for (const AdamWTensor& t : tensors) {
      if (t.n <= 0) continue;
      const bool vec = aligned(t.param, 16) && aligned(t.grad, 16) && aligned(t.m, 16) && aligned(t.v, 16) &&
                       aligned(t.copy, 8);
      table.push_back({t.param, t.grad, t.m, t.v, bits(t.copy), t.n, blocks, t.decay, vec});
      blocks += (t.n + kernels::kAdamWChunk - 1) / kernels::kAdamWChunk;
    }
    std::lock_guard lock(adamw_mutex_);
    const size_t bytes = table.size() * sizeof(kernels::AdamWSlice);
    auto same = [](const kernels::AdamWSlice& a, const kernels::AdamWSlice& b) {
      return a.param == b.param && a.grad == b.grad && a.m == b.m && a.v == b.v && a.copy == b.copy && a.n == b.n &&
             a.first_block == b.first_block && a.decay == b.decay && a.vec == b.vec;
    };
    if (!std::equal(table.begin(), table.end(), adamw_table_.begin(), adamw_table_.end(), same)) {
      adamw_table_.clear();  // what the device holds is unknown until the upload is queued
      void* dst = adamw_device_.reserve(bytes);
      if (bytes <= StagedCopies::kMaxBytes) {  // queued behind the last launch that read the old table
        staged_.copy(dst, table.data(), bytes, stream());
      } else {
        CUDA_CHECK(cudaMemcpyAsync(dst, table.data(), bytes, cudaMemcpyHostToDevice, stream()));
        CUDA_CHECK(cudaStreamSynchronize(stream()));  // `table` is freed on return
      }
      adamw_table_ = std::move(table);
    }
    CUDA_CHECK(kernels::adamw(static_cast<const kernels::AdamWSlice*>(adamw_device_.reserve(bytes)),
                              static_cast<int>(adamw_table_.size()), blocks, folded, stream()));
  }

  // -- mixed precision -----------------------------------------------------------------------------
  void to_bf16(const float* x, BFloat16* y, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::to_bf16(x, bits(y), n, limits_, stream()));
  }
  void to_bf16_sum_rows(const float* x, BFloat16* y, float* sums, int64_t rows, int64_t cols) override {
    activate();
    std::lock_guard lock(scratch_mutex_);
    void* ws = scratch_.reserve(kernels::column_sum_vec_workspace_bytes(rows, cols, limits_));
    CUDA_CHECK(kernels::to_bf16_sum_rows(x, bits(y), sums, rows, cols, ws, limits_, stream()));
  }
  void sum_rows_bf16(const BFloat16* x, float* sums, int64_t rows, int64_t cols) override {
    activate();
    std::lock_guard lock(scratch_mutex_);
    void* ws = scratch_.reserve(kernels::column_sum_vec_workspace_bytes(rows, cols, limits_));
    CUDA_CHECK(kernels::sum_rows_bf16(bits(x), sums, rows, cols, ws, limits_, stream()));
  }
  void gelu_backward_bf16(const float* x, const float* dy, BFloat16* dx, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::gelu_backward_bf16(x, dy, bits(dx), n, limits_, stream()));
  }
  void gelu_backward_bf16(const BFloat16* x, const float* dy, BFloat16* dx, int64_t n) override {
    activate();
    CUDA_CHECK(kernels::gelu_backward_bf16(bits(x), dy, bits(dx), n, limits_, stream()));
  }
  void attention_forward_bf16(const BFloat16* qkv, float* y, BFloat16* probs, int64_t B, int64_t T, int64_t C,
                              int64_t H) override;
  void attention_backward_bf16(const BFloat16* qkv, const BFloat16* probs, const float* dy, float* dqkv, int64_t B,
                               int64_t T, int64_t C, int64_t H) override;
  bool flash_attention_supports(int64_t B, int64_t T, int64_t C, int64_t H) const override {
    return use_flash_ && (cudnn_attention(B, T, C, H) != nullptr || kernels::flash_attention_fits(B, C, H));
  }
  void flash_attention_forward(const BFloat16* qkv, BFloat16* y, float* lse, int64_t B, int64_t T, int64_t C,
                               int64_t H) override {
    activate();
#if TUTTI_WITH_CUDNN
    if (CudnnAttention* cudnn = cudnn_attention(B, T, C, H)) {
      check_cudnn_aligned(qkv, y, nullptr, nullptr);
      std::lock_guard lock(scratch_mutex_);
      cudnn->forward(bits(qkv), bits(y), lse, B, T, C, H, scratch_.reserve(cudnn->workspace_bytes(B, T, C, H)));
      return;
    }
#endif
    check_flash_aligned(qkv, y, nullptr, nullptr);
    CUDA_CHECK(kernels::flash_attention_forward(bits(qkv), bits(y), lse, B, T, C, H, stream()));
  }
  void flash_attention_backward(const BFloat16* qkv, const BFloat16* y, const float* lse, const BFloat16* dy,
                                BFloat16* dqkv, int64_t B, int64_t T, int64_t C, int64_t H) override {
    activate();
#if TUTTI_WITH_CUDNN
    if (CudnnAttention* cudnn = cudnn_attention(B, T, C, H)) {
      check_cudnn_aligned(qkv, y, dy, dqkv);
      std::lock_guard lock(scratch_mutex_);
      cudnn->backward(bits(qkv), bits(y), lse, bits(dy), bits(dqkv), B, T, C, H,
                      scratch_.reserve(cudnn->workspace_bytes(B, T, C, H)));
      return;
    }
#endif
    check_flash_aligned(qkv, y, dy, dqkv);
    // dq_acc (B, H, T, 64) and dvec (B, H, T), fp32; pieces of 256-byte aligned scratch.
    const size_t dq_bytes = aligned_bytes(static_cast<size_t>(B * H * T * kernels::kFlashHeadDim) * sizeof(float));
    std::lock_guard lock(scratch_mutex_);
    auto* base = static_cast<char*>(scratch_.reserve(dq_bytes + static_cast<size_t>(B * H * T) * sizeof(float)));
    auto* dq_acc = reinterpret_cast<float*>(base);
    auto* dvec = reinterpret_cast<float*>(base + dq_bytes);
    CUDA_CHECK(kernels::flash_attention_backward(bits(qkv), bits(y), lse, bits(dy), bits(dqkv), dq_acc, dvec, B, T, C,
                                                 H, limits_, stream()));
  }

 private:
  // tutti's Gemm is row-major. A row-major matrix read as column-major is its transpose, so
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same call with the
  // operands swapped and m, n exchanged; the trans flags and leading dimensions carry over.
  // fp32 operands go through cublasSgemm (TF32 tensor cores only under TUTTI_CUDA_TF32=1); bf16
  // operands through cublasGemmEx on the tensor cores, accumulating and writing fp32.
  template <class T>
  void run_gemm(const GemmOf<T>& g) {
    if (g.m == 0 || g.n == 0 || g.batch == 0) return;
    activate();
    if (g.c_bf16) TUTTI_CHECK(g.beta == 0.0f, "a GEMM writing bf16 takes beta 0, got ", g.beta);
    if (g.k == 0 && g.c_bf16) {  // C = 0: the rows of each matrix cleared
      for (int64_t i = 0; i < g.batch; ++i)
        CUDA_CHECK(cudaMemset2DAsync(g.c_bf16 + i * g.stride_c, size_t(g.ldc) * 2, 0, size_t(g.n) * 2, size_t(g.m),
                                     stream()));
      return;
    }
    if (g.k == 0) {  // C = beta C; cuBLAS would reject the zero leading dimensions
      CUDA_CHECK(kernels::scale_matrices(g.c, g.m, g.n, g.ldc, g.stride_c, g.batch, g.beta, limits_, stream()));
      return;
    }
    const int m = checked_int(g.m, "m"), n = checked_int(g.n, "n"), k = checked_int(g.k, "k");
    const int lda = checked_int(g.lda, "lda"), ldb = checked_int(g.ldb, "ldb"), ldc = checked_int(g.ldc, "ldc");
    const int batch = checked_int(g.batch, "batch");
    const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasHandle_t h = cublas_->get();
    if constexpr (std::is_same_v<T, float>) {
      TUTTI_CHECK(!g.c_bf16, "a GEMM writes bf16 only from bf16 operands");
      if (batch == 1)
        CUBLAS_CHECK(cublasSgemm(h, op_b, op_a, n, m, k, &g.alpha, g.b, ldb, g.a, lda, &g.beta, g.c, ldc));
      else
        CUBLAS_CHECK(cublasSgemmStridedBatched(h, op_b, op_a, n, m, k, &g.alpha, g.b, ldb, g.stride_b, g.a, lda,
                                               g.stride_a, &g.beta, g.c, ldc, g.stride_c, batch));
    } else {
      static_assert(std::is_same_v<T, BFloat16> && sizeof(BFloat16) == 2, "fp32 or bf16 operands");
      if (lt_ && lt_->tuning() && lt_->run_plain(g)) return;
      void* c = g.c_bf16 ? static_cast<void*>(g.c_bf16) : static_cast<void*>(g.c);
      const cudaDataType_t c_type = g.c_bf16 ? CUDA_R_16BF : CUDA_R_32F;
      if (batch == 1)
        CUBLAS_CHECK(cublasGemmEx(h, op_b, op_a, n, m, k, &g.alpha, g.b, CUDA_R_16BF, ldb, g.a, CUDA_R_16BF, lda,
                                  &g.beta, c, c_type, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      else
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, op_b, op_a, n, m, k, &g.alpha, g.b, CUDA_R_16BF, ldb, g.stride_b,
                                                g.a, CUDA_R_16BF, lda, g.stride_a, &g.beta, c, c_type, ldc,
                                                g.stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }

  // Work of this backend runs on its GPU whichever GPU the calling thread last used.
  void activate() const { CUDA_CHECK(cudaSetDevice(index_)); }

  // cuDNN's fused attention where it has plans for the shape (both passes), else null: tutti's
  // flash kernels run the shape instead. The handle is made at the first attention; a shape cuDNN
  // declines is said once on stderr. TUTTI_CUDA_CUDNN=0 keeps cuDNN out.
  CudnnAttention* cudnn_attention(int64_t B, int64_t T, int64_t C, int64_t H) const {
#if TUTTI_WITH_CUDNN
    std::lock_guard lock(cudnn_mutex_);
    if (!cudnn_tried_) {
      cudnn_tried_ = true;
      const char* env = std::getenv("TUTTI_CUDA_CUDNN");
      if (env == nullptr || std::strcmp(env, "0") != 0) {
        activate();
        try {
          cudnn_ = std::make_unique<CudnnAttention>(stream());
        } catch (const Error& e) {
          std::fprintf(stderr, "tutti: cuDNN attention unavailable (%s); tutti's flash kernels run attention\n",
                       e.what());
        }
      }
    }
    if (cudnn_ == nullptr) return nullptr;
    if (cudnn_->supports(B, T, C, H)) return cudnn_.get();
    if (!cudnn_declined_said_) {
      cudnn_declined_said_ = true;
      std::fprintf(stderr, "tutti: cuDNN declined attention of B %lld T %lld C %lld H %lld (%s); tutti's own "
                   "kernels run it\n", static_cast<long long>(B), static_cast<long long>(T),
                   static_cast<long long>(C), static_cast<long long>(H), cudnn_->why_not().c_str());
    }
#else
    (void)B, (void)T, (void)C, (void)H;
#endif
    return nullptr;
  }

  double total(const float* x, int64_t n, bool squares) {
    activate();
    double result = 0.0;
    {
      std::lock_guard lock(scratch_mutex_);
      auto* ws = static_cast<char*>(scratch_.reserve(sizeof(double) + kernels::sum_workspace_bytes(n, limits_)));
      auto* device_result = reinterpret_cast<double*>(ws);
      CUDA_CHECK(kernels::sum(x, n, squares, device_result, ws + sizeof(double), limits_, stream()));
      CUDA_CHECK(cudaMemcpyAsync(&result, device_result, sizeof(double), cudaMemcpyDeviceToHost, stream()));
      CUDA_CHECK(cudaStreamSynchronize(stream()));
    }
    return result;
  }

  int index_;
  bool use_flash_ = true;
  bool fused_xent_ = true;
  std::unique_ptr<Stream> stream_;
  std::unique_ptr<CublasHandle> cublas_;
  std::unique_ptr<LtGemm> lt_;  // null under TUTTI_CUDA_LT=0
#if TUTTI_WITH_CUDNN
  mutable std::mutex cudnn_mutex_;
  // null until made, or where cuDNN is off or failed; after stream_, so destroyed before it
  mutable std::unique_ptr<CudnnAttention> cudnn_;
  mutable bool cudnn_tried_ = false, cudnn_declined_said_ = false;
#endif
  kernels::LaunchLimits limits_{};
  std::mutex scratch_mutex_;  // scratch_ is shared by the reductions and attention
  DeviceBuffer scratch_;
  StagedCopies staged_;
  std::mutex adamw_mutex_;
  std::vector<kernels::AdamWSlice> adamw_table_;  // what adamw_device_ holds
  DeviceBuffer adamw_device_;
};

// ------------------------------------------------------------------------------------------------
// Causal attention: probs (B, H, T, T) are materialised, as on the CPU. Per batch element, each
// product is one strided-batched GEMM over the heads (head h of q, k, v starts h D columns in).

template <class T>
GemmOf<T> head_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda,
                    int64_t stride_a, const T* b, int64_t ldb, int64_t stride_b, float* c, int64_t ldc,
                    int64_t stride_c, int64_t H) {
  GemmOf<T> g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.alpha = alpha;
  g.a = a;
  g.lda = lda;
  g.stride_a = stride_a;
  g.b = b;
  g.ldb = ldb;
  g.stride_b = stride_b;
  g.c = c;
  g.ldc = ldc;
  g.stride_c = stride_c;
  g.batch = H;
  return g;
}

void CudaBackend::attention_forward(const float* qkv, float* y, float* probs, int64_t B, int64_t T, int64_t C,
                                    int64_t H) {
  activate();
  const int64_t D = C / H, ld = 3 * C, TT = T * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t b = 0; b < B; ++b) {  // S = scale Q K^T  (H, T, T)
    const float* q = qkv + b * T * ld;
    gemm(head_gemm(false, true, T, T, D, scale, q, ld, D, q + C, ld, D, probs + b * H * TT, T, TT, H));
  }
  CUDA_CHECK(kernels::causal_softmax(probs, B * H * T, T, T, 0, stream()));
  for (int64_t b = 0; b < B; ++b) {  // Y = P V  (T, D) per head, heads side by side in (T, C)
    const float* v = qkv + b * T * ld + 2 * C;
    gemm(head_gemm(false, false, T, D, T, 1.0f, probs + b * H * TT, T, TT, v, ld, D, y + b * T * C, C, D, H));
  }
}

void CudaBackend::attention_backward(const float* qkv, const float* probs, const float* dy, float* dqkv, int64_t B,
                                     int64_t T, int64_t C, int64_t H) {
  activate();
  const int64_t D = C / H, ld = 3 * C, TT = T * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::lock_guard lock(scratch_mutex_);
  auto* dp = static_cast<float*>(scratch_.reserve(static_cast<size_t>(B * H * TT) * sizeof(float)));  // (B, H, T, T)
  for (int64_t b = 0; b < B; ++b) {
    const float* v = qkv + b * T * ld + 2 * C;
    const float* dyb = dy + b * T * C;
    // dV = P^T dY;  dP = dY V^T
    gemm(head_gemm(true, false, T, D, T, 1.0f, probs + b * H * TT, T, TT, dyb, C, D, dqkv + b * T * ld + 2 * C, ld, D,
                   H));
    gemm(head_gemm(false, true, T, T, D, 1.0f, dyb, C, D, v, ld, D, dp + b * H * TT, T, TT, H));
  }
  CUDA_CHECK(kernels::causal_softmax_backward(probs, dp, B * H * T, T, scale, stream()));  // dP -> dS
  for (int64_t b = 0; b < B; ++b) {
    const float* q = qkv + b * T * ld;
    float* dq = dqkv + b * T * ld;
    // dQ = dS K;  dK = dS^T Q
    gemm(head_gemm(false, false, T, D, T, 1.0f, dp + b * H * TT, T, TT, q + C, ld, D, dq, ld, D, H));
    gemm(head_gemm(true, false, T, D, T, 1.0f, dp + b * H * TT, T, TT, q, ld, D, dq + C, ld, D, H));
  }
}

// Decoding: n new queries (n, C) at positions past..past+n-1 against the cache k, v (L, C),
// L = past + n. Scores (H, n, L) live in scratch; same three steps as attention_forward.
void CudaBackend::attention_decode(const float* q, const float* k, const float* v, float* y, int64_t n, int64_t past,
                                   int64_t C, int64_t H) {
  activate();
  const int64_t D = C / H, L = past + n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::lock_guard lock(scratch_mutex_);
  auto* s = static_cast<float*>(scratch_.reserve(static_cast<size_t>(H * n * L) * sizeof(float)));
  gemm(head_gemm(false, true, n, L, D, scale, q, C, D, k, C, D, s, L, n * L, H));  // S = scale Q K^T
  CUDA_CHECK(kernels::causal_softmax(s, H * n, n, L, past, stream()));
  gemm(head_gemm(false, false, n, D, L, 1.0f, s, L, n * L, v, C, D, y, C, D, H));  // Y = P V
}

// ------------------------------------------------------------------------------------------------
// Causal attention with bf16 matrix products. One batch element at a time: its fp32 scores
// (H, T, T) live in scratch, only the bf16 probabilities (B, H, T, T) are kept for backward.

void CudaBackend::attention_forward_bf16(const BFloat16* qkv, float* y, BFloat16* probs, int64_t B, int64_t T,
                                         int64_t C, int64_t H) {
  activate();
  const int64_t D = C / H, ld = 3 * C, TT = T * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::lock_guard lock(scratch_mutex_);
  auto* s = static_cast<float*>(scratch_.reserve(static_cast<size_t>(H * TT) * sizeof(float)));  // (H, T, T)
  for (int64_t b = 0; b < B; ++b) {
    const BFloat16* q = qkv + b * T * ld;
    BFloat16* p = probs + b * H * TT;
    run_gemm(head_gemm(false, true, T, T, D, scale, q, ld, D, q + C, ld, D, s, T, TT, H));  // S = scale Q K^T
    CUDA_CHECK(kernels::causal_softmax_bf16(s, bits(p), H * T, T, stream()));
    run_gemm(head_gemm(false, false, T, D, T, 1.0f, static_cast<const BFloat16*>(p), T, TT, q + 2 * C, ld, D,
                       y + b * T * C, C, D, H));  // Y = P V
  }
}

void CudaBackend::attention_backward_bf16(const BFloat16* qkv, const BFloat16* probs, const float* dy, float* dqkv,
                                          int64_t B, int64_t T, int64_t C, int64_t H) {
  activate();
  const int64_t D = C / H, ld = 3 * C, TT = T * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t dy_bytes = aligned_bytes(static_cast<size_t>(B * T * C) * 2);
  const size_t dp_bytes = aligned_bytes(static_cast<size_t>(H * TT) * sizeof(float));
  std::lock_guard lock(scratch_mutex_);
  auto* base = static_cast<char*>(scratch_.reserve(dy_bytes + dp_bytes + static_cast<size_t>(H * TT) * 2));
  auto* dyh = reinterpret_cast<BFloat16*>(base);              // (B, T, C)
  auto* dp = reinterpret_cast<float*>(base + dy_bytes);         // (H, T, T) of one batch element
  auto* ds = reinterpret_cast<BFloat16*>(base + dy_bytes + dp_bytes);  // (H, T, T)
  CUDA_CHECK(kernels::to_bf16(dy, bits(dyh), B * T * C, limits_, stream()));
  for (int64_t b = 0; b < B; ++b) {
    const BFloat16 *q = qkv + b * T * ld, *p = probs + b * H * TT, *dyb = dyh + b * T * C;
    float* dq = dqkv + b * T * ld;
    run_gemm(head_gemm(true, false, T, D, T, 1.0f, p, T, TT, dyb, C, D, dq + 2 * C, ld, D, H));      // dV = P^T dY
    run_gemm(head_gemm(false, true, T, T, D, 1.0f, dyb, C, D, q + 2 * C, ld, D, dp, T, TT, H));      // dP = dY V^T
    CUDA_CHECK(kernels::causal_softmax_backward_bf16(bits(p), dp, bits(ds), H * T, T, scale, stream()));
    const BFloat16* dsc = ds;
    run_gemm(head_gemm(false, false, T, D, T, 1.0f, dsc, T, TT, q + C, ld, D, dq, ld, D, H));        // dQ = dS K
    run_gemm(head_gemm(true, false, T, D, T, 1.0f, dsc, T, TT, q, ld, D, dq + C, ld, D, H));         // dK = dS^T Q
  }
}

// ------------------------------------------------------------------------------------------------
// Registry

std::mutex registry_mutex;

CudaBackend& backend_at(int index) {
  const int count = device_count();
  TUTTI_CHECK_AS(InvalidArgument, index >= 0 && index < count, "device cuda:", index, " is not available: ", count,
                 " CUDA device(s) visible");
  // Leaked on purpose, like the caching allocators above it: tensors held by static objects free
  // their memory through the backend after main returns.
  static auto* backends = new std::vector<std::unique_ptr<CudaBackend>>(static_cast<size_t>(count));
  std::lock_guard lock(registry_mutex);
  auto& slot = (*backends)[static_cast<size_t>(index)];
  if (!slot) slot = std::make_unique<CudaBackend>(index);
  return *slot;
}

}  // namespace

int device_count() {
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // no driver or no GPU: not an error for a CPU-only run
      return 0;
    }
    return n;
  }();
  return count;
}

Backend& cuda_backend(int index) { return backend_at(index); }

CUstream_st* stream(int index) { return backend_at(index).stream(); }

}  // namespace tutti::cuda
