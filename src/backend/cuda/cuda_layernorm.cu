// LayerNorm on the GPU near the memory-bandwidth floor: forward (y in fp32 or rounded to bf16) and
// backward. A row is read from memory once, into registers; its mean and variance (two passes, as
// the CPU's) and the backward's two row sums are reduced from there, and each output is written
// once. dw and db are summed in shared memory over a fixed set of rows per block, each block writes
// one partial row, and a second kernel adds the partials in a fixed order (deterministic, no
// atomics).
// Formulas as the CPU backend's (src/backend/cpu/cpu_backend.cpp).
// Letters: N rows, C columns (`cols`), P blocks of the backward (its partial rows).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "backend/cuda/cuda_device_util.cuh"
#include "backend/cuda/cuda_kernels.cuh"

namespace tutti::cuda::kernels {
namespace {

using namespace device;

// ------------------------------------------------------------------------------------------------
// How a row is spread over threads.
//
// A row belongs to a slot of G = 32 * warps threads; item k of thread t of the slot is the 4
// columns 4q .. 4q + 3, q = t + k G, and a thread holds `items` of them in registers. Vectorized
// (cols % 4 == 0 and 16-byte aligned rows) an item moves as one float4; otherwise as 4 scalars,
// each checked against cols (the same columns, so one address per item either way). A warp covers
// 512 consecutive bytes per item, and since 4 * items * G >= cols every column is held by exactly
// one (thread, value). Rows of one warp share a block kSlots at a time; a wider row has a block of
// its own. Rows too wide for the registers (forward, C > 16384) or for the backward's shared sums
// (C > 4096) take the streaming kernels at the end.

constexpr int kMaxItems = 8;             // 32 values of x (and of dy) a thread
constexpr int kMaxForwardWarps = 16;     // 512 threads
constexpr int kMaxBackwardWarps = 4;     // the sums of dw and db: 2 x 4096 floats, 32 KB
constexpr int kSlots = 4;                // one-warp rows per block
static_assert(kMaxBackwardWarps <= kSlots, "backward blocks of at most 128 threads");
constexpr int kStreamThreads = 512;
constexpr int kFinishCols = 8, kFinishRows = 64;  // the partials' sum: a block's tile

struct RowShape {
  int warps = 0;  // per row; 0: the streaming kernels
  int items = 0;  // groups of 4 values per thread
  int slots = 0;  // rows per block
  int threads() const { return 32 * warps * slots; }
};

RowShape row_shape(int64_t cols, int max_warps) {
  constexpr int64_t per_warp = 32 * 4 * kMaxItems;
  const int64_t warps = (cols + per_warp - 1) / per_warp;
  if (warps > max_warps) return {};
  const int64_t items = (cols + 128 * warps - 1) / (128 * warps);  // <= kMaxItems
  return {static_cast<int>(warps), static_cast<int>(items), warps == 1 ? kSlots : 1};
}

// The backward's grid is fixed, every block resident at once: 4 groups of 128 threads an SM (128
// registers a thread, ~100 KB of loads in flight an SM), or fewer where 128 registers would spill
// (ptxas -v: 3 groups, 168 registers; the scalar loads' predicates cost more). Shared memory: at
// most 32 KB per 128 threads.
constexpr int backward_groups_per_sm(int items, bool vec) {
  if (vec) return items >= 7 ? 3 : 4;
  return items >= 8 ? 2 : items >= 6 ? 3 : 4;
}

// Calls f(std::integral_constant<int, n>) with n = items, 1 <= items <= Max (one kernel per n).
template <int Max, int N = 1, class F>
void with_items(int items, F&& f) {
  if constexpr (N < Max) {
    if (items > N) return with_items<Max, N + 1>(items, std::forward<F>(f));
  }
  f(std::integral_constant<int, N>{});
}

// ------------------------------------------------------------------------------------------------
// A thread's share of a row.

struct Item {
  float v[4];
};

// Column of value i (item i / 4) of thread t.
__device__ __forceinline__ int column_of(int i, int t, int G) { return 4 * (t + (i / 4) * G) + i % 4; }

// Item k of thread t of `row`; zeros past the end. kOnce: read once (x, dy), evict first.
template <bool kVec, bool kOnce = false>
__device__ __forceinline__ Item load_item(const float* row, int k, int cols, int t, int G) {
  const int c = 4 * (t + k * G);
  Item it;
  if constexpr (kVec) {
    float4 f = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (c < cols) {
      const auto* p = reinterpret_cast<const float4*>(row + c);
      if constexpr (kOnce) {
        f = __ldcs(p);
      } else {
        f = *p;
      }
    }
    it.v[0] = f.x;
    it.v[1] = f.y;
    it.v[2] = f.z;
    it.v[3] = f.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      it.v[j] = 0.0f;
      if (c + j >= cols) continue;
      if constexpr (kOnce) {
        it.v[j] = __ldcs(row + c + j);
      } else {
        it.v[j] = row[c + j];
      }
    }
  }
  return it;
}

template <class Out>
__device__ __forceinline__ Out output(float v) {
  if constexpr (std::is_same_v<Out, float>) {
    return v;
  } else {
    return bits_of(v);
  }
}

// Writes item k of thread t (the columns inside the row only): a float4, or 4 bf16 as 8 bytes.
template <bool kVec, bool kOnce = false, class Out>
__device__ __forceinline__ void store_item(Out* row, int k, int cols, int t, int G, const Item& it) {
  const int c = 4 * (t + k * G);
  if constexpr (kVec) {
    if (c >= cols) return;
    if constexpr (std::is_same_v<Out, float>) {
      const float4 v = make_float4(it.v[0], it.v[1], it.v[2], it.v[3]);
      auto* p = reinterpret_cast<float4*>(row + c);
      if constexpr (kOnce) {
        __stcs(p, v);
      } else {
        *p = v;
      }
    } else {
      const uint2 v = make_uint2(bits_of2(it.v[0], it.v[1]), bits_of2(it.v[2], it.v[3]));
      auto* p = reinterpret_cast<uint2*>(row + c);
      if constexpr (kOnce) {
        __stcs(p, v);
      } else {
        *p = v;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c + j >= cols) continue;
      if constexpr (kOnce && std::is_same_v<Out, float>) {
        __stcs(row + c + j, it.v[j]);
      } else {
        row[c + j] = output<Out>(it.v[j]);
      }
    }
  }
}

// Sum over a slot's threads, on each of them: one warp's shuffles, or the block's (its only slot).
__device__ __forceinline__ float slot_sum(float v, int warps) {
  return warps == 1 ? warp_reduce(v, SumOp{}) : block_sum(v);
}

// ------------------------------------------------------------------------------------------------
// Forward: one row per slot. y (N, C) in Out (float, or uint16_t bf16 bits).

template <int N, bool kVec, class Out>
__global__ void __launch_bounds__(kMaxForwardWarps * 32)
    layer_norm_forward_kernel(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                              Out* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                              int cols, int warps, float eps) {
  const int G = 32 * warps, t = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  if (row >= rows) return;  // a whole one-warp slot (a wider slot is alone in its block, row < rows)
  float v[4 * N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const Item it = load_item<kVec, true>(x + row * cols, k, cols, t, G);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[4 * k + j] = it.v[j];
  }
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4 * N; ++i) s += v[i];  // zeros past the end
  const float m = slot_sum(s, warps) / static_cast<float>(cols);
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < 4 * N; ++i) {
    const float d = v[i] - m;
    if (column_of(i, t, G) < cols) sq += d * d;
  }
  const float rs = 1.0f / sqrtf(slot_sum(sq, warps) / static_cast<float>(cols) + eps);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const Item wk = load_item<kVec>(w, k, cols, t, G), bk = load_item<kVec>(b, k, cols, t, G);
    Item out;
