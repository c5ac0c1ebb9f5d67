// The narrow interface every device implements: raw memory, copies, and one kernel per op
// (forward and backward). Ops in src/ops validate shapes, allocate outputs and call these with
// raw device pointers; a device added under src/backend/ overrides what it supports, and the
// rest fail with a clear "not implemented on <device>" error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>

#include "tutti/core/device.hpp"
#include "tutti/core/shape.hpp"

namespace tutti {

// A bf16 value as its 16 bits (the upper half of an fp32's): the operands of mixed precision's
// matrix products. Rounding from fp32 is to nearest, ties to even.
struct BFloat16 {
  uint16_t bits;
};

// Row-major GEMM description: C = alpha * op(A) op(B) + beta * C, repeated `batch` times with
// element strides stride_a/b/c between the matrices. A and B are T (fp32, or bf16 for mixed
// precision); the accumulation is fp32, and so is C, unless c_bf16 is set (bf16 operands, beta 0):
// then C is written there, rounded to bf16, and c is not used.
template <class T>
struct GemmOf {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  const T* a = nullptr; int64_t lda = 0;
  const T* b = nullptr; int64_t ldb = 0;
  float* c = nullptr; int64_t ldc = 0;
  int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
  BFloat16* c_bf16 = nullptr;
};
using Gemm = GemmOf<float>;
using GemmBf16 = GemmOf<BFloat16>;

// What a fused GEMM does after the product (row-major terms; P = op(A) op(B), (m, n)):
//   bias       C = P + bias                     bias (n)
//   bias_gelu  aux = P + bias; C = gelu(aux)    GELU in the tanh form, aux (m, n) with ldc, of C's type
//   bias_grad  C = P; bias_grad = the sums of op(B) over k (n): a linear layer's bias gradient
//              from the dW product, dW = x^T g, bias_grad = column sums of g
//   dgelu      C = P * gelu'(aux), aux GELU's input as bias_gelu kept it: the GELU MLP's backward,
//              in the second layer's dx product
// With bias, `residual` (m, n, with ldc, fp32 like C, not C itself) may be added too:
// C = residual + P + bias, a residual block's output in the product that ends the branch.
enum class GemmEpilogue { bias, bias_gelu, bias_grad, dgelu };

template <class T>
struct EpilogueGemmOf {
  GemmOf<T> gemm;  // batch 1 and beta 0 only
  GemmEpilogue epilogue = GemmEpilogue::bias;
  // bias (n) and aux (m, n, with ldc) are fp32, or bf16 where C is written in bf16 (gemm.c_bf16).
  const void* bias = nullptr;
  void* aux = nullptr;
  float* bias_grad = nullptr;
  const float* residual = nullptr;
};

struct AdamWStep {
  float lr, beta1, beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta^t
  float grad_scale;                          // multiplies the gradient first (clipping)
};

// One tensor of an AdamW step: n floats of the parameter, its gradient and moments m and v; weight
// decay (AdamWStep's) on or off; copy, where set: the updated parameter is also written there
// rounded to bf16 (its mixed-precision compute copy, refreshed in the same pass).
struct AdamWTensor {
  float* param;
  const float* grad;
  float *m, *v;
  int64_t n;
  bool decay;
  BFloat16* copy = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual const char* name() const = 0;

  // -- memory and copies --------------------------------------------------------------------
  virtual void* raw_allocate(size_t bytes) = 0;
  virtual void raw_deallocate(void* ptr, size_t bytes) = 0;
  virtual void copy_from_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_on_device(void* dst, const void* src, size_t bytes) = 0;
  // Gathers a strided view (element size `elem`) into a dense buffer.
  virtual void strided_copy(const void* src, const Shape& shape, const Strides& strides, size_t elem, void* dst);
  virtual void synchronize() {}

  // -- element-wise -------------------------------------------------------------------------
  virtual void fill(float* dst, int64_t n, float value);
  virtual void add(const float* a, const float* b, float* out, int64_t outer, int64_t inner);  // b broadcast over outer
  virtual void axpy(float alpha, const float* x, float* y, int64_t n);                       // y += alpha x
  virtual void scale(const float* x, float s, float* y, int64_t n);
  virtual void sum_rows(const float* x, float* out, int64_t rows, int64_t cols, bool accumulate);  // out[c] (+)= sum_r x[r, c]
  virtual double sum(const float* x, int64_t n);
  virtual double sum_squares(const float* x, int64_t n);
  virtual void gelu_forward(const float* x, float* y, int64_t n);
  virtual void gelu_backward(const float* x, const float* dy, float* dx, int64_t n);
  virtual void relu_forward(const float* x, float* y, int64_t n);
  virtual void relu_backward(const float* x, const float* dy, float* dx, int64_t n);

