// tutti's own CUDA kernels: element-wise loops, deterministic reductions and the row-wise fused ops
// (softmax, cross-entropy, the causal-attention softmax; LayerNorm is in cuda_layernorm.cu).
// Matrix products are not here: they go through cuBLAS in cuda_backend.cpp. Every formula matches
// the CPU backend's (src/backend/cpu/cpu_backend.cpp), which is the reference the tests compare
// against.
// Letters: N rows, V vocabulary, T time, C channels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_kernels.cuh"
#include "backend/cuda/cuda_device_util.cuh"

namespace tutti::cuda::kernels {
namespace {

using namespace device;

// ------------------------------------------------------------------------------------------------
// Element-wise: a grid-stride kernel over an index functor (ops that index other than i).

template <class F>
__global__ void elementwise_kernel(int64_t n, F f) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) f(i);
}

template <class F>
cudaError_t launch_elementwise(int64_t n, const LaunchLimits& lim, cudaStream_t stream, F f) {
  if (n <= 0) return cudaSuccess;
  elementwise_kernel<<<grid_for(n, lim), kThreads, 0, stream>>>(n, f);
  return cudaGetLastError();
}

// Same-shape maps out[i] = f(in_0[i], ..., in_{K-1}[i]). When every pointer is 16-byte aligned
// each thread moves float4s (four times the bytes in flight per load), the tail one by one.
template <int K>
struct MapArgs {
  const float* in[K > 0 ? K : 1];
  float* out;
};

template <int K, class F>
__device__ __forceinline__ float apply(const F& f, const float* v) {
  if constexpr (K == 0) {
    return f();
  } else if constexpr (K == 1) {
    return f(v[0]);
  } else {
    return f(v[0], v[1]);
  }
}

template <int K, class F>
__global__ void map_kernel(F f, MapArgs<K> args, int64_t n, bool vectorized) {
  int64_t start = 0;
  if (vectorized) {
    const int64_t n4 = n / 4;
    for (int64_t q = global_thread(); q < n4; q += grid_threads()) {
      float4 in[K > 0 ? K : 1];
#pragma unroll
      for (int k = 0; k < K; ++k) in[k] = reinterpret_cast<const float4*>(args.in[k])[q];
      float lane[4][K > 0 ? K : 1];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        lane[0][k] = in[k].x;
        lane[1][k] = in[k].y;
        lane[2][k] = in[k].z;
        lane[3][k] = in[k].w;
      }
      reinterpret_cast<float4*>(args.out)[q] =
          make_float4(apply<K>(f, lane[0]), apply<K>(f, lane[1]), apply<K>(f, lane[2]), apply<K>(f, lane[3]));
    }
    start = n4 * 4;
  }
  for (int64_t i = start + global_thread(); i < n; i += grid_threads()) {
    float v[K > 0 ? K : 1];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = args.in[k][i];
    args.out[i] = apply<K>(f, v);
  }
}

template <int K, class F>
cudaError_t launch_map(F f, MapArgs<K> args, int64_t n, const LaunchLimits& lim, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  bool vectorized = aligned(args.out, 16);
  for (int k = 0; k < K; ++k) vectorized = vectorized && aligned(args.in[k], 16);
  map_kernel<K><<<grid_for(vectorized ? (n + 3) / 4 : n, lim), kThreads, 0, stream>>>(f, args, n, vectorized);
  return cudaGetLastError();
}

