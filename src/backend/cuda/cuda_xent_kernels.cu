// The fused cross-entropy: the probabilities are never written. The forward reads each row of
// logits once (an online softmax: a running max and a sum of exp rescaled when the max moves) and
// writes the row's loss and its statistics (max, log sum exp(x - max)); the backward recomputes
// softmax from the logits and those statistics and writes dlogits = (softmax - onehot) * dloss.
// Bytes: forward N V 4 read, backward N V 4 read + N V 4 written (the unfused pair moved 6 N V 4).
// Rows go to blocks; a row whose start is aligned (V a multiple of 4) moves 4 elements per access.
// The logits are fp32 or bf16 (mixed precision's LM head writes bf16: half the bytes), and the
// gradient is written in the logits' type; the statistics and the arithmetic are fp32 either way.
// Letters: N rows, V vocabulary.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_device_util.cuh"
#include "backend/cuda/cuda_kernels.cuh"

namespace tutti::cuda::kernels {
namespace {

using namespace device;

// Loads of 4 elements each thread issues before it folds them into its running (max, sum).
constexpr int kLoadsInFlight = 4;

// Element access for fp32 (float) and bf16 (uint16_t, its bits): one element (load1 of
// cuda_device_util.cuh), or 4 at index q of a row viewed as groups of 4 (16 bytes of fp32, 8 of
// bf16), streamed past the cache.
__device__ __forceinline__ void store1(float* p, int64_t j, float v) { p[j] = v; }
__device__ __forceinline__ void store1(uint16_t* p, int64_t j, float v) { p[j] = bits_of(v); }
__device__ __forceinline__ float4 load4(const float* p, int64_t q) { return __ldcs(reinterpret_cast<const float4*>(p) + q); }
__device__ __forceinline__ float4 load4(const uint16_t* p, int64_t q) {
  const uint2 u = __ldcs(reinterpret_cast<const uint2*>(p) + q);
  return {__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
          __uint_as_float(u.y & 0xffff0000u)};
}
__device__ __forceinline__ void store4(float* p, int64_t q, float4 v) { __stcs(reinterpret_cast<float4*>(p) + q, v); }
__device__ __forceinline__ void store4(uint16_t* p, int64_t q, float4 v) {
  __stcs(reinterpret_cast<uint2*>(p) + q, bits_of4(v));
}

// A running softmax statistic: m the max seen, s the sum of exp(x - m).
struct MaxSum {
  float m;
  float s;
};

// Merge two statistics. A side that saw nothing (m = -inf) adds nothing, which keeps
// exp(-inf - -inf) = NaN out.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Fold k values into a statistic: one rescale per group, not per element.
__device__ __forceinline__ MaxSum fold(MaxSum acc, const float* v, int k) {
  float local = -INFINITY;
  for (int i = 0; i < k; ++i) local = fmaxf(local, v[i]);
  if (local == -INFINITY) return acc;
  const float m = fmaxf(acc.m, local);
  float s = acc.m == -INFINITY ? 0.0f : acc.s * expf(acc.m - m);
  for (int i = 0; i < k; ++i) s += expf(v[i] - m);
  return {m, s};
}

__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum shared[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// This thread's statistic over a row of V elements; 4 per load when `vec` (row aligned).
template <class T>
__device__ MaxSum thread_row_stats(const T* xr, int64_t V, bool vec) {
  MaxSum acc{-INFINITY, 0.0f};
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = V / 4, step = static_cast<int64_t>(blockDim.x) * kLoadsInFlight;
    int64_t q = threadIdx.x;
    for (; q + (kLoadsInFlight - 1) * blockDim.x < n4; q += step) {
      float v[4 * kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const float4 f = load4(xr, q + u * blockDim.x);  // read once here: stream past the cache
        v[4 * u] = f.x, v[4 * u + 1] = f.y, v[4 * u + 2] = f.z, v[4 * u + 3] = f.w;
      }
      acc = fold(acc, v, 4 * kLoadsInFlight);
    }
    for (; q < n4; q += blockDim.x) {
      const float4 f = load4(xr, q);
      const float v[4] = {f.x, f.y, f.z, f.w};
      acc = fold(acc, v, 4);
    }
    done = n4 * 4;
  }
  for (int64_t j = done + threadIdx.x; j < V; j += blockDim.x) {
    const float v = load1(xr, j);
    acc = fold(acc, &v, 1);
  }
  return acc;
}

// losses[r] = log sum exp(x - max) + max - x[target] (NaN for a bad target, as the unfused kernel);
// stats (N, 2) = (max, log sum exp(x - max)).
template <class T>
__global__ void xent_stats_kernel(const T* logits, const int32_t* targets, float* stats, float* losses, int64_t V,
                                  bool vec) {
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * V;
  const MaxSum st = block_merge(thread_row_stats(xr, V, vec));
  if (threadIdx.x == 0) {
    const float log_sum = logf(st.s);
    const int64_t t = targets[row];
    stats[2 * row] = st.m;
    stats[2 * row + 1] = log_sum;
    losses[row] = (t >= 0 && t < V) ? log_sum + st.m - load1(xr, t) : NAN;
  }
}

struct RowGrad {  // one row's gradient: exp(x - max - log_sum) dloss, minus dloss at the target
  float m, log_sum, dloss;
  int64_t t;
  __device__ __forceinline__ float operator()(float x, int64_t j) const {
    return expf(x - m - log_sum) * dloss - (j == t ? dloss : 0.0f);
  }
  __device__ __forceinline__ float4 operator()(float4 x, int64_t q) const {
    return {(*this)(x.x, 4 * q), (*this)(x.y, 4 * q + 1), (*this)(x.z, 4 * q + 2), (*this)(x.w, 4 * q + 3)};
  }
};

// dlogits may be logits (in place): each thread writes only what it has read itself. The loads of
// a group go out before its stores, which the compiler could not arrange across possibly
// aliasing pointers.
template <class T>
__global__ void xent_backward_kernel(const T* logits, const int32_t* targets, const float* stats, float dloss,
                                     T* dlogits, int64_t V, bool vec) {
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * V;
  T* dr = dlogits + row * V;
  const RowGrad grad{stats[2 * row], stats[2 * row + 1], dloss, targets[row]};
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = V / 4, step = static_cast<int64_t>(blockDim.x) * kLoadsInFlight;
    int64_t q = threadIdx.x;
    for (; q + (kLoadsInFlight - 1) * blockDim.x < n4; q += step) {
      float4 x[kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) x[u] = load4(xr, q + u * blockDim.x);
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) store4(dr, q + u * blockDim.x, grad(x[u], q + u * blockDim.x));
    }
    for (; q < n4; q += blockDim.x) store4(dr, q, grad(load4(xr, q), q));
    done = n4 * 4;
  }
  for (int64_t j = done + threadIdx.x; j < V; j += blockDim.x) store1(dr, j, grad(load1(xr, j), j));
}

