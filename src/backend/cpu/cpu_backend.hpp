#pragma once
#include "backend/backend.hpp"

namespace tutti::cpu {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }
  const char* name() const override { return "cpu"; }

  void* raw_allocate(size_t bytes) override;
  void raw_deallocate(void* ptr, size_t bytes) override;
  void copy_from_host(void* dst, const void* src, size_t bytes) override;
  void copy_to_host(void* dst, const void* src, size_t bytes) override;
  void copy_on_device(void* dst, const void* src, size_t bytes) override;
  void strided_copy(const void* src, const Shape& shape, const Strides& strides, size_t elem, void* dst) override;

  void fill(float* dst, int64_t n, float value) override;
  void add(const float* a, const float* b, float* out, int64_t outer, int64_t inner) override;
  void axpy(float alpha, const float* x, float* y, int64_t n) override;
  void scale(const float* x, float s, float* y, int64_t n) override;
  void sum_rows(const float* x, float* out, int64_t rows, int64_t cols, bool accumulate) override;
  double sum(const float* x, int64_t n) override;
  double sum_squares(const float* x, int64_t n) override;
  void gelu_forward(const float* x, float* y, int64_t n) override;
  void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) override;
  void relu_forward(const float* x, float* y, int64_t n) override;
  void relu_backward(const float* x, const float* dy, float* dx, int64_t n) override;
  void gemm(const Gemm& g) override;
  void layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                          int64_t rows, int64_t cols, float eps) override;
  void layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                           float* dx, float* dw, float* db, int64_t rows, int64_t cols, bool accumulate_dx) override;
  void attention_forward(const float* qkv, float* y, float* probs, int64_t B, int64_t T, int64_t C,
                         int64_t H) override;
  void attention_backward(const float* qkv, const float* probs, const float* dy, float* dqkv, int64_t B, int64_t T,
                          int64_t C, int64_t H) override;
  void attention_decode(const float* q, const float* k, const float* v, float* y, int64_t n, int64_t past, int64_t C,
                        int64_t H) override;
  void embedding_forward(const int32_t* idx, const float* table, float* out, int64_t n, int64_t C,
                         int64_t V) override;
  void embedding_backward(const int32_t* idx, const float* dout, float* dtable, int64_t n, int64_t C) override;
  void cross_entropy_forward(const float* logits, const int32_t* targets, float* probs, float* losses, int64_t N,
                             int64_t V) override;
  void cross_entropy_backward(const float* probs, const int32_t* targets, float dloss, float* dlogits, int64_t N,
                              int64_t V) override;
  void vocab_cross_entropy_stats(const float* logits, const int32_t* targets, int64_t first, float* stats, int64_t N,
                                 int64_t V) override;
  void vocab_cross_entropy_backward(const float* logits, const int32_t* targets, int64_t first, const float* lse,
                                    float dloss, float* dlogits, int64_t N, int64_t V) override;
  void softmax(const float* x, float* y, int64_t rows, int64_t cols) override;
  void adamw(std::span<const AdamWTensor> tensors, const AdamWStep& s) override;
};

}  // namespace tutti::cpu