struct Constant {
  float value;
  __device__ float operator()() const { return value; }
};
struct Plus {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct AddBroadcastOp {  // b (inner) repeated over the outer dimension
  const float *a, *b;
  float* out;
  int64_t inner;
  __device__ void operator()(int64_t i) const { out[i] = a[i] + b[i % inner]; }
};
struct Axpy {  // (x, y) -> y + alpha x
  float alpha;
  __device__ float operator()(float x, float y) const { return y + alpha * x; }
};
struct Times {
  float s;
  __device__ float operator()(float x) const { return s * x; }
};

// GELU, tanh form (device::kGeluK, kGeluC; the derivative is device::gelu_grad).
struct Gelu {
  __device__ float operator()(float x) const { return 0.5f * x * (1.0f + tanhf(kGeluK * (x + kGeluC * x * x * x))); }
};
struct GeluBackward {  // (x, dy) -> dx
  __device__ float operator()(float x, float dy) const { return gelu_grad(x) * dy; }
};
struct Relu {
  __device__ float operator()(float x) const { return x > 0.0f ? x : 0.0f; }
};
struct ReluBackward {  // (x, dy) -> dx
  __device__ float operator()(float x, float dy) const { return x > 0.0f ? dy : 0.0f; }
};
// AdamW as in PyTorch: p *= 1 - lr wd; m, v updated; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
// Many tensors in one launch (AdamWSlice): block b finds its tensor by binary search of the
// table's first blocks and updates kAdamWChunk elements of it; with `vec`, 4 float4s per thread,
// every load issued before the arithmetic (bandwidth, not latency); the tail of a tensor whose
// size is not a multiple of 4 by its last block, element by element.
__device__ __forceinline__ void adamw_update(float& p, float& m, float& v, float g, float decay, const AdamWFolded& s) {
  g *= s.grad_scale;
  m = s.beta1 * m + (1.0f - s.beta1) * g;
  v = s.beta2 * v + (1.0f - s.beta2) * g * g;
  p = p * decay - s.step * m / (sqrtf(v) * s.inv_sqrt_bc2 + s.eps);
}

// Element i of t, one by one (a tensor not aligned for float4s, or the tail of one that is).
__device__ __forceinline__ void adamw_element(const AdamWSlice& t, int64_t i, float decay, const AdamWFolded& s) {
  float p = t.param[i], m = t.m[i], v = t.v[i];
  adamw_update(p, m, v, t.grad[i], decay, s);
  t.param[i] = p, t.m[i] = m, t.v[i] = v;
  if (t.copy) t.copy[i] = bits_of(p);
}

constexpr int kAdamWThreads = 256;
constexpr int kAdamWVecs = kAdamWChunk / 4 / kAdamWThreads;  // float4s per thread

__global__ void __launch_bounds__(kAdamWThreads) adamw_kernel(const AdamWSlice* table, int count, AdamWFolded s) {
  __shared__ int slot;
  if (threadIdx.x == 0) {  // the last entry whose first block is at most this one
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (table[mid].first_block <= int64_t{blockIdx.x}) lo = mid;
      else hi = mid - 1;
    }
    slot = lo;
  }
  __syncthreads();
  const AdamWSlice t = table[slot];
  const float decay = t.decay ? s.decay : 1.0f;
  const int64_t begin = (int64_t{blockIdx.x} - t.first_block) * kAdamWChunk;
  if (!t.vec) {
    for (int64_t i = begin + threadIdx.x; i < begin + kAdamWChunk && i < t.n; i += kAdamWThreads)
      adamw_element(t, i, decay, s);
    return;
  }
  const int64_t n4 = t.n / 4;
  float4 p[kAdamWVecs], g[kAdamWVecs], m[kAdamWVecs], v[kAdamWVecs];
#pragma unroll
  for (int k = 0; k < kAdamWVecs; ++k) {
    const int64_t u = begin / 4 + threadIdx.x + k * kAdamWThreads;
    if (u >= n4) continue;
    p[k] = reinterpret_cast<const float4*>(t.param)[u];
    g[k] = reinterpret_cast<const float4*>(t.grad)[u];
    m[k] = reinterpret_cast<const float4*>(t.m)[u];
    v[k] = reinterpret_cast<const float4*>(t.v)[u];
  }
#pragma unroll
  for (int k = 0; k < kAdamWVecs; ++k) {
    const int64_t u = begin / 4 + threadIdx.x + k * kAdamWThreads;
    if (u >= n4) continue;
    adamw_update(p[k].x, m[k].x, v[k].x, g[k].x, decay, s);
    adamw_update(p[k].y, m[k].y, v[k].y, g[k].y, decay, s);
    adamw_update(p[k].z, m[k].z, v[k].z, g[k].z, decay, s);
    adamw_update(p[k].w, m[k].w, v[k].w, g[k].w, decay, s);
    reinterpret_cast<float4*>(t.param)[u] = p[k];
    reinterpret_cast<float4*>(t.m)[u] = m[k];
    reinterpret_cast<float4*>(t.v)[u] = v[k];
    if (t.copy) reinterpret_cast<uint2*>(t.copy)[u] = bits_of4(p[k]);
  }
  const int64_t i = 4 * n4 + threadIdx.x;  // the tail, by the block that holds element 4 n4
  if (i < t.n && 4 * n4 >= begin && 4 * n4 < begin + kAdamWChunk) adamw_element(t, i, decay, s);
}

