// Default kernel bodies (a backend that lacks a kernel fails clearly) and the device registry.
#include "backend/backend.hpp"

#include <memory>
#include <mutex>

#include "backend/cpu/cpu_backend.hpp"
#include "tutti/core/error.hpp"
#ifdef TUTTI_WITH_CUDA
#include "backend/cuda/cuda_backend.hpp"
#endif

namespace tutti {
namespace {
[[noreturn]] void missing(const Backend& b, const char* kernel) {
  TUTTI_FAIL(InvalidArgument, "op '", kernel, "' is not implemented on device ", b.device().str());
}
}  // namespace

void Backend::strided_copy(const void*, const Shape&, const Strides&, size_t, void*) { missing(*this, "strided_copy"); }
void Backend::fill(float*, int64_t, float) { missing(*this, "fill"); }
void Backend::add(const float*, const float*, float*, int64_t, int64_t) { missing(*this, "add"); }
void Backend::axpy(float, const float*, float*, int64_t) { missing(*this, "axpy"); }
void Backend::scale(const float*, float, float*, int64_t) { missing(*this, "scale"); }
void Backend::sum_rows(const float*, float*, int64_t, int64_t, bool) { missing(*this, "sum_rows"); }
double Backend::sum(const float*, int64_t) { missing(*this, "sum"); }
double Backend::sum_squares(const float*, int64_t) { missing(*this, "sum_squares"); }
void Backend::gelu_forward(const float*, float*, int64_t) { missing(*this, "gelu"); }
void Backend::gelu_backward(const float*, const float*, float*, int64_t) { missing(*this, "gelu_backward"); }
void Backend::relu_forward(const float*, float*, int64_t) { missing(*this, "relu"); }
void Backend::relu_backward(const float*, const float*, float*, int64_t) { missing(*this, "relu_backward"); }
void Backend::gemm(const Gemm&) { missing(*this, "matmul"); }
void Backend::to_bf16(const float*, BFloat16*, int64_t) { missing(*this, "to_bf16 (mixed precision)"); }
void Backend::to_bf16_sum_rows(const float* x, BFloat16* y, float* sums, int64_t rows, int64_t cols) {
  to_bf16(x, y, rows * cols);
  sum_rows(x, sums, rows, cols, false);
}
void Backend::layer_norm_backward_bf16(const float* x, const float* w, const float* mean, const float* rstd,
                                       const float* dy, float* dx, float* dw, float* db, BFloat16* dx_bf16,
                                       float* dx_sums, int64_t rows, int64_t cols, bool accumulate_dx) {
  layer_norm_backward(x, w, mean, rstd, dy, dx, dw, db, rows, cols, accumulate_dx);
  to_bf16_sum_rows(dx, dx_bf16, dx_sums, rows, cols);
}
void Backend::sum_rows_bf16(const BFloat16*, float*, int64_t, int64_t) {
  missing(*this, "sum_rows_bf16 (mixed precision)");
}
void Backend::gelu_backward_bf16(const float*, const float*, BFloat16*, int64_t) {
  missing(*this, "gelu_backward_bf16 (mixed precision)");
}
void Backend::gelu_backward_bf16(const BFloat16*, const float*, BFloat16*, int64_t) {
  missing(*this, "gelu_backward_bf16 (mixed precision)");
}
void Backend::gemm_bf16(const GemmBf16&) { missing(*this, "matmul in bf16 (mixed precision)"); }
void Backend::attention_forward_bf16(const BFloat16*, float*, BFloat16*, int64_t, int64_t, int64_t, int64_t) {
  missing(*this, "causal_attention in bf16 (mixed precision)");
}
void Backend::attention_backward_bf16(const BFloat16*, const BFloat16*, const float*, float*, int64_t, int64_t,
                                      int64_t, int64_t) {
  missing(*this, "causal_attention_backward in bf16 (mixed precision)");
}
bool Backend::flash_attention_supports(int64_t, int64_t, int64_t, int64_t) const { return false; }
void Backend::flash_attention_forward(const BFloat16*, BFloat16*, float*, int64_t, int64_t, int64_t, int64_t) {
  missing(*this, "flash attention");
}
void Backend::flash_attention_backward(const BFloat16*, const BFloat16*, const float*, const BFloat16*, BFloat16*,
                                       int64_t, int64_t, int64_t, int64_t) {
  missing(*this, "flash attention backward");
}
void Backend::layer_norm_forward(const float*, const float*, const float*, float*, float*, float*, int64_t, int64_t,
                                 float) {
  missing(*this, "layer_norm");
}
void Backend::cross_entropy_stats_bf16(const BFloat16*, const int32_t*, float*, float*, int64_t, int64_t) {
  missing(*this, "cross_entropy on bf16 logits (mixed precision)");
}
void Backend::cross_entropy_backward_from_stats_bf16(const BFloat16*, const int32_t*, const float*, float, BFloat16*,
                                                     int64_t, int64_t) {
  missing(*this, "cross_entropy_backward on bf16 logits (mixed precision)");
}
void Backend::layer_norm_forward_bf16(const float*, const float*, const float*, BFloat16*, float*, float*, int64_t,
                                      int64_t, float) {
  missing(*this, "layer_norm_forward_bf16 (mixed precision)");
}
void Backend::layer_norm_backward(const float*, const float*, const float*, const float*, const float*, float*, float*,
                                  float*, int64_t, int64_t, bool) {
  missing(*this, "layer_norm_backward");
}
void Backend::attention_forward(const float*, float*, float*, int64_t, int64_t, int64_t, int64_t) {
  missing(*this, "causal_attention");
}
void Backend::attention_backward(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                                 int64_t) {
  missing(*this, "causal_attention_backward");
}
void Backend::attention_decode(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t) {
  missing(*this, "attention_decode");
}
void Backend::embedding_forward(const int32_t*, const float*, float*, int64_t, int64_t, int64_t) {
  missing(*this, "embedding");
}
void Backend::embedding_backward(const int32_t*, const float*, float*, int64_t, int64_t) {
  missing(*this, "embedding_backward");
}
void Backend::cross_entropy_forward(const float*, const int32_t*, float*, float*, int64_t, int64_t) {
  missing(*this, "cross_entropy");
}
void Backend::cross_entropy_backward(const float*, const int32_t*, float, float*, int64_t, int64_t) {
  missing(*this, "cross_entropy_backward");
}
void Backend::cross_entropy_stats(const float*, const int32_t*, float*, float*, int64_t, int64_t) {
  missing(*this, "cross_entropy_stats");
}
void Backend::cross_entropy_backward_from_stats(const float*, const int32_t*, const float*, float, float*, int64_t,
                                                int64_t) {
  missing(*this, "cross_entropy_backward_from_stats");
}
void Backend::vocab_cross_entropy_stats(const float*, const int32_t*, int64_t, float*, int64_t, int64_t) {
  missing(*this, "vocab_cross_entropy_stats");
}
void Backend::vocab_cross_entropy_backward(const float*, const int32_t*, int64_t, const float*, float, float*, int64_t,
                                           int64_t) {
  missing(*this, "vocab_cross_entropy_backward");
}
void Backend::softmax(const float*, float*, int64_t, int64_t) { missing(*this, "softmax"); }
void Backend::adamw(std::span<const AdamWTensor>, const AdamWStep&) { missing(*this, "adamw"); }

Backend& backend_for(Device device) {
  if (device.is_cpu()) {
    static cpu::CpuBackend cpu_backend;
    return cpu_backend;
  }
#ifdef TUTTI_WITH_CUDA
  return cuda::cuda_backend(device.index);
#else
  TUTTI_FAIL(InvalidArgument, "device ", device.str(), " is not available: tutti was built without CUDA");
#endif
}

bool device_available(Device device) {
  if (device.is_cpu()) return true;
#ifdef TUTTI_WITH_CUDA
  return device.index >= 0 && device.index < cuda::device_count();
#else
  return false;
#endif
}

}  // namespace tutti