#pragma unroll
    for (int j = 0; j < 4; ++j) out.v[j] = (v[4 * k + j] - m) * rs * wk.v[j] + bk.v[j];
    store_item<kVec, true>(y + row * cols, k, cols, t, G, out);
  }
  if (t == 0) {
    mean[row] = m;
    rstd[row] = rs;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: dx = rstd (dy w - mean(dy w) - xhat mean(dy w xhat)), xhat = (x - mean) rstd.
// P blocks on a fixed grid; slot s of block p takes rows p slots + s, then every P slots further,
// and adds its columns' dy xhat and dy into its slot's sums in shared memory (each column a single
// thread's: no races, no barrier until the end). Then the block adds its slots in slot order into
// partials (P, S, C): row p is block p's [dw | db] (S = 2), or with kRound [dw | db | dx] (S = 3):
// then dx as written (added to what it held, with accumulate) is also rounded into dx_bf16 and
// summed down the columns, a gradient ready for the products and the bias after it.

template <int N, bool kVec, bool kRound>
__global__ void __launch_bounds__(kSlots * 32, backward_groups_per_sm(N, kVec))
    layer_norm_backward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                               const float* __restrict__ mean, const float* __restrict__ rstd,
                               const float* __restrict__ dy, float* __restrict__ dx, uint16_t* __restrict__ dx_bf16,
                               float* __restrict__ partials, int64_t rows, int cols, int warps, bool accumulate) {
  constexpr int S = kRound ? 3 : 2;
  extern __shared__ float4 shared_sums[];  // (slots, S, C), 16-byte aligned for the float4 items
  const int G = 32 * warps, t = threadIdx.x % G, slot = threadIdx.x / G, slots = blockDim.x / G;
  float* dw_sum = reinterpret_cast<float*>(shared_sums) + slot * S * cols;
  float* db_sum = dw_sum + cols;
  float* dx_sum = db_sum + cols;  // kRound only
  const float inv_cols = 1.0f / static_cast<float>(cols);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    store_item<kVec>(dw_sum, k, cols, t, G, Item{});
    store_item<kVec>(db_sum, k, cols, t, G, Item{});
    if constexpr (kRound) store_item<kVec>(dx_sum, k, cols, t, G, Item{});
  }
  // A whole slot iterates together (warps > 1: the block's only slot), as slot_sum needs.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * slots + slot; row < rows;
       row += static_cast<int64_t>(gridDim.x) * slots) {
    float xh[4 * N], g[4 * N];  // x, then xhat; dy, then dy w
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Item xi = load_item<kVec>(x + row * cols, k, cols, t, G);
      const Item di = load_item<kVec>(dy + row * cols, k, cols, t, G);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        xh[4 * k + j] = xi.v[j];
        g[4 * k + j] = di.v[j];
      }
    }
    const float m = mean[row], rs = rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const Item wk = load_item<kVec>(w, k, cols, t, G);
      Item sw = load_item<kVec>(dw_sum, k, cols, t, G), sb = load_item<kVec>(db_sum, k, cols, t, G);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = 4 * k + j;
        if (column_of(i, t, G) >= cols) continue;  // past the end: adds nothing, never stored
        const float xhat = (xh[i] - m) * rs, d = g[i];
        xh[i] = xhat;
        sw.v[j] += d * xhat;
        sb.v[j] += d;
        g[i] = d * wk.v[j];
        sum_g += g[i];
        sum_gx += g[i] * xhat;
      }
      store_item<kVec>(dw_sum, k, cols, t, G, sw);
      store_item<kVec>(db_sum, k, cols, t, G, sb);
    }
    const float mg = slot_sum(sum_g, warps) * inv_cols, mgx = slot_sum(sum_gx, warps) * inv_cols;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      Item out = accumulate ? load_item<kVec>(dx + row * cols, k, cols, t, G) : Item{};
