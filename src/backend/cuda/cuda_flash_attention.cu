// Causal flash attention in bf16 for head size 64: the scores and probabilities of a 64 x 64
// tile live in registers and never reach memory; the softmax is computed online (running row max
// and sum, the output rescaled as they grow), and backward recomputes the probabilities from q, k
// and each row's log-sum-exp. Products on the tensor cores with mma.sync m16n8k16 (bf16 operands,
// fp32 accumulators), softmax and statistics in fp32. The scheme is FlashAttention-2's (Dao, 2023):
// forward parallel over query tiles, backward over key tiles with dQ accumulated atomically.
// Shared-memory fragments by ldmatrix, K and V tiles of the forward double-buffered by cp.async;
// the backward reads dO in bf16 (rounded once by the dvec kernel) with its Q, dO, lse and dvec
// tiles double-buffered by cp.async, and adds dQ four columns per atomic.
// Letters: B batch, T time, C channels, H heads, D head size (64), g = lane / 4, t = lane % 4.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "backend/cuda/cuda_device_util.cuh"
#include "backend/cuda/cuda_kernels.cuh"

namespace tutti::cuda::kernels {
namespace {

using namespace device;

constexpr int D = kFlashHeadDim;  // 64
constexpr int kTile = 64;         // query rows and key rows per tile: 4 warps of 16
constexpr int kWarps = 4;
constexpr int kPad = D + 8;       // shared-memory row of a tile, in bf16 (16 bytes of padding: no bank conflicts)
constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------------
// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): A (16 x 16, row) in
// 4 registers of two bf16: {row g, cols 2t..2t+1}, {row g+8, same}, {row g, cols 2t+8..}, {row g+8,
// cols 2t+8..}; B (16 x 8, col) in 2: {rows 2t..2t+1, col g}, {rows 2t+8..2t+9, col g}; C (16 x 8
// fp32) in 4: {row g, cols 2t, 2t+1}, {row g+8, cols 2t, 2t+1}. The lower index is the low half.

struct Acc {  // a 16 x 8 fp32 tile
  float v[4];
};

__device__ __forceinline__ void mma(Acc& c, const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const uint32_t l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
  const uint32_t h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  return l | (h << 16);
}
__device__ __forceinline__ uint32_t pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t two(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// ldmatrix (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): four 8 x 8 bf16 matrices, lanes
// 8i..8i+7 giving the addresses of matrix i's rows; lane l receives row l / 4, columns 2 (l % 4) and
// the next of each (with .trans: rows 2 (l % 4) and the next, column l / 4). Rows must be 16-byte aligned.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// cp.async of 16 bytes into shared memory, zeros where `bytes` is 0; commit and wait by groups.
__device__ __forceinline__ void cp_async16(uint16_t* dst, const uint16_t* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A fragments of 16 rows x D of a row-major bf16 matrix (row stride `ld`), row0 its first row;
// rows at or past `rows` read as zeros. Four 16-column slices.
__device__ __forceinline__ void load_a_rows(const uint16_t* m, int64_t ld, int64_t row0, int64_t rows,
                                            uint32_t (&a)[4][4]) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int64_t r0 = row0 + g, r1 = row0 + g + 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int c = 16 * kk + 2 * t;
    a[kk][0] = r0 < rows ? pair(m + r0 * ld + c) : 0u;
    a[kk][1] = r1 < rows ? pair(m + r1 * ld + c) : 0u;
    a[kk][2] = r0 < rows ? pair(m + r0 * ld + c + 8) : 0u;
    a[kk][3] = r1 < rows ? pair(m + r1 * ld + c + 8) : 0u;
  }
}

// A fragments (16 x 16 slice kk) from 8 fp32 accumulator tiles of the same 16 rows: tiles 2kk and
// 2kk+1 hold columns 16kk..16kk+15 in exactly the A layout.
__device__ __forceinline__ void acc_to_a(const Acc (&s)[8], int kk, uint32_t (&a)[4]) {
  a[0] = pack(s[2 * kk].v[0], s[2 * kk].v[1]);
  a[1] = pack(s[2 * kk].v[2], s[2 * kk].v[3]);
  a[2] = pack(s[2 * kk + 1].v[0], s[2 * kk + 1].v[1]);
  a[3] = pack(s[2 * kk + 1].v[2], s[2 * kk + 1].v[3]);
}

// acc (16 x 64) += A (16 x 64, fragments a) . M^T, M a shared (64 x D) tile: out[r][j] = sum_d A[r][d] M[j][d].
// kFast: B fragments by ldmatrix (matrices: rows 8j.., columns 32h, 32h + 8, 32h + 16, 32h + 24 =
// b0, b1 of slice 2h and of 2h + 1); otherwise by 32-bit loads.
template <bool kFast>
__device__ __forceinline__ void mul_transposed(Acc (&acc)[8], const uint32_t (&a)[4][4], const uint16_t* m) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if constexpr (kFast) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t b[4];
        ldsm4(b, m + (8 * j + (lane & 7)) * kPad + 32 * h + 8 * (lane >> 3));
        mma(acc[j], a[2 * h], b[0], b[1]);
        mma(acc[j], a[2 * h + 1], b[2], b[3]);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint16_t* row = m + (8 * j + g) * kPad + 16 * kk + 2 * t;
        mma(acc[j], a[kk], pair(row), pair(row + 8));
      }
    }
  }
}