  // -- GEMM ---------------------------------------------------------------------------------
  virtual void gemm(const Gemm& g);
  // A GEMM with its epilogue fused in. Returns false, having done nothing, where this backend has
  // no fused path for the case (the default, the CPU's): the caller then runs the GEMM and the
  // epilogue's own kernels.
  virtual bool gemm_epilogue(const EpilogueGemmOf<float>&) { return false; }
  virtual bool gemm_epilogue_bf16(const EpilogueGemmOf<BFloat16>&) { return false; }

  // -- fused ops ------------------------------------------------------------------------------
  virtual void layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean,
                                  float* rstd, int64_t rows, int64_t cols, float eps);
  // dx written, or added to with accumulate_dx (the gradient of x already holds another
  // consumer's part); dw and db added to.
  virtual void layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd,
                                   const float* dy, float* dx, float* dw, float* db, int64_t rows, int64_t cols,
                                   bool accumulate_dx);
  // qkv (B, T, 3C) -> y (B, T, C); probs (B, H, T, T) kept for backward.
  virtual void attention_forward(const float* qkv, float* y, float* probs, int64_t B, int64_t T, int64_t C, int64_t H);
  virtual void attention_backward(const float* qkv, const float* probs, const float* dy, float* dqkv, int64_t B,
                                  int64_t T, int64_t C, int64_t H);
  // Incremental decoding: q (n, C) for positions past .. past+n-1; k, v (past+n, C) caches.
  // Each new position attends causally to the cache. Writes y (n, C).
  virtual void attention_decode(const float* q, const float* k, const float* v, float* y, int64_t n, int64_t past,
                                int64_t C, int64_t H);
  // A negative index gives a row of zeros and no gradient (rows that another rank of a
  // vocabulary-parallel group holds).
  virtual void embedding_forward(const int32_t* idx, const float* table, float* out, int64_t n, int64_t C, int64_t V);
  virtual void embedding_backward(const int32_t* idx, const float* dout, float* dtable, int64_t n, int64_t C);  // accumulates
  // probs (N, V) = softmax(logits); losses (N) = -log probs[target].
  virtual void cross_entropy_forward(const float* logits, const int32_t* targets, float* probs, float* losses,
                                     int64_t N, int64_t V);
  // dlogits = (probs - onehot(target)) * dloss
  virtual void cross_entropy_backward(const float* probs, const int32_t* targets, float dloss, float* dlogits,
                                      int64_t N, int64_t V);
  // The fused form, where a backend has it (fused_cross_entropy()): no probabilities are written;
  // stats (N, 2) gets per row the max and log sum exp(x - max), losses as above. The backward
  // recomputes softmax from the logits: dlogits = (softmax - onehot(target)) * dloss.
  virtual bool fused_cross_entropy() const { return false; }
  virtual void cross_entropy_stats(const float* logits, const int32_t* targets, float* stats, float* losses,
                                   int64_t N, int64_t V);
  virtual void cross_entropy_backward_from_stats(const float* logits, const int32_t* targets, const float* stats,
                                                 float dloss, float* dlogits, int64_t N, int64_t V);
  // The same on bf16 logits (mixed precision's LM head writes them): statistics and losses in
  // fp32, dlogits rounded to bf16 (what the head's backward products read).
  virtual void cross_entropy_stats_bf16(const BFloat16* logits, const int32_t* targets, float* stats, float* losses,
                                        int64_t N, int64_t V);
  virtual void cross_entropy_backward_from_stats_bf16(const BFloat16* logits, const int32_t* targets,
                                                      const float* stats, float dloss, BFloat16* dlogits, int64_t N,
                                                      int64_t V);
  // Vocabulary-parallel cross-entropy, this rank's part: logits (N, V) are columns [first, first + V)
  // of the full vocabulary. stats (N, 3) gets per row the max, the sum of exp(x - max), and the
  // target's logit (0 when the target is another rank's).
  virtual void vocab_cross_entropy_stats(const float* logits, const int32_t* targets, int64_t first, float* stats,
                                         int64_t N, int64_t V);
  // dlogits = (exp(x - lse[row]) - onehot(target - first)) * dloss, lse the full rows' log-sum-exp.
  virtual void vocab_cross_entropy_backward(const float* logits, const int32_t* targets, int64_t first,
                                            const float* lse, float dloss, float* dlogits, int64_t N, int64_t V);
  virtual void softmax(const float* x, float* y, int64_t rows, int64_t cols);
  // AdamW as PyTorch's over every tensor (CUDA: in one launch).
  virtual void adamw(std::span<const AdamWTensor> tensors, const AdamWStep& s);

  // -- mixed precision: bf16 operands, fp32 accumulation and results -------------------------
  virtual void to_bf16(const float* x, BFloat16* y, int64_t n);  // round to nearest even
  // to_bf16 of x (rows, cols) and sum_rows of x (the unrounded values) in one pass: a gradient
  // rounded for the products after it, and its bias's gradient.
  virtual void to_bf16_sum_rows(const float* x, BFloat16* y, float* sums, int64_t rows, int64_t cols);
  // sums[c] = sum_r x[r, c] of a bf16 x (rows, cols), in fp32: a bf16 gradient's bias gradient.
  virtual void sum_rows_bf16(const BFloat16* x, float* sums, int64_t rows, int64_t cols);
  // gelu_backward's dx rounded to bf16 in the same pass (what the products after it read).
  virtual void gelu_backward_bf16(const float* x, const float* dy, BFloat16* dx, int64_t n);
  // The same from GELU's input kept in bf16 (a product wrote it so: bias_gelu with a bf16 C).
  virtual void gelu_backward_bf16(const BFloat16* x, const float* dy, BFloat16* dx, int64_t n);
  // layer_norm_forward with y rounded to bf16 in the same pass (y only feeds matrix products).
  virtual void layer_norm_forward_bf16(const float* x, const float* w, const float* b, BFloat16* y, float* mean,
                                       float* rstd, int64_t rows, int64_t cols, float eps);
  // layer_norm_backward, and dx as written (the sum where accumulate_dx) rounded into dx_bf16 and
  // summed down the columns into dx_sums: the residual stream's gradient ready for the products and
  // the bias before it (to_bf16_sum_rows of dx, in the same pass where the backend can).
  virtual void layer_norm_backward_bf16(const float* x, const float* w, const float* mean, const float* rstd,
                                        const float* dy, float* dx, float* dw, float* db, BFloat16* dx_bf16,
                                        float* dx_sums, int64_t rows, int64_t cols, bool accumulate_dx);
  virtual void gemm_bf16(const GemmBf16& g);
  // attention_forward / backward with the matrix products in bf16: qkv rounded to bf16 by the
  // caller, probs (B, H, T, T) kept in bf16; scores, softmax statistics, y and dqkv in fp32.
  virtual void attention_forward_bf16(const BFloat16* qkv, float* y, BFloat16* probs, int64_t B, int64_t T, int64_t C,
                                      int64_t H);
  virtual void attention_backward_bf16(const BFloat16* qkv, const BFloat16* probs, const float* dy, float* dqkv,
                                       int64_t B, int64_t T, int64_t C, int64_t H);
  // Flash attention in bf16: no (T, T) matrix in memory. Forward writes y (B, T, C) in bf16 and
  // keeps lse (B, H, T), each row's log-sum-exp (in the units of the backend's kernels for the
  // shape), from which backward recomputes the probabilities; backward also reads the forward's y
  // and dy, both bf16, and writes dqkv (B, T, 3C) in bf16. Only for shapes flash_attention_supports
  // accepts, and the backward of a shape only on its own forward's lse; the backend may require
  // aligned pointers (CUDA: those of the caching allocator are).
  virtual bool flash_attention_supports(int64_t B, int64_t T, int64_t C, int64_t H) const;
  virtual void flash_attention_forward(const BFloat16* qkv, BFloat16* y, float* lse, int64_t B, int64_t T, int64_t C,
                                       int64_t H);
  virtual void flash_attention_backward(const BFloat16* qkv, const BFloat16* y, const float* lse, const BFloat16* dy,
                                        BFloat16* dqkv, int64_t B, int64_t T, int64_t C, int64_t H);
};

// The backend of a device (cpu always; cuda when built with it and a GPU is present).
Backend& backend_for(Device device);

}  // namespace tutti