#pragma unroll
      for (int j = 0; j < 4; ++j) out.v[j] += rs * (g[4 * k + j] - mg - xh[4 * k + j] * mgx);
      store_item<kVec>(dx + row * cols, k, cols, t, G, out);
      if constexpr (kRound) {
        store_item<kVec>(dx_bf16 + row * cols, k, cols, t, G, out);
        Item sx = load_item<kVec>(dx_sum, k, cols, t, G);
#pragma unroll
        for (int j = 0; j < 4; ++j) sx.v[j] += out.v[j];  // past the end: never stored
        store_item<kVec>(dx_sum, k, cols, t, G, sx);
      }
    }
  }
  __syncthreads();
  const float* sums = reinterpret_cast<const float*>(shared_sums);
  float* out = partials + static_cast<int64_t>(blockIdx.x) * S * cols;
  for (int j = threadIdx.x; j < S * cols; j += blockDim.x) {
    float s = sums[j];
    for (int k = 1; k < slots; ++k) s += sums[k * S * cols + j];
    out[j] = s;
  }
}

// dw[c] += sum_p partials[p][0][c], db[c] += sum_p partials[p][1][c] (and dx_sums[c] = sum_p
// partials[p][2][c] where the partials have S = 3 rows), in a fixed order. A block
// takes 8 of the 2C columns (a warp reads 4 rows of 32 bytes: whole sectors) and 64 row-threads,
// thread ty adding p = ty, ty + 64, ...; then 8 threads add 8 of those each, and one the 8 sums.
// Many blocks of few loads each: the partials are in L2 and the kernel is latency-bound.
__global__ void __launch_bounds__(kFinishCols * kFinishRows)
    layer_norm_param_finish_kernel(const float* __restrict__ partials, int64_t count, int64_t cols, int S,
                                   float* __restrict__ dw, float* __restrict__ db, float* __restrict__ dx_sums) {
  constexpr int kGroups = 8, kGroupRows = kFinishRows / kGroups;
  __shared__ float tile[kFinishRows][kFinishCols];
  __shared__ float group_sums[kGroups][kFinishCols];
  const int tx = threadIdx.x % kFinishCols, ty = threadIdx.x / kFinishCols;
  const int64_t width = S * cols, j = static_cast<int64_t>(blockIdx.x) * kFinishCols + tx;
  float s = 0.0f;
  if (j < width) {
#pragma unroll 4
    for (int64_t p = ty; p < count; p += kFinishRows) s += partials[p * width + j];
  }
  tile[ty][tx] = s;
  __syncthreads();
  if (ty < kGroups) {
    float g = 0.0f;
#pragma unroll
    for (int r = 0; r < kGroupRows; ++r) g += tile[ty * kGroupRows + r][tx];
    group_sums[ty][tx] = g;
  }
  __syncthreads();
  if (ty != 0 || j >= width) return;
  float total = 0.0f;
#pragma unroll
  for (int r = 0; r < kGroups; ++r) total += group_sums[r][tx];
  if (j >= 2 * cols) {
    dx_sums[j - 2 * cols] = total;
  } else {
    float* o = j < cols ? dw + j : db + (j - cols);
    *o += total;
  }
}