struct ScaleMatricesOp {  // C (m, n) with row stride ldc, batch matrices stride_c apart
  float* c;
  int64_t m, n, ldc, stride_c;
  float beta;
  __device__ void operator()(int64_t i) const {
    const int64_t col = i % n, row = (i / n) % m, b = i / (m * n);
    float* p = c + b * stride_c + row * ldc + col;
    *p = beta == 0.0f ? 0.0f : beta * *p;
  }
};
struct EmbeddingOp {  // out (n, C) = table[idx]; zero rows for negative indices, NaN rows for >= V
  const int32_t* idx;
  const float* table;
  float* out;
  int64_t C, V;
  __device__ void operator()(int64_t i) const {
    const int64_t row = idx[i / C];
    out[i] = row < 0 ? 0.0f : row < V ? table[row * C + i % C] : NAN;
  }
};
struct EmbeddingBackwardOp {
  const int32_t* idx;
  const float* dout;
  float* dtable;
  int64_t C;
  __device__ void operator()(int64_t i) const {
    const int64_t row = idx[i / C];
    if (row >= 0) atomicAdd(dtable + row * C + i % C, dout[i]);
  }
};
struct VocabCrossEntropyBackwardOp {  // d = exp(x - lse[row]) dloss, minus dloss at this rank's target
  const float* logits;
  const int32_t* targets;
  int64_t first;
  const float* lse;
  float dloss;
  float* dlogits;
  int64_t V;
  __device__ void operator()(int64_t i) const {
    const int64_t row = i / V;
    float d = expf(logits[i] - lse[row]) * dloss;
    if (targets[row] - first == i % V) d -= dloss;
    dlogits[i] = d;
  }
};
struct CrossEntropyBackwardOp {  // d = p dloss, minus dloss at the target
  const float* probs;
  const int32_t* targets;
  float dloss;
  float* dlogits;
  int64_t V;
  __device__ void operator()(int64_t i) const {
    const float d = probs[i] * dloss;
    dlogits[i] = (i % V == targets[i / V]) ? d - dloss : d;
  }
};

// ------------------------------------------------------------------------------------------------
// Strided gather into a dense buffer.

// Element offset in the source of dense index i. The loop is unrolled over kMaxDims so the
// layout stays in registers (a run-time index would copy it to local memory).
__device__ __forceinline__ int64_t source_offset(const StridedLayout& layout, int64_t i) {
  int64_t rest = i, offset = 0;
#pragma unroll
  for (int d = kMaxDims - 1; d >= 0; --d) {
    if (d < layout.ndim) {
      offset += (rest % layout.shape[d]) * layout.strides[d];
      rest /= layout.shape[d];
    }
  }
  return offset;
}

template <class T>
__global__ void strided_copy_kernel(const T* src, StridedLayout layout, int64_t total, T* dst) {
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t offset = source_offset(layout, i);
    dst[i] = src[offset];
  }
}

// Element sizes other than 1, 2, 4 and 8 bytes: byte by byte.
__global__ void strided_copy_bytes_kernel(const char* src, StridedLayout layout, int64_t total, size_t elem,
                                          char* dst) {
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t offset = source_offset(layout, i);
    for (size_t b = 0; b < elem; ++b) dst[static_cast<size_t>(i) * elem + b] = src[static_cast<size_t>(offset) * elem + b];
  }
}

template <class T>
cudaError_t launch_strided_copy(const void* src, const StridedLayout& layout, int64_t total, void* dst,
                                const LaunchLimits& lim, cudaStream_t stream) {
  strided_copy_kernel<T><<<grid_for(total, lim), kThreads, 0, stream>>>(static_cast<const T*>(src), layout, total,
                                                                         static_cast<T*>(dst));
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Whole-tensor sums, in double: per-block partials, then one block over the partials.

unsigned sum_blocks(int64_t n, const LaunchLimits& lim) {
  const int64_t cap = static_cast<int64_t>(std::max(lim.multiprocessors, 1)) * kBlocksPerSm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, cap)));
}

