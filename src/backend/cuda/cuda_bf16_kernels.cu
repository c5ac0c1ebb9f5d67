// Mixed precision's own kernels: rounding fp32 to bf16, and the causal-attention softmax whose
// probabilities (and their gradient) are kept in bf16 for the bf16 matrix products around them.
// Statistics (row max, sum of exponentials, the backward's dot product) stay in fp32.
// Letters: T time.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_device_util.cuh"
#include "backend/cuda/cuda_kernels.cuh"

namespace tutti::cuda::kernels {
namespace {

using namespace device;

// y = bf16(x). Aligned pointers move four elements per thread and access (16 bytes in, 8 out).
__global__ void to_bf16_kernel(const float* x, uint16_t* y, int64_t n, bool vectorized) {
  int64_t start = 0;
  if (vectorized) {
    const int64_t n4 = n / 4;
    for (int64_t q = global_thread(); q < n4; q += grid_threads()) {
      reinterpret_cast<uint2*>(y)[q] = bits_of4(reinterpret_cast<const float4*>(x)[q]);
    }
    start = n4 * 4;
  }
  for (int64_t i = start + global_thread(); i < n; i += grid_threads()) y[i] = bits_of(x[i]);
}

// dx = bf16(gelu'(x) dy), x fp32 or bf16 (its bits); aligned pointers move four elements per
// thread, as to_bf16_kernel.
__device__ __forceinline__ float4 load4(const float* x, int64_t q) { return reinterpret_cast<const float4*>(x)[q]; }
__device__ __forceinline__ float4 load4(const uint16_t* x, int64_t q) {
  const uint2 u = reinterpret_cast<const uint2*>(x)[q];
  return {value_of(uint16_t(u.x)), value_of(uint16_t(u.x >> 16)), value_of(uint16_t(u.y)), value_of(uint16_t(u.y >> 16))};
}

template <class T>
__global__ void gelu_backward_bf16_kernel(const T* x, const float* dy, uint16_t* dx, int64_t n, bool vectorized) {
  int64_t start = 0;
  if (vectorized) {
    const int64_t n4 = n / 4;
    for (int64_t q = global_thread(); q < n4; q += grid_threads()) {
      const float4 v = load4(x, q), d = reinterpret_cast<const float4*>(dy)[q];
      reinterpret_cast<uint2*>(dx)[q] = bits_of4(
          make_float4(gelu_grad(v.x) * d.x, gelu_grad(v.y) * d.y, gelu_grad(v.z) * d.z, gelu_grad(v.w) * d.w));
    }
    start = n4 * 4;
  }
  for (int64_t i = start + global_thread(); i < n; i += grid_threads()) dx[i] = bits_of(gelu_grad(load1(x, i)) * dy[i]);
}

// Row r of the (T, T) score matrices holds query i = r mod T: probs over keys 0..i, zeros after.
__global__ void causal_softmax_bf16_kernel(const float* scores, uint16_t* probs, int64_t T) {
  const int64_t row = blockIdx.x, n = row % T + 1;
  const float* s = scores + row * T;
  uint16_t* p = probs + row * T;
  float mx, total;
  row_max_and_exp_sum(s, n, mx, total);
  const float inv = 1.0f / total;
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) p[j] = bits_of(j < n ? expf(s[j] - mx) * inv : 0.0f);
}

// dscores = scale * P * (dP - sum_j P dP), zero above the diagonal.
__global__ void causal_softmax_backward_bf16_kernel(const uint16_t* probs, const float* dprobs, uint16_t* dscores,
                                                    int64_t T, float scale) {
  const int64_t row = blockIdx.x, n = row % T + 1;
  const uint16_t* p = probs + row * T;
  const float* d = dprobs + row * T;
  uint16_t* out = dscores + row * T;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += value_of(p[j]) * d[j];
  dot = block_sum(dot);
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x)
    out[j] = bits_of(j < n ? scale * value_of(p[j]) * (d[j] - dot) : 0.0f);
}

template <class T>
cudaError_t gelu_backward_bf16_launch(const T* x, const float* dy, uint16_t* dx, int64_t n, const LaunchLimits& lim,
                                      cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vectorized = aligned(x, 4 * sizeof(T)) && aligned(dy, 16) && aligned(dx, 8);
  gelu_backward_bf16_kernel<<<grid_for(vectorized ? (n + 3) / 4 : n, lim), kThreads, 0, stream>>>(x, dy, dx, n,
                                                                                                  vectorized);
  return cudaGetLastError();
}

}  // namespace

// ================================================================================================
// Launchers

cudaError_t to_bf16(const float* x, uint16_t* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vectorized = aligned(x, 16) && aligned(y, 8);
  to_bf16_kernel<<<grid_for(vectorized ? (n + 3) / 4 : n, lim), kThreads, 0, stream>>>(x, y, n, vectorized);
  return cudaGetLastError();
}

cudaError_t gelu_backward_bf16(const float* x, const float* dy, uint16_t* dx, int64_t n, const LaunchLimits& lim,
                               cudaStream_t stream) {
  return gelu_backward_bf16_launch(x, dy, dx, n, lim, stream);
}
cudaError_t gelu_backward_bf16(const uint16_t* x, const float* dy, uint16_t* dx, int64_t n, const LaunchLimits& lim,
                               cudaStream_t stream) {
  return gelu_backward_bf16_launch(x, dy, dx, n, lim, stream);
}

cudaError_t causal_softmax_bf16(const float* scores, uint16_t* probs, int64_t rows, int64_t T, cudaStream_t stream) {
  if (rows <= 0 || T <= 0) return cudaSuccess;
  if (!rows_fit(rows)) return cudaErrorInvalidValue;
  causal_softmax_bf16_kernel<<<static_cast<unsigned>(rows), row_threads(T), 0, stream>>>(scores, probs, T);
  return cudaGetLastError();
}

cudaError_t causal_softmax_backward_bf16(const uint16_t* probs, const float* dprobs, uint16_t* dscores, int64_t rows,
                                         int64_t T, float scale, cudaStream_t stream) {
  if (rows <= 0 || T <= 0) return cudaSuccess;
  if (!rows_fit(rows)) return cudaErrorInvalidValue;
  causal_softmax_backward_bf16_kernel<<<static_cast<unsigned>(rows), row_threads(T), 0, stream>>>(probs, dprobs,
                                                                                                   dscores, T, scale);
  return cudaGetLastError();
}

}  // namespace tutti::cuda::kernels