// ------------------------------------------------------------------------------------------------
// Rows too wide for the registers: a block per row, reading the row again for each pass (these
// widths are rare; L2 holds what a block rereads). dw and db: block (p, y) sums rows p, p + P, ...
// of a stripe of columns into partial row p.

template <class Out>
__global__ void layer_norm_forward_stream_kernel(const float* x, const float* w, const float* b, Out* y, float* mean,
                                                 float* rstd, int64_t cols, float eps) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * cols;
  Out* yr = y + row * cols;
  float s = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
  const float m = block_sum(s) / static_cast<float>(cols);
  float sq = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sq += (xr[c] - m) * (xr[c] - m);
  const float rs = 1.0f / sqrtf(block_sum(sq) / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = output<Out>((xr[c] - m) * rs * w[c] + b[c]);
  if (threadIdx.x == 0) {
    mean[row] = m;
    rstd[row] = rs;
  }
}

__global__ void layer_norm_dx_stream_kernel(const float* x, const float* w, const float* mean, const float* rstd,
                                            const float* dy, float* dx, int64_t cols, bool accumulate) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * cols;
  const float* dyr = dy + row * cols;
  float* dxr = dx + row * cols;
  const float m = mean[row], rs = rstd[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = dyr[c] * w[c];
    sum_g += g;
    sum_gx += g * ((xr[c] - m) * rs);
  }
  const float inv = 1.0f / static_cast<float>(cols);
  const float mg = block_sum(sum_g) * inv, mgx = block_sum(sum_gx) * inv;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float xhat = (xr[c] - m) * rs;
    dxr[c] = (accumulate ? dxr[c] : 0.0f) + rs * (dyr[c] * w[c] - mg - xhat * mgx);
  }
}