__global__ void sum_partials_kernel(const float* x, int64_t n, bool squares, double* partials) {
  double acc = 0.0;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const double v = x[i];
    acc += squares ? v * v : v;
  }
  acc = block_reduce(acc, SumOp{}, 0.0);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void sum_finish_kernel(const double* partials, unsigned count, double* result) {
  double acc = 0.0;
  for (unsigned i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_reduce(acc, SumOp{}, 0.0);
  if (threadIdx.x == 0) *result = acc;
}

// ------------------------------------------------------------------------------------------------
// Column sums over rows (sum_rows). Blocks of 32 columns x 8 row-threads; the rows are cut into
// `splits` ranges (grid.y) so that short, wide and tall, narrow inputs both fill the GPU. With one
// split the block writes the result; with more, each writes its partial and a second kernel adds
// the partials in a fixed order (deterministic, no atomics).

constexpr int kColTile = 32, kRowThreads = 8;

struct ColumnSplit {
  int64_t splits, rows_per_split;
};

ColumnSplit column_split(int64_t rows, int64_t cols, const LaunchLimits& lim, int64_t tile = kColTile) {
  const int64_t tiles = std::max<int64_t>(1, (cols + tile - 1) / tile);
  const int64_t target = static_cast<int64_t>(std::max(lim.multiprocessors, 1)) * kBlocksPerSm;
  int64_t splits = std::min((target + tiles - 1) / tiles, (rows + 31) / 32);  // >= 32 rows per split
  splits = std::clamp<int64_t>(splits, 1, 65535);
  const int64_t per = std::max<int64_t>(1, (rows + splits - 1) / splits);
  return {std::max<int64_t>(1, (rows + per - 1) / per), per};
}

template <int K>
struct ColumnOutputs {
  float* out[K];
};

struct RowsLoad {  // sum_rows: x (rows, cols)
  const float* x;
  __device__ void operator()(int64_t r, int64_t c, int64_t cols, float (&v)[1]) const { v[0] = x[r * cols + c]; }
};
// direct: dst.out[k][c] (+)= column sum; else dst.out[k][split * cols + c] = partial.
template <int K, class Load>
__global__ void column_sum_kernel(Load load, int64_t rows, int64_t cols, int64_t rows_per_split,
                                  ColumnOutputs<K> dst, bool direct, bool accumulate) {
  __shared__ float tile[K][kRowThreads][kColTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(rows, r0 + rows_per_split);
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.0f;
  if (c < cols) {
    for (int64_t r = r0 + ty; r < r1; r += kRowThreads) {
      float v[K];
      load(r, c, cols, v);
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] += v[k];
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) tile[k][ty][tx] = acc[k];
  __syncthreads();
  if (ty != 0 || c >= cols) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.0f;
#pragma unroll
    for (int y = 0; y < kRowThreads; ++y) s += tile[k][y][tx];
    if (direct) {
      dst.out[k][c] = accumulate ? dst.out[k][c] + s : s;
    } else {
      dst.out[k][blockIdx.y * cols + c] = s;
    }
  }
}

// The partials (splits, cols) summed down the columns in a fixed order: blocks of 32 columns x 8
// row-threads, thread ty adding partials ty, ty + 8, ... (loads in flight together: the partials are
// in L2 and a serial chain of them was latency-bound, 10-13 us for 176 x 768), then one the 8.
template <int K>
__global__ void column_finish_kernel(ColumnOutputs<K> partials, int64_t splits, int64_t cols, ColumnOutputs<K> out,
                                     bool accumulate) {
  __shared__ float tile[K][kRowThreads][kColTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.0f;
    if (c < cols) {
#pragma unroll 4
      for (int64_t p = ty; p < splits; p += kRowThreads) s += partials.out[k][p * cols + c];
    }
    tile[k][ty][tx] = s;
  }
  __syncthreads();
  if (ty != 0 || c >= cols) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.0f;
#pragma unroll
    for (int y = 0; y < kRowThreads; ++y) s += tile[k][y][tx];
    out.out[k][c] = accumulate ? out.out[k][c] + s : s;
  }
}

template <int K>
void launch_column_finish(ColumnOutputs<K> partials, int64_t splits, int64_t cols, ColumnOutputs<K> out,
                          bool accumulate, cudaStream_t stream) {
  column_finish_kernel<K><<<static_cast<unsigned>((cols + kColTile - 1) / kColTile), dim3(kColTile, kRowThreads), 0,
                            stream>>>(partials, splits, cols, out, accumulate);
}