// acc (16 x D) += A (16 x 16: columns 16kk.. of the left factor) . M[16kk..16kk+15][0..D), M a shared
// (64 x D) tile. kFast: B fragments by ldmatrix.trans (matrices: rows 16kk, 16kk + 8 at columns 16n2,
// then at 16n2 + 8 = b0, b1 of column tiles 2n2, 2n2 + 1); otherwise by 16-bit loads.
template <bool kFast>
__device__ __forceinline__ void mul_slice(Acc (&acc)[8], const uint32_t (&a)[4], const uint16_t* m, int kk) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if constexpr (kFast) {
    const uint16_t* base = m + (16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)) * kPad + 8 * (lane >> 4);
#pragma unroll
    for (int n2 = 0; n2 < 4; ++n2) {
      uint32_t b[4];
      ldsm4_t(b, base + 16 * n2);
      mma(acc[2 * n2], a, b[0], b[1]);
      mma(acc[2 * n2 + 1], a, b[2], b[3]);
    }
  } else {
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const uint16_t* col = m + (16 * kk + 2 * t) * kPad + 8 * n + g;
      mma(acc[n], a, two(col[0], col[kPad]), two(col[8 * kPad], col[9 * kPad]));
    }
  }
}

// acc (16 x D) += P (16 x 64, as accumulator tiles p) . M, M a shared (64 x D) tile.
template <bool kFast>
__device__ __forceinline__ void mul_plain(Acc (&acc)[8], const Acc (&p)[8], const uint16_t* m) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    acc_to_a(p, kk, a);
    mul_slice<kFast>(acc, a, m, kk);
  }
}

__device__ __forceinline__ void zero(Acc (&acc)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = Acc{{0.0f, 0.0f, 0.0f, 0.0f}};
}

// Copies rows [row0, row0 + 64) x D of a bf16 matrix (row stride ld) into a shared tile, 16 bytes
// per access; rows at or past `rows` become zeros.
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* m, int64_t ld, int64_t row0, int64_t rows) {
  for (int i = threadIdx.x; i < kTile * D / 8; i += blockDim.x) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) v = *reinterpret_cast<const uint4*>(m + (row0 + r) * ld + c);
    *reinterpret_cast<uint4*>(tile + r * kPad + c) = v;
  }
}

// load_tile by cp.async (the caller commits and waits).
__device__ __forceinline__ void load_tile_async(uint16_t* tile, const uint16_t* m, int64_t ld, int64_t row0,
                                                int64_t rows) {
  for (int i = threadIdx.x; i < kTile * D / 8; i += blockDim.x) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    const bool in = row0 + r < rows;
    cp_async16(tile + r * kPad + c, in ? m + (row0 + r) * ld + c : m, in ? 16 : 0);
  }
}