// Rows start on a 4-element boundary of an aligned buffer: 16 bytes for fp32, 8 for bf16.
template <class T>
bool rows_aligned(const T* p, int64_t V) {
  return V % 4 == 0 && aligned(p, 4 * sizeof(T));
}

template <class T>
cudaError_t stats(const T* logits, const int32_t* targets, float* stats, float* losses, int64_t N, int64_t V,
                  cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (!rows_fit(N)) return cudaErrorInvalidValue;
  xent_stats_kernel<<<static_cast<unsigned>(N), row_threads(V), 0, stream>>>(logits, targets, stats, losses, V,
                                                                             rows_aligned(logits, V));
  return cudaGetLastError();
}

template <class T>
cudaError_t backward(const T* logits, const int32_t* targets, const float* stats, float dloss, T* dlogits, int64_t N,
                     int64_t V, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (!rows_fit(N)) return cudaErrorInvalidValue;
  const bool vec = rows_aligned(logits, V) && rows_aligned(dlogits, V);
  xent_backward_kernel<<<static_cast<unsigned>(N), row_threads(V), 0, stream>>>(logits, targets, stats, dloss,
                                                                                dlogits, V, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_stats(const float* logits, const int32_t* targets, float* stats_out, float* losses, int64_t N,
                                int64_t V, cudaStream_t stream) {
  return stats(logits, targets, stats_out, losses, N, V, stream);
}
cudaError_t cross_entropy_stats_bf16(const uint16_t* logits, const int32_t* targets, float* stats_out, float* losses,
                                     int64_t N, int64_t V, cudaStream_t stream) {
  return stats(logits, targets, stats_out, losses, N, V, stream);
}
cudaError_t cross_entropy_backward_from_stats(const float* logits, const int32_t* targets, const float* stats,
                                              float dloss, float* dlogits, int64_t N, int64_t V, cudaStream_t stream) {
  return backward(logits, targets, stats, dloss, dlogits, N, V, stream);
}
cudaError_t cross_entropy_backward_from_stats_bf16(const uint16_t* logits, const int32_t* targets, const float* stats,
                                                   float dloss, uint16_t* dlogits, int64_t N, int64_t V,
                                                   cudaStream_t stream) {
  return backward(logits, targets, stats, dloss, dlogits, N, V, stream);
}

}  // namespace tutti::cuda::kernels