size_t column_workspace_bytes(int K, int64_t rows, int64_t cols, const LaunchLimits& lim) {
  const ColumnSplit split = column_split(rows, cols, lim);
  return split.splits > 1 ? static_cast<size_t>(K * split.splits * cols) * sizeof(float) : 0;
}

template <int K, class Load>
cudaError_t launch_column_sum(Load load, int64_t rows, int64_t cols, ColumnOutputs<K> out, bool accumulate,
                              void* workspace, const LaunchLimits& lim, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  const ColumnSplit split = column_split(rows, cols, lim);
  const dim3 grid(static_cast<unsigned>((cols + kColTile - 1) / kColTile), static_cast<unsigned>(split.splits));
  const dim3 block(kColTile, kRowThreads);
  if (split.splits == 1) {
    column_sum_kernel<K><<<grid, block, 0, stream>>>(load, rows, cols, split.rows_per_split, out, true, accumulate);
    return cudaGetLastError();
  }
  ColumnOutputs<K> partials;
  for (int k = 0; k < K; ++k) partials.out[k] = static_cast<float*>(workspace) + k * split.splits * cols;
  column_sum_kernel<K><<<grid, block, 0, stream>>>(load, rows, cols, split.rows_per_split, partials, false, false);
  launch_column_finish<K>(partials, split.splits, cols, out, accumulate, stream);
  return cudaGetLastError();
}

// Column sums of x in fp32 that also round x into y (to_bf16_sum_rows), or of x in bf16
// (sum_rows_bf16, y null), V columns a thread: a 16-byte load (4 floats or 8 bf16) where cols % V
// == 0 and the pointers allow, else V = 1. The blocks and row splits are column_sum_kernel's, with
// 32 V columns a block.
template <int V>
__device__ __forceinline__ void load_columns(const float* x, uint16_t* y, int64_t i, float (&v)[V]) {
  if constexpr (V == 4) {
    const float4 q = *reinterpret_cast<const float4*>(x + i);
    *reinterpret_cast<uint2*>(y + i) = bits_of4(q);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    static_assert(V == 1);
    v[0] = x[i];
    y[i] = bits_of(v[0]);
  }
}
template <int V>
__device__ __forceinline__ void load_columns(const uint16_t* x, uint16_t*, int64_t i, float (&v)[V]) {
  if constexpr (V == 8) {
    const uint4 q = *reinterpret_cast<const uint4*>(x + i);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) v[2 * k] = value_of(uint16_t(w[k])), v[2 * k + 1] = value_of(uint16_t(w[k] >> 16));
  } else {
    static_assert(V == 1);
    v[0] = value_of(x[i]);
  }
}

template <int V, class T>
__global__ void column_sum_vec_kernel(const T* x, uint16_t* y, int64_t rows, int64_t cols, int64_t rows_per_split,
                                      float* dst, bool direct) {
  __shared__ float tile[kRowThreads][kColTile * V + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kColTile + tx) * V;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(rows, r0 + rows_per_split);
  float acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = 0.0f;
  if (c < cols) {
    for (int64_t r = r0 + ty; r < r1; r += kRowThreads) {
      float v[V];
      load_columns<V>(x, y, r * cols + c, v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += v[k];
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) tile[ty][tx * V + v] = acc[v];
  __syncthreads();
  if (ty != 0 || c >= cols) return;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kRowThreads; ++k) s += tile[k][tx * V + v];
    dst[(direct ? 0 : blockIdx.y * cols) + c + v] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// One block per row.

__global__ void softmax_kernel(const float* x, float* y, int64_t cols) {
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * cols;
  float* yr = y + static_cast<int64_t>(blockIdx.x) * cols;
  float mx, total;
  row_max_and_exp_sum(xr, cols, mx, total);
  const float inv = 1.0f / total;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = expf(xr[j] - mx) * inv;
}

// probs = softmax(logits); losses = log(sum exp(x - max)) + max - x[target] (NaN for a bad target).
__global__ void cross_entropy_forward_kernel(const float* logits, const int32_t* targets, float* probs, float* losses,
                                             int64_t V) {
  const int64_t row = blockIdx.x;
  const float* xr = logits + row * V;
  float* pr = probs + row * V;
  float mx, total;
  row_max_and_exp_sum(xr, V, mx, total);
  const float inv = 1.0f / total;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) pr[j] = expf(xr[j] - mx) * inv;
  if (threadIdx.x == 0) {
    const int64_t t = targets[row];
    losses[row] = (t >= 0 && t < V) ? logf(total) + mx - xr[t] : NAN;
  }
}

__global__ void vocab_cross_entropy_stats_kernel(const float* logits, const int32_t* targets, int64_t first,
                                                 float* stats, int64_t V) {
  const int64_t row = blockIdx.x;
  const float* xr = logits + row * V;
  float mx, total;
  row_max_and_exp_sum(xr, V, mx, total);
  if (threadIdx.x == 0) {
    const int64_t t = targets[row] - first;
    stats[3 * row] = mx;
    stats[3 * row + 1] = total;
    stats[3 * row + 2] = (t >= 0 && t < V) ? xr[t] : 0.0f;
  }
}

// Row r is row i = r mod rows_per_matrix of a score matrix whose rows hold `len` keys; keys
// 0..past+i are visible (training: past = 0, a square (T, T) matrix; decoding: the cache).
__global__ void causal_softmax_kernel(float* scores, int64_t rows_per_matrix, int64_t len, int64_t past) {
  const int64_t row = blockIdx.x, n = past + row % rows_per_matrix + 1;
  float* s = scores + row * len;
  float mx, total;
  row_max_and_exp_sum(s, n, mx, total);
  const float inv = 1.0f / total;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) s[j] = j < n ? expf(s[j] - mx) * inv : 0.0f;
}

