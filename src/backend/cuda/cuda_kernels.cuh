// Launchers of tutti's own CUDA kernels, callable from host C++ (cuda_backend.cpp). Each enqueues
// its kernel(s) on `stream` and returns the launch status (cudaGetLastError), which the caller
// checks with CUDA_CHECK. Pointers are device pointers; sizes are element counts. Kernel bodies
// are in cuda_kernels.cu, cuda_bf16_kernels.cu, cuda_xent_kernels.cu, cuda_layernorm.cu and
// cuda_flash_attention.cu, which include no tutti header, so they build as C++17 under any nvcc.
// Letters: N rows, V vocabulary, B batch, H heads, T time.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tutti::cuda::kernels {

constexpr int kMaxDims = 6;  // == tutti::kMaxDims (checked in cuda_backend.cpp)

// A strided view's geometry, passed to the kernel by value.
struct StridedLayout {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];
};

// Whether p is a multiple of `bytes` (what a vector access of that width needs); host side, for
// the launchers and the backend.
inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Limits read once per device, used to size grids.
struct LaunchLimits {
  int multiprocessors;
};

// Adam(W) hyper-parameters of one step, already folded (see AdamWStep in backend.hpp).
struct AdamWFolded {
  float beta1, beta2, eps, decay, step, inv_sqrt_bc2, grad_scale;
};

// -- copies and element-wise ---------------------------------------------------------------------
cudaError_t strided_copy(const void* src, const StridedLayout& layout, int64_t total, size_t elem, void* dst,
                         const LaunchLimits& lim, cudaStream_t stream);
cudaError_t fill(float* dst, int64_t n, float value, const LaunchLimits& lim, cudaStream_t stream);
cudaError_t add(const float* a, const float* b, float* out, int64_t outer, int64_t inner, const LaunchLimits& lim,
                cudaStream_t stream);
cudaError_t axpy(float alpha, const float* x, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream);
cudaError_t scale(const float* x, float s, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream);
cudaError_t gelu_forward(const float* x, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream);
cudaError_t gelu_backward(const float* x, const float* dy, float* dx, int64_t n, const LaunchLimits& lim,
                          cudaStream_t stream);
cudaError_t relu_forward(const float* x, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream);
cudaError_t relu_backward(const float* x, const float* dy, float* dx, int64_t n, const LaunchLimits& lim,
                          cudaStream_t stream);
// One tensor of a multi-tensor AdamW launch, in a table in device memory. Blocks first_block ..
// first_block + ceil(n / kAdamWChunk) - 1 update it; decay: AdamWFolded::decay applies; vec: the
// four float pointers 16-byte aligned and copy (or null) 8-byte aligned (float4 accesses).
struct AdamWSlice {
  float* param;
  const float* grad;
  float *m, *v;
  uint16_t* copy;  // bf16 bits of the updated parameter, or null
  int64_t n, first_block;
  bool decay, vec;
};
constexpr int64_t kAdamWChunk = 4096;  // elements per block
// Every tensor of `table` (count entries, device memory), `blocks` blocks in all.
cudaError_t adamw(const AdamWSlice* table, int count, int64_t blocks, const AdamWFolded& s, cudaStream_t stream);
// C (m, n), row stride ldc, `batch` matrices stride_c apart: C *= beta (C = 0 when beta == 0).
// The k == 0 case of a GEMM, which cuBLAS rejects through its leading-dimension checks.
cudaError_t scale_matrices(float* c, int64_t m, int64_t n, int64_t ldc, int64_t stride_c, int64_t batch, float beta,
                           const LaunchLimits& lim, cudaStream_t stream);

// -- reductions ---------------------------------------------------------------------------------
// Deterministic: a fixed grid writes per-block partials to `workspace`, one block sums them.
// Workspace sizes (in bytes) come from the *_workspace_bytes functions.
size_t sum_workspace_bytes(int64_t n, const LaunchLimits& lim);
// result (one double, device memory) = sum x or sum x^2, accumulated in double.
cudaError_t sum(const float* x, int64_t n, bool squares, double* result, void* workspace, const LaunchLimits& lim,
                cudaStream_t stream);
size_t sum_rows_workspace_bytes(int64_t rows, int64_t cols, const LaunchLimits& lim);
// out[c] (+)= sum_r x[r, c]
cudaError_t sum_rows(const float* x, float* out, int64_t rows, int64_t cols, bool accumulate, void* workspace,
                     const LaunchLimits& lim, cudaStream_t stream);