__global__ void layer_norm_param_stream_kernel(const float* x, const float* mean, const float* rstd, const float* dy,
                                               float* partials, int64_t rows, int64_t cols) {
  float* out = partials + static_cast<int64_t>(blockIdx.x) * 2 * cols;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float sw = 0.0f, sb = 0.0f;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
      const float d = dy[r * cols + c], xhat = (x[r * cols + c] - mean[r]) * rstd[r];
      sw += d * xhat;
      sb += d;
    }
    out[c] = sw;
    out[cols + c] = sb;
  }
}

// ------------------------------------------------------------------------------------------------
// Launch plans

template <class Out>
cudaError_t launch_forward(const float* x, const float* w, const float* b, Out* y, float* mean, float* rstd,
                           int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const RowShape shape = row_shape(cols, kMaxForwardWarps);
  if (shape.warps == 0) {
    if (!rows_fit(rows)) return cudaErrorInvalidValue;
    layer_norm_forward_stream_kernel<Out>
        <<<static_cast<unsigned>(rows), kStreamThreads, 0, stream>>>(x, w, b, y, mean, rstd, cols, eps);
    return cudaGetLastError();
  }
  const int64_t blocks = (rows + shape.slots - 1) / shape.slots;
  if (!rows_fit(blocks)) return cudaErrorInvalidValue;
  const bool vec = cols % 4 == 0 && aligned(x, 16) && aligned(w, 16) && aligned(b, 16) && aligned(y, 4 * sizeof(Out));
  const int c = static_cast<int>(cols);
  const auto grid = static_cast<unsigned>(blocks);
  with_items<kMaxItems>(shape.items, [&](auto n) {
    constexpr int N = decltype(n)::value;
    if (vec) {
      layer_norm_forward_kernel<N, true, Out>
          <<<grid, shape.threads(), 0, stream>>>(x, w, b, y, mean, rstd, rows, c, shape.warps, eps);
    } else {
      layer_norm_forward_kernel<N, false, Out>
          <<<grid, shape.threads(), 0, stream>>>(x, w, b, y, mean, rstd, rows, c, shape.warps, eps);
    }
  });
  return cudaGetLastError();
}

// The backward's grid (rows, cols >= 1). The workspace is sized for the vectorized plan, whose
// grid is never smaller than the scalar one's.
struct BackwardPlan {
  RowShape shape;           // shape.warps == 0: the streaming kernels
  int64_t blocks = 0;       // P, the partial rows
  unsigned col_blocks = 0;  // streaming: the column stripes of the dw/db kernel
};

BackwardPlan backward_plan(int64_t rows, int64_t cols, bool vec, const LaunchLimits& lim) {
  BackwardPlan plan;
  plan.shape = row_shape(cols, kMaxBackwardWarps);
  const int64_t sms = std::max(lim.multiprocessors, 1);
  if (plan.shape.warps > 0) {
    const int warps = plan.shape.warps * plan.shape.slots;  // a block's
    const int64_t per_sm = std::max(1, kSlots * backward_groups_per_sm(plan.shape.items, vec) / warps);
    plan.blocks = std::min(sms * per_sm, (rows + plan.shape.slots - 1) / plan.shape.slots);
  } else {
    const int64_t stripes = std::min<int64_t>((cols + kStreamThreads - 1) / kStreamThreads, 65535);
    plan.col_blocks = static_cast<unsigned>(stripes);
    plan.blocks = std::clamp<int64_t>(sms * kBlocksPerSm / stripes, 1, std::min<int64_t>(rows, 65535));
  }
  return plan;
}

}  // namespace

