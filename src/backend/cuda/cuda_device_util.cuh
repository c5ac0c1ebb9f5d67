// Device-side helpers shared by tutti's kernel files (cuda_kernels.cu, cuda_bf16_kernels.cu,
// cuda_layernorm.cu, ...): grid sizing, grid-stride indices, block-wide reductions, a row's softmax
// statistics, bf16 rounding. CUDA sources only (it needs nvcc); includes no tutti header.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_kernels.cuh"

namespace tutti::cuda::kernels::device {

constexpr int kThreads = 256;
// Grid-stride loops get this many blocks per multiprocessor at most: several waves of 256-thread
// blocks keep enough loads in flight, and a fixed cap keeps the reductions' partials bounded.
constexpr int kBlocksPerSm = 8;

inline unsigned grid_for(int64_t n, const LaunchLimits& lim) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(std::max(lim.multiprocessors, 1)) * kBlocksPerSm * 4;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(blockDim.x) * gridDim.x; }

// Threads per block for kernels that give one block to each row of `cols` elements.
inline int row_threads(int64_t cols) {
  if (cols >= 4096) return 512;
  if (cols >= 1024) return 256;
  if (cols >= 256) return 128;
  return 32;
}

// A grid of one block per row needs rows < 2^31.
inline bool rows_fit(int64_t rows) { return rows <= 0x7fffffff; }

// ------------------------------------------------------------------------------------------------
// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the result.

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class T, class Op>
__device__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T shared[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : identity;
    v = warp_reduce(v, op);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const T result = shared[0];
  __syncthreads();  // the next call may overwrite shared[]
  return result;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, SumOp{}, 0.0f); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, MaxOp{}, -INFINITY); }

// A row's max and sum of exp(x - max), on every thread of the block (one block per row).
__device__ __forceinline__ void row_max_and_exp_sum(const float* xr, int64_t V, float& mx, float& total) {
  mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, xr[j]);
  mx = block_max(mx);
  total = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) total += expf(xr[j] - mx);
  total = block_sum(total);
}

// GELU, tanh form: y = x/2 (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi); its derivative
// dy/dx = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3 * 0.044715 x^2), t = tanh(k (x + 0.044715 x^3)).
// Shared so that the fp32 and the bf16-writing backward compute the same value.
constexpr float kGeluK = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;
__device__ __forceinline__ float gelu_grad(float x) {
  const float t = tanhf(kGeluK * (x + kGeluC * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluK * (1.0f + 3.0f * kGeluC * x * x);
}

// fp32 -> bf16 bits, rounded to nearest even (bit for bit the host's rounding: CudaBf16 tests), and
// back. Every kernel that writes bf16 rounds through bits_of.
__device__ __forceinline__ uint16_t bits_of(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float value_of(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
// Two values rounded into one 32-bit word (lo in the low half), four into 8 bytes: what a
// vectorised bf16 store writes.
__device__ __forceinline__ uint32_t bits_of2(float lo, float hi) {
  return uint32_t{bits_of(lo)} | uint32_t{bits_of(hi)} << 16;
}
__device__ __forceinline__ uint2 bits_of4(float4 v) { return make_uint2(bits_of2(v.x, v.y), bits_of2(v.z, v.w)); }
// One element of fp32 or of bf16 (its bits) as fp32.
__device__ __forceinline__ float load1(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load1(const uint16_t* p, int64_t i) { return value_of(p[i]); }

}  // namespace tutti::cuda::kernels::device