// The same from an fp32 matrix, rounded to bf16.
__device__ __forceinline__ void load_tile_f32(uint16_t* tile, const float* m, int64_t ld, int64_t row0, int64_t rows) {
  for (int i = threadIdx.x; i < kTile * D / 4; i += blockDim.x) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (row0 + r < rows) v = *reinterpret_cast<const float4*>(m + (row0 + r) * ld + c);
    *reinterpret_cast<uint2*>(tile + r * kPad + c) = make_uint2(pack(v.x, v.y), pack(v.z, v.w));
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: block (query tile, b * H + h), warp w owns queries q0 = 64 tile + 16 w .. + 15.
// kFast (the default; TUTTI_CUDA_FLASH_V1=1 selects the first version for comparison): the longest
// rows' blocks start first, K and V tiles double-buffered by cp.async, ldmatrix fragments, and the
// causal mask only on the diagonal tile (every earlier key tile is wholly visible and inside T).
// ~100 lines: the loop's stages share the warp's registers (Q fragments, O, the row statistics).

template <bool kFast>
__global__ void __launch_bounds__(kWarps * 32) flash_forward_kernel(const uint16_t* qkv, float* y, float* lse,
                                                                     int64_t T, int64_t C, int64_t H, float scale2) {
  constexpr int kBufs = kFast ? 2 : 1;
  __shared__ __align__(16) uint16_t ks[kBufs][kTile * kPad];
  __shared__ __align__(16) uint16_t vs[kBufs][kTile * kPad];
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H, ld = 3 * C;
  const int64_t qtile = kFast ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const uint16_t* q = qkv + b * T * ld + h * D;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int64_t q0 = qtile * kTile + 16 * warp;
  if constexpr (kFast) {
    load_tile_async(ks[0], q + C, ld, 0, T);
    load_tile_async(vs[0], q + 2 * C, ld, 0, T);
    cp_async_commit();
  }
  uint32_t qa[4][4];
  load_a_rows(q, ld, q0, T, qa);
  Acc o[8];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g + 8, log2 units
  for (int64_t kt = 0; kt <= qtile; ++kt) {
    const int buf = kFast ? kt & 1 : 0;
    if constexpr (kFast) {
      if (kt < qtile) {  // the next tiles into the other buffer, read two iterations ago
        load_tile_async(ks[buf ^ 1], q + C, ld, (kt + 1) * kTile, T);
        load_tile_async(vs[buf ^ 1], q + 2 * C, ld, (kt + 1) * kTile, T);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
    } else {
      __syncthreads();  // the previous tiles are consumed
      load_tile(ks[0], q + C, ld, kt * kTile, T);
      load_tile(vs[0], q + 2 * C, ld, kt * kTile, T);
      __syncthreads();
    }
    Acc s[8];
    zero(s);
    mul_transposed<kFast>(s, qa, ks[buf]);
    float tile_max[2] = {-INFINITY, -INFINITY};
    if (!kFast || kt == qtile) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = kt * kTile + 8 * j + 2 * t + (e & 1), query = q0 + g + 8 * (e >> 1);
          s[j].v[e] = key <= query && key < T ? s[j].v[e] * scale2 : -INFINITY;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j].v[e]);
        }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[j].v[e] *= scale2;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j].v[e]);
        }
    }
    float alpha[2], ref[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      ref[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays zero
      alpha[r] = exp2f(m[r] - ref[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j].v[e] = exp2f(s[j].v[e] - ref[e >> 1]);
        l[e >> 1] += s[j].v[e];
        o[j].v[e] *= alpha[e >> 1];
      }
    mul_plain<kFast>(o, s, vs[buf]);
    if constexpr (kFast) __syncthreads();  // buffer `buf` is refilled by the next iteration
  }
  // Finish: the row sums over the quad, y = O / l, lse = m + log2 l.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int64_t rows[2] = {q0 + g, q0 + g + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    float* yr = y + (b * T + rows[r]) * C + h * D;
#pragma unroll
    for (int n = 0; n < 8; ++n)
      *reinterpret_cast<float2*>(yr + 8 * n + 2 * t) = make_float2(o[n].v[2 * r] / l[r], o[n].v[2 * r + 1] / l[r]);
    if (t == 0) lse[blockIdx.y * T + rows[r]] = m[r] + log2f(l[r]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward

// dvec[(b H + h) T + i] = sum_d dy[b, i, h D + d] y[b, i, h D + d]: one warp per (row, head). With
// dob, also dy in bf16 (rounded once here, not in every tile of the backward), row b T + i at
// dob + (b T + i) 6C + h D: the first half of the row's dq slot of dqkv, which is written only
// after the backward kernel (by the dq scatter).
__global__ void flash_dvec_kernel(const float* y, const float* dy, float* dvec, uint16_t* dob, int64_t rows, int64_t T,
                                  int64_t C, int64_t H) {
  const int64_t item = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;  // (b, i, h)
  if (item >= rows * H) return;
  const int64_t row = item / H, h = item % H, b = row / T, i = row % T;
  const int lane = threadIdx.x & 31;
  const float2 a = *reinterpret_cast<const float2*>(y + row * C + h * D + 2 * lane);
  const float2 d = *reinterpret_cast<const float2*>(dy + row * C + h * D + 2 * lane);
  const float sum = warp_reduce(a.x * d.x + a.y * d.y, SumOp{});
  if (lane == 0) dvec[(b * H + h) * T + i] = sum;
  if (dob != nullptr) *reinterpret_cast<uint32_t*>(dob + row * 6 * C + h * D + 2 * lane) = pack(d.x, d.y);
}

// Block (key tile, b * H + h), warp w owns keys k0 = 64 tile + 16 w .. + 15 and walks the query
// tiles from the diagonal on: P^T = exp2(scale2 K Q^T - lse), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - dvec), dK += dS^T Q, and dQ += dS K through shared memory and atomics.
// One function of ~100 lines: the steps of a tile share the warp's registers (K and V fragments,
// the dK and dV accumulators). kFast: ldmatrix fragments, and the mask only on the diagonal tile
// and the last (which may reach past T); kMinBlocks caps the registers for that many blocks per SM.
// kPipe: dO read in bf16 (dob, written by flash_dvec_kernel, row stride 6C), the Q, dO, lse and
// dvec tiles double-buffered by cp.async, and the longest key tiles' blocks started first.
// Shared memory (dynamic): flash_backward_smem<kPipe>() bytes.
template <bool kPipe>
constexpr int flash_backward_smem() {
  return (2 * (kPipe ? 2 : 1) + 2) * kTile * kPad * 2 + 2 * (kPipe ? 2 : 1) * kTile * 4;
}
template <bool kFast, int kMinBlocks, bool kPipe>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) flash_backward_kernel(const uint16_t* qkv, const float* lse,
                                                                      const float* dvec, const float* dy,
                                                                      const uint16_t* dob, float* dqkv,
                                                                      float* dq_acc, int64_t T, int64_t C, int64_t H,
                                                                      float scale2, float scale) {
  constexpr int kBufs = kPipe ? 2 : 1, kTileElems = kTile * kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* const qs0 = smem;                          // kBufs tiles
  uint16_t* const dos0 = smem + kBufs * kTileElems;    // kBufs tiles
  uint16_t* const ks = smem + 2 * kBufs * kTileElems;  // K of this block
  uint16_t* const dss = ks + kTileElems;               // dS^T: keys x queries
  float* const lse_s0 = reinterpret_cast<float*>(dss + kTileElems);  // kBufs x kTile
  float* const dvec_s0 = lse_s0 + kBufs * kTile;                     // kBufs x kTile
  const int64_t tiles = (T + kTile - 1) / kTile;
  int64_t bh = blockIdx.y, ktile = blockIdx.x;
  if constexpr (kPipe) {  // linear block index -> (key tile, head): key tile 0 (the longest walk) first
    const int64_t linear = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
    ktile = linear / gridDim.y, bh = linear % gridDim.y;
  }
  const int64_t b = bh / H, h = bh % H, ld = 3 * C;
  const uint16_t* q = qkv + b * T * ld + h * D;
  const float* dyb = dy + b * T * C + h * D;
  const uint16_t* dobb = kPipe ? dob + b * T * 6 * C + h * D : nullptr;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int64_t key0 = ktile * kTile, k0 = key0 + 16 * warp;
  // kPipe: Q, dO, lse and dvec of query tile qt into buffer buf, one cp.async group.
  // Thread i copies 16 bytes of rows i / 8 + 16 j (j < 4), columns 8 (i % 8).., of both tiles.
  const int lr = threadIdx.x >> 3, lc = 8 * (threadIdx.x & 7), soff = lr * kPad + lc;
  const uint16_t* const qsrc = q + lr * ld + lc;
  const uint16_t* const osrc = kPipe ? dobb + lr * 6 * C + lc : nullptr;
  auto issue = [&](int64_t qt, int buf) {
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j) {
      const int64_t row0 = qt * kTile + 16 * j;
      const bool in = row0 + lr < T;
      cp_async16(qs0 + buf * kTileElems + 16 * j * kPad + soff, in ? qsrc + row0 * ld : q, in ? 16 : 0);
      cp_async16(dos0 + buf * kTileElems + 16 * j * kPad + soff, in ? osrc + row0 * 6 * C : q, in ? 16 : 0);
    }
    const int i = threadIdx.x & (kTile - 1);  // 128 threads: lse by the first 64, dvec by the rest
    const int64_t row = qt * kTile + i;
    const bool in = row < T;
    float* dst = (threadIdx.x < kTile ? lse_s0 : dvec_s0) + buf * kTile + i;
    const float* src = (threadIdx.x < kTile ? lse : dvec) + bh * T + (in ? row : 0);
    cp_async4(dst, src, in ? 4 : 0);
    cp_async_commit();
  };
  if constexpr (kPipe) issue(ktile, 0);
  uint32_t ka[4][4], va[4][4];
  load_a_rows(q + C, ld, k0, T, ka);
  load_a_rows(q + 2 * C, ld, k0, T, va);
  load_tile(ks, q + C, ld, key0, T);
  Acc dk[8], dv[8];
  zero(dk);
  zero(dv);
  for (int64_t qt = ktile; qt < tiles; ++qt) {
    const int buf = kPipe ? (qt - ktile) & 1 : 0;
    if constexpr (kPipe) {
      // Buffer buf ^ 1 was last read before the previous iteration's second barrier: refill it.
      if (qt + 1 < tiles) {
        issue(qt + 1, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // this tile's data visible; the previous dQ step is done with dss
    } else {
      __syncthreads();  // the previous tiles are consumed
      load_tile(qs0, q, ld, qt * kTile, T);
      load_tile_f32(dos0, dyb, C, qt * kTile, T);
      for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
        const int64_t row = qt * kTile + i;
        lse_s0[i] = row < T ? lse[bh * T + row] : 0.0f;
        dvec_s0[i] = row < T ? dvec[bh * T + row] : 0.0f;
      }
      __syncthreads();
    }
    const uint16_t* qs = qs0 + buf * kTileElems;
    const uint16_t* dos = dos0 + buf * kTileElems;
    const float* lse_s = lse_s0 + buf * kTile;
    const float* dvec_s = dvec_s0 + buf * kTile;
    Acc p[8], dp[8];
    zero(p);
    mul_transposed<kFast>(p, ka, qs);  // S^T (16 keys x 64 queries)
    if (!kFast || qt == ktile || (qt + 1) * kTile > T) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * t + (e & 1);
          const int64_t key = k0 + g + 8 * (e >> 1), query = qt * kTile + col;
          p[j].v[e] = key <= query && query < T && key < T ? exp2f(p[j].v[e] * scale2 - lse_s[col]) : 0.0f;
        }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j].v[e] = exp2f(p[j].v[e] * scale2 - lse_s[8 * j + 2 * t + (e & 1)]);
    }
    mul_plain<kFast>(dv, p, dos);  // dV += P^T dO
    zero(dp);
    mul_transposed<kFast>(dp, va, dos);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j].v[e] = p[j].v[e] * (dp[j].v[e] - dvec_s[8 * j + 2 * t + (e & 1)]);  // dS^T
    mul_plain<kFast>(dk, dp, qs);  // dK += dS^T Q
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // dS^T to shared memory, rows = this warp's keys
      uint16_t* r0 = dss + (16 * warp + g) * kPad + 8 * j + 2 * t;
      *reinterpret_cast<uint32_t*>(r0) = pack(dp[j].v[0], dp[j].v[1]);
      *reinterpret_cast<uint32_t*>(r0 + 8 * kPad) = pack(dp[j].v[2], dp[j].v[3]);
    }
    __syncthreads();
    // dQ rows 16 warp .. + 15 of this query tile: dS (queries x 64 keys) . K (64 keys x D).
    Acc dq[8];
    zero(dq);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // dS[query][key] = dss[key][query]
      uint32_t a[4];
      if constexpr (kFast) {  // matrices: keys 16kk, 16kk, 16kk + 8, 16kk + 8 at queries 16w, 16w + 8, 16w, 16w + 8
        const int lane = threadIdx.x & 31;
        ldsm4_t(a, dss + (16 * kk + 8 * (lane >> 4) + (lane & 7)) * kPad + 16 * warp + 8 * ((lane >> 3) & 1));
      } else {
        const uint16_t* c = dss + (16 * kk + 2 * t) * kPad + 16 * warp + g;
        a[0] = two(c[0], c[kPad]), a[1] = two(c[8], c[kPad + 8]);
        a[2] = two(c[8 * kPad], c[9 * kPad]), a[3] = two(c[8 * kPad + 8], c[9 * kPad + 8]);
      }
      mul_slice<kFast>(dq, a, ks, kk);
    }
    if constexpr (kPipe) {
      // Four columns per atomic (sm_90's float4 atomicAdd): lanes t and t ^ 1 trade halves, the
      // even one then holds row g, columns 8n + 2t..+3, the odd one row g + 8, columns 8n + 2t - 2..+3.
      const bool odd = t & 1;
      const int64_t row = qt * kTile + 16 * warp + g + (odd ? 8 : 0);
      float* out = dq_acc + (bh * T + row) * D + 2 * (t & 2);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float sx = odd ? dq[n].v[0] : dq[n].v[2], sy = odd ? dq[n].v[1] : dq[n].v[3];
        const float rx = __shfl_xor_sync(0xffffffffu, sx, 1), ry = __shfl_xor_sync(0xffffffffu, sy, 1);
        const float4 v = odd ? make_float4(rx, ry, dq[n].v[2], dq[n].v[3])
                             : make_float4(dq[n].v[0], dq[n].v[1], rx, ry);
        if (row < T) atomicAdd(reinterpret_cast<float4*>(out + 8 * n), v);
      }
    } else {
      const int64_t rows[2] = {qt * kTile + 16 * warp + g, qt * kTile + 16 * warp + g + 8};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (rows[r] >= T) continue;
        float* out = dq_acc + (bh * T + rows[r]) * D;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          atomicAdd(out + 8 * n + 2 * t, dq[n].v[2 * r]);
          atomicAdd(out + 8 * n + 2 * t + 1, dq[n].v[2 * r + 1]);
        }
      }
    }
  }
  const int64_t rows[2] = {k0 + g, k0 + g + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    float* out = dqkv + (b * T + rows[r]) * ld + h * D;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      *reinterpret_cast<float2*>(out + C + 8 * n + 2 * t) =
          make_float2(scale * dk[n].v[2 * r], scale * dk[n].v[2 * r + 1]);
      *reinterpret_cast<float2*>(out + 2 * C + 8 * n + 2 * t) = make_float2(dv[n].v[2 * r], dv[n].v[2 * r + 1]);
    }
  }
}