// ================================================================================================
// Launchers

cudaError_t layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                               int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  return launch_forward<float>(x, w, b, y, mean, rstd, rows, cols, eps, stream);
}

cudaError_t layer_norm_forward_bf16(const float* x, const float* w, const float* b, uint16_t* y, float* mean,
                                    float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  return launch_forward<uint16_t>(x, w, b, y, mean, rstd, rows, cols, eps, stream);
}

bool layer_norm_backward_rounds(int64_t cols) { return row_shape(cols, kMaxBackwardWarps).warps > 0; }

size_t layer_norm_backward_workspace_bytes(int64_t rows, int64_t cols, const LaunchLimits& lim) {
  if (rows <= 0 || cols <= 0) return 0;
  return static_cast<size_t>(backward_plan(rows, cols, true, lim).blocks * 3 * cols) * sizeof(float);
}

cudaError_t layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                                float* dx, float* dw, float* db, uint16_t* dx_bf16, float* dx_sums, int64_t rows,
                                int64_t cols, bool accumulate_dx, void* workspace, const LaunchLimits& lim,
                                cudaStream_t stream) {
  const bool round = dx_bf16 != nullptr;
  if (round && !layer_norm_backward_rounds(cols)) return cudaErrorInvalidValue;
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) return round ? cudaMemsetAsync(dx_sums, 0, static_cast<size_t>(cols) * sizeof(float), stream)
                              : cudaSuccess;
  const bool vec = cols % 4 == 0 && aligned(x, 16) && aligned(w, 16) && aligned(dy, 16) && aligned(dx, 16) &&
                   (!round || aligned(dx_bf16, 8));
  const BackwardPlan plan = backward_plan(rows, cols, vec, lim);
  const int S = round ? 3 : 2;  // partial rows a block: dw, db (, dx)
  auto* partials = static_cast<float*>(workspace);
  if (plan.shape.warps == 0) {
    if (!rows_fit(rows)) return cudaErrorInvalidValue;
    layer_norm_dx_stream_kernel<<<static_cast<unsigned>(rows), kStreamThreads, 0, stream>>>(x, w, mean, rstd, dy, dx,
                                                                                            cols, accumulate_dx);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    layer_norm_param_stream_kernel<<<dim3(static_cast<unsigned>(plan.blocks), plan.col_blocks), kStreamThreads, 0,
                                     stream>>>(x, mean, rstd, dy, partials, rows, cols);
  } else {
    const RowShape shape = plan.shape;
    const size_t smem = static_cast<size_t>(shape.slots * S * cols) * sizeof(float);  // <= 48 KB
    const int c = static_cast<int>(cols);
    const auto blocks = static_cast<unsigned>(plan.blocks);
    with_items<kMaxItems>(shape.items, [&](auto n) {
      constexpr int N = decltype(n)::value;
      auto launch = [&](auto kernel) {
        kernel<<<blocks, shape.threads(), smem, stream>>>(x, w, mean, rstd, dy, dx, dx_bf16, partials, rows, c,
                                                          shape.warps, accumulate_dx);
      };
      if (vec) {
        round ? launch(layer_norm_backward_kernel<N, true, true>) : launch(layer_norm_backward_kernel<N, true, false>);
      } else {
        round ? launch(layer_norm_backward_kernel<N, false, true>) : launch(layer_norm_backward_kernel<N, false, false>);
      }
    });
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const auto finish_blocks = static_cast<unsigned>((S * cols + kFinishCols - 1) / kFinishCols);
  layer_norm_param_finish_kernel<<<finish_blocks, kFinishCols * kFinishRows, 0, stream>>>(partials, plan.blocks, cols,
                                                                                           S, dw, db, dx_sums);
  return cudaGetLastError();
}

}  // namespace tutti::cuda::kernels