__global__ void causal_softmax_backward_kernel(const float* probs, float* dprobs, int64_t T, float scale) {
  const int64_t row = blockIdx.x, n = row % T + 1;
  const float* p = probs + row * T;
  float* d = dprobs + row * T;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += p[j] * d[j];
  dot = block_sum(dot);
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) d[j] = j < n ? scale * p[j] * (d[j] - dot) : 0.0f;
}

}  // namespace

// ================================================================================================
// Launchers

cudaError_t strided_copy(const void* src, const StridedLayout& layout, int64_t total, size_t elem, void* dst,
                         const LaunchLimits& lim, cudaStream_t stream) {
  if (total <= 0) return cudaSuccess;
  switch (elem) {
    case 1: return launch_strided_copy<uint8_t>(src, layout, total, dst, lim, stream);
    case 2: return launch_strided_copy<uint16_t>(src, layout, total, dst, lim, stream);
    case 4: return launch_strided_copy<uint32_t>(src, layout, total, dst, lim, stream);
    case 8: return launch_strided_copy<uint64_t>(src, layout, total, dst, lim, stream);
    default:
      strided_copy_bytes_kernel<<<grid_for(total, lim), kThreads, 0, stream>>>(
          static_cast<const char*>(src), layout, total, elem, static_cast<char*>(dst));
      return cudaGetLastError();
  }
}

cudaError_t fill(float* dst, int64_t n, float value, const LaunchLimits& lim, cudaStream_t stream) {
  return launch_map<0>(Constant{value}, MapArgs<0>{{nullptr}, dst}, n, lim, stream);
}

cudaError_t add(const float* a, const float* b, float* out, int64_t outer, int64_t inner, const LaunchLimits& lim,
                cudaStream_t stream) {
  const int64_t n = outer * inner;
  if (outer == 1) return launch_map<2>(Plus{}, MapArgs<2>{{a, b}, out}, n, lim, stream);
  return launch_elementwise(n, lim, stream, AddBroadcastOp{a, b, out, inner});
}

cudaError_t axpy(float alpha, const float* x, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream) {
  return launch_map<2>(Axpy{alpha}, MapArgs<2>{{x, y}, y}, n, lim, stream);
}

cudaError_t scale(const float* x, float s, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream) {
  return launch_map<1>(Times{s}, MapArgs<1>{{x}, y}, n, lim, stream);
}

cudaError_t gelu_forward(const float* x, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream) {
  return launch_map<1>(Gelu{}, MapArgs<1>{{x}, y}, n, lim, stream);
}

cudaError_t gelu_backward(const float* x, const float* dy, float* dx, int64_t n, const LaunchLimits& lim,
                          cudaStream_t stream) {
  return launch_map<2>(GeluBackward{}, MapArgs<2>{{x, dy}, dx}, n, lim, stream);
}

cudaError_t relu_forward(const float* x, float* y, int64_t n, const LaunchLimits& lim, cudaStream_t stream) {
  return launch_map<1>(Relu{}, MapArgs<1>{{x}, y}, n, lim, stream);
}