// dqkv[b, i, h D + d] = scale dq_acc[(b H + h) T + i, d]
struct ScatterDq {
  const float* dq_acc;
  float* dqkv;
  int64_t T, C, H;
  float scale;
  __device__ void operator()(int64_t i) const {
    const int64_t d = i % D, row = i / D, bh = row / T, q = row % T, b = bh / H, h = bh % H;
    dqkv[(b * T + q) * 3 * C + h * D + d] = scale * dq_acc[i];
  }
};

template <class F>
__global__ void scatter_kernel(int64_t n, F f) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) f(i);
}

bool flash_shapes_ok(const void* qkv, int64_t B, int64_t T, int64_t C, int64_t H) {
  return B > 0 && T > 0 && H > 0 && C == H * D && B * H <= 65535 && (T + kTile - 1) / kTile <= 0x7fffffff &&
         reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
}

// TUTTI_CUDA_FLASH_V1=1: the first version of both kernels (for A/B timings), read once.
bool flash_v1() {
  static const bool v1 = [] {
    const char* e = std::getenv("TUTTI_CUDA_FLASH_V1");
    return e != nullptr && e[0] == '1';
  }();
  return v1;
}

// TUTTI_CUDA_FLASH_BWD_V2=1: the backward before the bf16 dO and cp.async tiles (for A/B timings).
bool flash_bwd_v2() {
  static const bool v2 = [] {
    const char* e = std::getenv("TUTTI_CUDA_FLASH_BWD_V2");
    return e != nullptr && e[0] == '1';
  }();
  return v2;
}

}  // namespace