size_t column_sum_vec_workspace_bytes(int64_t rows, int64_t cols, const LaunchLimits& lim);
// y = bf16(x) (round to nearest even) and sums[c] = sum_r x[r, c] (of the unrounded x), one pass.
cudaError_t to_bf16_sum_rows(const float* x, uint16_t* y, float* sums, int64_t rows, int64_t cols, void* workspace,
                             const LaunchLimits& lim, cudaStream_t stream);
// sums[c] = sum_r x[r, c] of a bf16 x, in fp32.
cudaError_t sum_rows_bf16(const uint16_t* x, float* sums, int64_t rows, int64_t cols, void* workspace,
                          const LaunchLimits& lim, cudaStream_t stream);

// -- row-wise fused ops -------------------------------------------------------------------------
cudaError_t softmax(const float* x, float* y, int64_t rows, int64_t cols, cudaStream_t stream);
cudaError_t cross_entropy_forward(const float* logits, const int32_t* targets, float* probs, float* losses, int64_t N,
                                  int64_t V, cudaStream_t stream);
cudaError_t cross_entropy_backward(const float* probs, const int32_t* targets, float dloss, float* dlogits, int64_t N,
                                   int64_t V, const LaunchLimits& lim, cudaStream_t stream);
// Fused cross-entropy (cuda_xent_kernels.cu), no probabilities kept: stats (N, 2) = per row max and
// log sum exp(x - max); losses as cross_entropy_forward's. The backward writes
// dlogits = (exp(x - max - log_sum) - onehot(target)) * dloss; dlogits may be logits (in place).
cudaError_t cross_entropy_stats(const float* logits, const int32_t* targets, float* stats, float* losses, int64_t N,
                                int64_t V, cudaStream_t stream);
cudaError_t cross_entropy_backward_from_stats(const float* logits, const int32_t* targets, const float* stats,
                                              float dloss, float* dlogits, int64_t N, int64_t V, cudaStream_t stream);
// The same on bf16 logits (their bits), dlogits written in bf16.
cudaError_t cross_entropy_stats_bf16(const uint16_t* logits, const int32_t* targets, float* stats, float* losses,
                                     int64_t N, int64_t V, cudaStream_t stream);
cudaError_t cross_entropy_backward_from_stats_bf16(const uint16_t* logits, const int32_t* targets, const float* stats,
                                                   float dloss, uint16_t* dlogits, int64_t N, int64_t V,
                                                   cudaStream_t stream);
// Vocabulary-parallel cross-entropy, this rank's columns [first, first + V): stats (N, 3) = per row
// max, sum of exp(x - max), the target's logit (0 when another rank's); backward as the CPU's.
cudaError_t vocab_cross_entropy_stats(const float* logits, const int32_t* targets, int64_t first, float* stats,
                                      int64_t N, int64_t V, cudaStream_t stream);
cudaError_t vocab_cross_entropy_backward(const float* logits, const int32_t* targets, int64_t first, const float* lse,
                                         float dloss, float* dlogits, int64_t N, int64_t V, const LaunchLimits& lim,
                                         cudaStream_t stream);
// LayerNorm (cuda_layernorm.cu), x, y, dy, dx (N, C); w, b, dw, db (C); mean, rstd (N):
// y = (x - mean) rstd w + b, rstd = 1 / sqrt(biased variance + eps).
cudaError_t layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                               int64_t rows, int64_t cols, float eps, cudaStream_t stream);
// The same with y rounded to bf16 (nearest even); mean and rstd bit for bit layer_norm_forward's.
cudaError_t layer_norm_forward_bf16(const float* x, const float* w, const float* b, uint16_t* y, float* mean,
                                    float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream);
size_t layer_norm_backward_workspace_bytes(int64_t rows, int64_t cols, const LaunchLimits& lim);
// Whether layer_norm_backward takes dx_bf16 at this width (the rows held in registers: C <= 4096).
bool layer_norm_backward_rounds(int64_t cols);
// dx written (accumulate_dx: added to), dw and db accumulated (+=), as on the CPU; dw and db summed
// in a fixed order. dx_bf16 non-null: dx as written also rounded into dx_bf16 (C, nearest even)
// and summed down the columns into dx_sums (fixed order).
cudaError_t layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                                float* dx, float* dw, float* db, uint16_t* dx_bf16, float* dx_sums, int64_t rows,
                                int64_t cols, bool accumulate_dx, void* workspace, const LaunchLimits& lim,
                                cudaStream_t stream);
// out (n, C) = table[idx]; a row whose index is outside [0, V) comes out NaN (the GPU cannot throw).
cudaError_t embedding_forward(const int32_t* idx, const float* table, float* out, int64_t n, int64_t C, int64_t V,
                              const LaunchLimits& lim, cudaStream_t stream);