cudaError_t relu_backward(const float* x, const float* dy, float* dx, int64_t n, const LaunchLimits& lim,
                          cudaStream_t stream) {
  return launch_map<2>(ReluBackward{}, MapArgs<2>{{x, dy}, dx}, n, lim, stream);
}

cudaError_t adamw(const AdamWSlice* table, int count, int64_t blocks, const AdamWFolded& s, cudaStream_t stream) {
  if (count <= 0 || blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  adamw_kernel<<<static_cast<unsigned>(blocks), kAdamWThreads, 0, stream>>>(table, count, s);
  return cudaGetLastError();
}

cudaError_t scale_matrices(float* c, int64_t m, int64_t n, int64_t ldc, int64_t stride_c, int64_t batch, float beta,
                           const LaunchLimits& lim, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  return launch_elementwise(m * n * batch, lim, stream, ScaleMatricesOp{c, m, n, ldc, stride_c, beta});
}

size_t sum_workspace_bytes(int64_t n, const LaunchLimits& lim) { return sum_blocks(n, lim) * sizeof(double); }

cudaError_t sum(const float* x, int64_t n, bool squares, double* result, void* workspace, const LaunchLimits& lim,
                cudaStream_t stream) {
  if (n <= 0) return cudaMemsetAsync(result, 0, sizeof(double), stream);
  const unsigned blocks = sum_blocks(n, lim);
  auto* partials = static_cast<double*>(workspace);
  sum_partials_kernel<<<blocks, kThreads, 0, stream>>>(x, n, squares, partials);
  sum_finish_kernel<<<1, 1024, 0, stream>>>(partials, blocks, result);
  return cudaGetLastError();
}

size_t sum_rows_workspace_bytes(int64_t rows, int64_t cols, const LaunchLimits& lim) {
  return column_workspace_bytes(1, rows, cols, lim);
}

cudaError_t sum_rows(const float* x, float* out, int64_t rows, int64_t cols, bool accumulate, void* workspace,
                     const LaunchLimits& lim, cudaStream_t stream) {
  return launch_column_sum<1>(RowsLoad{x}, rows, cols, ColumnOutputs<1>{{out}}, accumulate, workspace, lim, stream);
}

namespace {
// The 16-byte width (V) column_sum_vec_kernel takes for x, else 1.
template <class T>
int column_width(const T* x, const uint16_t* y, int64_t cols) {
  constexpr int v = 16 / sizeof(T);
  return cols % v == 0 && aligned(x, 16) && (y == nullptr || aligned(y, 8)) ? v : 1;
}

template <int V, class T>
cudaError_t launch_column_sum_vec(const T* x, uint16_t* y, float* sums, int64_t rows, int64_t cols, void* workspace,
                                  const LaunchLimits& lim, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) return cudaMemsetAsync(sums, 0, static_cast<size_t>(cols) * sizeof(float), stream);
  const ColumnSplit split = column_split(rows, cols, lim, kColTile * V);
  const dim3 grid(static_cast<unsigned>((cols + kColTile * V - 1) / (kColTile * V)), static_cast<unsigned>(split.splits));
  const bool direct = split.splits == 1;
  float* dst = direct ? sums : static_cast<float*>(workspace);
  column_sum_vec_kernel<V><<<grid, dim3(kColTile, kRowThreads), 0, stream>>>(x, y, rows, cols, split.rows_per_split,
                                                                             dst, direct);
  if (!direct)
    launch_column_finish<1>(ColumnOutputs<1>{{dst}}, split.splits, cols, ColumnOutputs<1>{{sums}}, false, stream);
  return cudaGetLastError();
}
}  // namespace

size_t column_sum_vec_workspace_bytes(int64_t rows, int64_t cols, const LaunchLimits& lim) {
  int64_t splits = 1;  // the most of any width's (which one runs depends on the pointers)
  for (int64_t tile : {kColTile, 4 * kColTile, 8 * kColTile})
    splits = std::max(splits, column_split(rows, cols, lim, tile).splits);
  return splits > 1 ? static_cast<size_t>(splits * cols) * sizeof(float) : 0;
}