// ================================================================================================
// Launchers

cudaError_t flash_attention_forward(const uint16_t* qkv, float* y, float* lse, int64_t B, int64_t T, int64_t C,
                                    int64_t H, cudaStream_t stream) {
  if (!flash_shapes_ok(qkv, B, T, C, H)) return cudaErrorInvalidValue;
  const float scale2 = kLog2e / sqrtf(static_cast<float>(D));
  const dim3 grid(static_cast<unsigned>((T + kTile - 1) / kTile), static_cast<unsigned>(B * H));
  const bool v1 = flash_v1();
  if (v1)
    flash_forward_kernel<false><<<grid, kWarps * 32, 0, stream>>>(qkv, y, lse, T, C, H, scale2);
  else
    flash_forward_kernel<true><<<grid, kWarps * 32, 0, stream>>>(qkv, y, lse, T, C, H, scale2);
  return cudaGetLastError();
}

cudaError_t flash_attention_backward(const uint16_t* qkv, const float* y, const float* lse, const float* dy,
                                     float* dqkv, float* dq_acc, float* dvec, int64_t B, int64_t T, int64_t C,
                                     int64_t H, const LaunchLimits& lim, cudaStream_t stream) {
  if (!flash_shapes_ok(qkv, B, T, C, H)) return cudaErrorInvalidValue;
  const float scale = 1.0f / sqrtf(static_cast<float>(D)), scale2 = kLog2e * scale;
  const bool v1 = flash_v1();
  // The bf16 dO lives in dqkv's dq slots (16-byte rows wanted for cp.async).
  const bool pipe = !v1 && !flash_bwd_v2() && reinterpret_cast<uintptr_t>(dqkv) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(dq_acc) % 16 == 0;
  uint16_t* dob = pipe ? reinterpret_cast<uint16_t*>(dqkv) : nullptr;
  const int64_t items = B * T * H;  // one warp each
  flash_dvec_kernel<<<static_cast<unsigned>((items * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      y, dy, dvec, dob, B * T, T, C, H);
  cudaError_t err = cudaMemsetAsync(dq_acc, 0, static_cast<size_t>(B * H * T * D) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((T + kTile - 1) / kTile), static_cast<unsigned>(B * H));
  constexpr int kSmem1 = flash_backward_smem<false>(), kSmem2 = flash_backward_smem<true>();
  if (v1) {
    flash_backward_kernel<false, 1, false><<<grid, kWarps * 32, kSmem1, stream>>>(qkv, lse, dvec, dy, nullptr, dqkv,
                                                                                  dq_acc, T, C, H, scale2, scale);
  } else if (!pipe) {  // 3 blocks of 4 warps per SM (168 registers, 80 bytes spilled): 0.85 ms, 0.97 at 2 (H200)
    flash_backward_kernel<true, 3, false><<<grid, kWarps * 32, kSmem1, stream>>>(qkv, lse, dvec, dy, nullptr, dqkv,
                                                                                 dq_acc, T, C, H, scale2, scale);
  } else {  // bf16 dO, cp.async tiles, float4 dQ atomics: 0.73 -> 0.39 ms for the kernel (H200, GPT-2 B16)
    static const cudaError_t attr = cudaFuncSetAttribute(flash_backward_kernel<true, 3, true>,
                                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem2);
    if (attr != cudaSuccess) return attr;
    flash_backward_kernel<true, 3, true><<<grid, kWarps * 32, kSmem2, stream>>>(qkv, lse, dvec, dy, dob, dqkv, dq_acc,
                                                                                T, C, H, scale2, scale);
  }
  const int64_t n = B * H * T * D;
  scatter_kernel<<<grid_for(n, lim), kThreads, 0, stream>>>(n, ScatterDq{dq_acc, dqkv, T, C, H, scale});
  return cudaGetLastError();
}

}  // namespace tutti::cuda::kernels