// dtable[idx[i]] += dout[i] with atomicAdd: the order of additions to a repeated row is not fixed.
cudaError_t embedding_backward(const int32_t* idx, const float* dout, float* dtable, int64_t n, int64_t C,
                               const LaunchLimits& lim, cudaStream_t stream);

// -- causal attention pieces (the matrix products go through cuBLAS) ------------------------------
// Each of `rows` rows of `len` scores is row i = (r mod rows_per_matrix) of a score matrix whose
// query sits at position past + i: softmax in place over keys 0..past+i, zeros after. Training
// passes (T, T, 0); decoding against a cache passes (n, past + n, past).
cudaError_t causal_softmax(float* scores, int64_t rows, int64_t rows_per_matrix, int64_t len, int64_t past,
                           cudaStream_t stream);
// dprobs (in) -> dscores (out, in place): scale * P * (dP - sum_j P dP), zero above the diagonal.
cudaError_t causal_softmax_backward(const float* probs, float* dprobs, int64_t rows, int64_t T, float scale,
                                    cudaStream_t stream);

// -- mixed precision (cuda_bf16_kernels.cu); bf16 values travel as their 16 bits -----------------
// y = bf16(x), rounded to nearest even.
cudaError_t to_bf16(const float* x, uint16_t* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream);
// dx = bf16(gelu'(x) dy): gelu_backward and to_bf16 in one pass.
cudaError_t gelu_backward_bf16(const float* x, const float* dy, uint16_t* dx, int64_t n, const LaunchLimits& lim,
                               cudaStream_t stream);
cudaError_t gelu_backward_bf16(const uint16_t* x, const float* dy, uint16_t* dx, int64_t n, const LaunchLimits& lim,
                               cudaStream_t stream);
// causal_softmax of training (T, T) score rows, past = 0: fp32 scores in, bf16 probabilities out.
cudaError_t causal_softmax_bf16(const float* scores, uint16_t* probs, int64_t rows, int64_t T, cudaStream_t stream);
// causal_softmax_backward with bf16 probabilities and a bf16 result dscores (not in place).
cudaError_t causal_softmax_backward_bf16(const uint16_t* probs, const float* dprobs, uint16_t* dscores, int64_t rows,
                                         int64_t T, float scale, cudaStream_t stream);

// -- causal flash attention in bf16 (cuda_flash_attention.cu) -------------------------------------
// qkv (B, T, 3C) bf16 with heads of kFlashHeadDim (C = H * 64); B * H <= 65535. Every row of qkv,
// y and dqkv is then a multiple of 16 bytes (3C and C bf16), so alignment is the base pointers':
// flash_attention_aligned. Other shapes or pointers return cudaErrorInvalidValue (callers check
// flash_attention_fits and flash_attention_aligned first).
constexpr int kFlashHeadDim = 64;
static_assert(kFlashHeadDim % 8 == 0, "the flash kernels copy rows of bf16 16 bytes at a time");
inline bool flash_attention_fits(int64_t B, int64_t C, int64_t H) {
  return H > 0 && C == H * kFlashHeadDim && C % 8 == 0 && B * H <= 65535;
}
// The base alignment the kernels need: 16 bytes for qkv, dy and dqkv (rows copied by cp.async), 4
// for y (bf16 pairs). A null pointer passes (the forward has no dy, dqkv).
// Tensors of tutti's caching allocator start 256-byte aligned (one cudaMalloc block each).
inline bool flash_attention_aligned(const void* qkv, const void* y, const void* dy = nullptr,
                                    const void* dqkv = nullptr) {
  return aligned(qkv, 16) && aligned(y, 4) && aligned(dy, 16) && aligned(dqkv, 16);
}
// y (B, T, C) bf16, rounded once from fp32; lse (B, H, T) fp32: each row's log2-sum-exp2 of the
// scores times log2(e).
cudaError_t flash_attention_forward(const uint16_t* qkv, uint16_t* y, float* lse, int64_t B, int64_t T, int64_t C,
                                    int64_t H, cudaStream_t stream);
// From the forward's qkv, y (bf16) and lse, and dy (B, T, C) bf16: dqkv (B, T, 3C) bf16, every
// element written. Scratch: dq_acc (B, H, T, 64), 16-byte aligned, and dvec (B, H, T), fp32; the
// launcher zeroes dq_acc.
cudaError_t flash_attention_backward(const uint16_t* qkv, const uint16_t* y, const float* lse, const uint16_t* dy,
                                     uint16_t* dqkv, float* dq_acc, float* dvec, int64_t B, int64_t T, int64_t C,
                                     int64_t H, const LaunchLimits& lim, cudaStream_t stream);

}  // namespace tutti::cuda::kernels