cudaError_t to_bf16_sum_rows(const float* x, uint16_t* y, float* sums, int64_t rows, int64_t cols, void* workspace,
                             const LaunchLimits& lim, cudaStream_t stream) {
  return column_width(x, y, cols) == 4 ? launch_column_sum_vec<4>(x, y, sums, rows, cols, workspace, lim, stream)
                                       : launch_column_sum_vec<1>(x, y, sums, rows, cols, workspace, lim, stream);
}

cudaError_t sum_rows_bf16(const uint16_t* x, float* sums, int64_t rows, int64_t cols, void* workspace,
                          const LaunchLimits& lim, cudaStream_t stream) {
  return column_width(x, nullptr, cols) == 8
             ? launch_column_sum_vec<8>(x, nullptr, sums, rows, cols, workspace, lim, stream)
             : launch_column_sum_vec<1>(x, nullptr, sums, rows, cols, workspace, lim, stream);
}

cudaError_t softmax(const float* x, float* y, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (!rows_fit(rows)) return cudaErrorInvalidValue;
  softmax_kernel<<<static_cast<unsigned>(rows), row_threads(cols), 0, stream>>>(x, y, cols);
  return cudaGetLastError();
}

cudaError_t cross_entropy_forward(const float* logits, const int32_t* targets, float* probs, float* losses, int64_t N,
                                  int64_t V, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (!rows_fit(N)) return cudaErrorInvalidValue;
  cross_entropy_forward_kernel<<<static_cast<unsigned>(N), row_threads(V), 0, stream>>>(logits, targets, probs,
                                                                                          losses, V);
  return cudaGetLastError();
}

cudaError_t cross_entropy_backward(const float* probs, const int32_t* targets, float dloss, float* dlogits, int64_t N,
                                   int64_t V, const LaunchLimits& lim, cudaStream_t stream) {
  return launch_elementwise(N * V, lim, stream, CrossEntropyBackwardOp{probs, targets, dloss, dlogits, V});
}

cudaError_t vocab_cross_entropy_stats(const float* logits, const int32_t* targets, int64_t first, float* stats,
                                      int64_t N, int64_t V, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (!rows_fit(N)) return cudaErrorInvalidValue;
  vocab_cross_entropy_stats_kernel<<<static_cast<unsigned>(N), row_threads(V), 0, stream>>>(logits, targets, first,
                                                                                              stats, V);
  return cudaGetLastError();
}

cudaError_t vocab_cross_entropy_backward(const float* logits, const int32_t* targets, int64_t first, const float* lse,
                                         float dloss, float* dlogits, int64_t N, int64_t V, const LaunchLimits& lim,
                                         cudaStream_t stream) {
  return launch_elementwise(N * V, lim, stream,
                            VocabCrossEntropyBackwardOp{logits, targets, first, lse, dloss, dlogits, V});
}

cudaError_t embedding_forward(const int32_t* idx, const float* table, float* out, int64_t n, int64_t C, int64_t V,
                              const LaunchLimits& lim, cudaStream_t stream) {
  return launch_elementwise(n * C, lim, stream, EmbeddingOp{idx, table, out, C, V});
}

cudaError_t embedding_backward(const int32_t* idx, const float* dout, float* dtable, int64_t n, int64_t C,
                               const LaunchLimits& lim, cudaStream_t stream) {
  return launch_elementwise(n * C, lim, stream, EmbeddingBackwardOp{idx, dout, dtable, C});
}

cudaError_t causal_softmax(float* scores, int64_t rows, int64_t rows_per_matrix, int64_t len, int64_t past,
                           cudaStream_t stream) {
  if (rows <= 0 || len <= 0) return cudaSuccess;
  if (!rows_fit(rows)) return cudaErrorInvalidValue;
  causal_softmax_kernel<<<static_cast<unsigned>(rows), row_threads(len), 0, stream>>>(scores, rows_per_matrix, len,
                                                                                       past);
  return cudaGetLastError();
}

cudaError_t causal_softmax_backward(const float* probs, float* dprobs, int64_t rows, int64_t T, float scale,
                                    cudaStream_t stream) {
  if (rows <= 0 || T <= 0) return cudaSuccess;
  if (!rows_fit(rows)) return cudaErrorInvalidValue;
  causal_softmax_backward_kernel<<<static_cast<unsigned>(rows), row_threads(T), 0, stream>>>(probs, dprobs, T, scale);
  return cudaGetLastError();
}

}  // namespace tutti::cuda::kernels
