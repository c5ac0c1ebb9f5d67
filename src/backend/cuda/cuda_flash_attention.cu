// Causal flash attention in bf16 for head size 64: the scores and probabilities of a 64 x 64
// tile live in registers and never reach memory; the softmax is computed online (running row max
// and sum, the output rescaled as they grow), and backward recomputes the probabilities from q, k
// and each row's log-sum-exp. Products on the tensor cores with mma.sync m16n8k16 (bf16 operands,
// fp32 accumulators), softmax and statistics in fp32. The scheme is FlashAttention-2's (Dao, 2023):
// forward parallel over query tiles, backward over key tiles with dQ accumulated atomically.
// Shared-memory fragments by ldmatrix, K and V tiles of the forward double-buffered by cp.async;
// the backward reads dO (dy) in bf16 with its Q, dO, lse and dvec tiles double-buffered by
// cp.async, and adds dQ four columns per atomic. Activations and gradients in and out are bf16
// (qkv, y, dy, dqkv), rounded once from the fp32 registers; lse and scratch are fp32.
// Letters: B batch, T time, C channels, H heads, D head size (64), g = lane / 4, t = lane % 4.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// 2^x by the SFU's approximation (ex2.approx.ftz: relative error ~2^-22, subnormals flushed, -inf
// -> 0), the same in forward and backward: the probabilities are rounded to bf16 after it anyway.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

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
  a[0] = bits_of2(s[2 * kk].v[0], s[2 * kk].v[1]);
  a[1] = bits_of2(s[2 * kk].v[2], s[2 * kk].v[3]);
  a[2] = bits_of2(s[2 * kk + 1].v[0], s[2 * kk + 1].v[1]);
  a[3] = bits_of2(s[2 * kk + 1].v[2], s[2 * kk + 1].v[3]);
}

// acc (16 x 64) += A (16 x 64, fragments a) . M^T, M a shared (64 x D) tile: out[r][j] = sum_d A[r][d] M[j][d].
// B fragments by ldmatrix (matrices: rows 8j.., columns 32h, 32h + 8, 32h + 16, 32h + 24 = b0, b1
// of slice 2h and of 2h + 1).
__device__ __forceinline__ void mul_transposed(Acc (&acc)[8], const uint32_t (&a)[4][4], const uint16_t* m) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t b[4];
      ldsm4(b, m + (8 * j + (lane & 7)) * kPad + 32 * h + 8 * (lane >> 3));
      mma(acc[j], a[2 * h], b[0], b[1]);
      mma(acc[j], a[2 * h + 1], b[2], b[3]);
    }
  }
}

// acc (16 x D) += A (16 x 16: columns 16kk.. of the left factor) . M[16kk..16kk+15][0..D), M a shared
// (64 x D) tile. B fragments by ldmatrix.trans (matrices: rows 16kk, 16kk + 8 at columns 16n2, then
// at 16n2 + 8 = b0, b1 of column tiles 2n2, 2n2 + 1).
__device__ __forceinline__ void mul_slice(Acc (&acc)[8], const uint32_t (&a)[4], const uint16_t* m, int kk) {
  const int lane = threadIdx.x & 31;
  const uint16_t* base = m + (16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)) * kPad + 8 * (lane >> 4);
#pragma unroll
  for (int n2 = 0; n2 < 4; ++n2) {
    uint32_t b[4];
    ldsm4_t(b, base + 16 * n2);
    mma(acc[2 * n2], a, b[0], b[1]);
    mma(acc[2 * n2 + 1], a, b[2], b[3]);
  }
}

// acc (16 x D) += P (16 x 64, as accumulator tiles p) . M, M a shared (64 x D) tile.
__device__ __forceinline__ void mul_plain(Acc (&acc)[8], const Acc (&p)[8], const uint16_t* m) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    acc_to_a(p, kk, a);
    mul_slice(acc, a, m, kk);
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

// ------------------------------------------------------------------------------------------------
// Forward: block (query tile of 128 rows, b * H + h), 8 warps, warp w owns queries q0 = 128 tile +
// 16 w .. + 15; the K and V tiles (64 keys, double-buffered by cp.async) are shared by all eight.
// The longest rows' blocks start first. The causal mask is applied only on the tiles that reach
// past a warp's first row (every earlier key tile is wholly visible and inside T); a warp skips
// the tiles wholly past its last row. y (B, T, C) in bf16: O / l rounded once, two columns per
// 32-bit store. ~100 lines: the loop's stages share the warp's registers (Q fragments, O, the
// row statistics).
constexpr int kForwardWarps = 8;
constexpr int kForwardRows = 16 * kForwardWarps;  // query rows of a block

__global__ void __launch_bounds__(kForwardWarps * 32, 2) flash_forward_kernel(const uint16_t* qkv, uint16_t* y,
                                                                            float* lse, int64_t T, int64_t C,
                                                                            int64_t H, float scale2) {
  __shared__ __align__(16) uint16_t ks[2][kTile * kPad];
  __shared__ __align__(16) uint16_t vs[2][kTile * kPad];
  const int64_t b = blockIdx.y / H, h = blockIdx.y % H, ld = 3 * C;
  const int64_t qtile = gridDim.x - 1 - blockIdx.x;
  const uint16_t* q = qkv + b * T * ld + h * D;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int64_t q0 = qtile * kForwardRows + 16 * warp;
  const int64_t rows_end = (qtile + 1) * kForwardRows < T ? (qtile + 1) * kForwardRows : T;
  const int64_t last_tile = (rows_end - 1) / kTile;  // the block's last key tile
  load_tile_async(ks[0], q + C, ld, 0, T);
  load_tile_async(vs[0], q + 2 * C, ld, 0, T);
  cp_async_commit();
  uint32_t qa[4][4];
  load_a_rows(q, ld, q0, T, qa);
  Acc o[8];
  zero(o);
  // Rows g and g + 8: the running maximum m of the raw scores (scale2 applied inside each exponent,
  // one fused multiply-add), the running sum l.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int64_t kt = 0; kt <= last_tile; ++kt) {
    const int buf = kt & 1;
    if (kt < last_tile) {  // the next tiles into the other buffer, read two iterations ago
      load_tile_async(ks[buf ^ 1], q + C, ld, (kt + 1) * kTile, T);
      load_tile_async(vs[buf ^ 1], q + 2 * C, ld, (kt + 1) * kTile, T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (kt * kTile > q0 + 15) {  // wholly past this warp's rows
      __syncthreads();
      continue;
    }
    Acc s[8];
    zero(s);
    mul_transposed(s, qa, ks[buf]);
    float tile_max[2] = {-INFINITY, -INFINITY};
    if ((kt + 1) * kTile - 1 > q0 || (kt + 1) * kTile > T) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = kt * kTile + 8 * j + 2 * t + (e & 1), query = q0 + g + 8 * (e >> 1);
          s[j].v[e] = key <= query && key < T ? s[j].v[e] : -INFINITY;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j].v[e]);
        }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j].v[e]);
    }
    float alpha[2], ref[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      ref[r] = m_new == -INFINITY ? 0.0f : m_new * scale2;  // a row with nothing visible yet stays zero
      alpha[r] = ex2(m[r] * scale2 - ref[r]);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j].v[e] = ex2(fmaf(s[j].v[e], scale2, -ref[e >> 1]));
        l[e >> 1] += s[j].v[e];
        o[j].v[e] *= alpha[e >> 1];
      }
    mul_plain(o, s, vs[buf]);
    __syncthreads();  // buffer `buf` is refilled by the next iteration
  }
  // Finish: the row sums over the quad, y = O / l (rounded to bf16), lse = m + log2 l.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int64_t rows[2] = {q0 + g, q0 + g + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    uint16_t* yr = y + (b * T + rows[r]) * C + h * D;
#pragma unroll
    for (int n = 0; n < 8; ++n)
      *reinterpret_cast<uint32_t*>(yr + 8 * n + 2 * t) =
          bits_of2(o[n].v[2 * r] / l[r], o[n].v[2 * r + 1] / l[r]);
    if (t == 0) lse[blockIdx.y * T + rows[r]] = m[r] * scale2 + log2f(l[r]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: dvec, then the key-tile kernel, then the dQ scatter, in stream order. The main kernel
// writes only the k and v slots of dqkv; the scatter, queued after it, writes the q slots.

// dvec[(b H + h) T + i] = sum_d dy[b, i, h D + d] y[b, i, h D + d] (both bf16, summed in fp32): one
// warp per (row, head), two columns a lane.
__global__ void flash_dvec_kernel(const uint16_t* y, const uint16_t* dy, float* dvec, int64_t rows, int64_t T,
                                  int64_t C, int64_t H) {
  const int64_t item = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;  // (b, i, h)
  if (item >= rows * H) return;
  const int64_t row = item / H, h = item % H, b = row / T, i = row % T;
  const int lane = threadIdx.x & 31;
  const uint32_t a = pair(y + row * C + h * D + 2 * lane), d = pair(dy + row * C + h * D + 2 * lane);
  const float sum = warp_reduce(value_of(uint16_t(a & 0xffffu)) * value_of(uint16_t(d & 0xffffu)) +
                                    value_of(uint16_t(a >> 16)) * value_of(uint16_t(d >> 16)),
                                SumOp{});
  if (lane == 0) dvec[(b * H + h) * T + i] = sum;
}

// Block (key tile, b * H + h), warp w owns keys k0 = 64 tile + 16 w .. + 15 and walks the query
// tiles from the diagonal on: P^T = exp2(scale2 K Q^T - lse), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - dvec), dK += dS^T Q, and dQ += dS K through shared memory and float4 atomics
// into dq_acc. One function of ~120 lines: the steps of a tile share the warp's registers (K and V
// fragments, the dK and dV accumulators). The mask applies only on the diagonal tile and the last
// (which may reach past T); Q, dO (bf16 dy), lse and dvec tiles are
// double-buffered by cp.async; the longest key tiles' blocks start first. dK and dV go to dqkv's k
// and v slots in bf16.
// 3 blocks of 4 warps per SM (registers capped at 168, a few bytes spilled): 0.85 ms a layer against
// 0.97 at 2 when measured on the earlier kernel (H200, GPT-2 B16).
constexpr int kBackwardBlocksPerSm = 3;
// Shared memory (dynamic): Q and dO, two buffers each; K; dS^T; lse and dvec, two buffers each.
constexpr int kBackwardSmem = 6 * kTile * kPad * 2 + 2 * 2 * kTile * 4;

__global__ void __launch_bounds__(kWarps * 32, kBackwardBlocksPerSm)
    flash_backward_kernel(const uint16_t* qkv, const uint16_t* dy, const float* lse, const float* dvec, uint16_t* dqkv,
                          float* dq_acc, int64_t T, int64_t C, int64_t H, float scale2, float scale) {
  constexpr int kTileElems = kTile * kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* const qs0 = smem;                      // 2 tiles
  uint16_t* const dos0 = smem + 2 * kTileElems;    // 2 tiles
  uint16_t* const ks = smem + 4 * kTileElems;      // K of this block
  uint16_t* const dss = ks + kTileElems;           // dS^T: keys x queries
  float* const lse_s0 = reinterpret_cast<float*>(dss + kTileElems);  // 2 x kTile
  float* const dvec_s0 = lse_s0 + 2 * kTile;                         // 2 x kTile
  const int64_t tiles = (T + kTile - 1) / kTile;
  // Linear block index -> (key tile, head): key tile 0 (the longest walk) of every head first.
  const int64_t linear = int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
  const int64_t ktile = linear / gridDim.y, bh = linear % gridDim.y;
  const int64_t b = bh / H, h = bh % H, ld = 3 * C;
  const uint16_t* q = qkv + b * T * ld + h * D;
  const uint16_t* dob = dy + b * T * C + h * D;  // dO, row stride C
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int64_t key0 = ktile * kTile, k0 = key0 + 16 * warp;
  // Q, dO, lse and dvec of query tile qt into buffer buf, one cp.async group.
  // Thread i copies 16 bytes of rows i / 8 + 16 j (j < 4), columns 8 (i % 8).., of both tiles.
  const int lr = threadIdx.x >> 3, lc = 8 * (threadIdx.x & 7), soff = lr * kPad + lc;
  auto issue = [&](int64_t qt, int buf) {
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j) {
      const int64_t row = qt * kTile + 16 * j + lr;
      const bool in = row < T;
      const int64_t r = in ? row : 0;  // rows past T: zeros, from a valid address
      cp_async16(qs0 + buf * kTileElems + 16 * j * kPad + soff, q + r * ld + lc, in ? 16 : 0);
      cp_async16(dos0 + buf * kTileElems + 16 * j * kPad + soff, dob + r * C + lc, in ? 16 : 0);
    }
    const int i = threadIdx.x & (kTile - 1);  // 128 threads: lse by the first 64, dvec by the rest
    const int64_t row = qt * kTile + i;
    const bool in = row < T;
    float* dst = (threadIdx.x < kTile ? lse_s0 : dvec_s0) + buf * kTile + i;
    const float* src = (threadIdx.x < kTile ? lse : dvec) + bh * T + (in ? row : 0);
    cp_async4(dst, src, in ? 4 : 0);
    cp_async_commit();
  };
  issue(ktile, 0);
  uint32_t ka[4][4], va[4][4];
  load_a_rows(q + C, ld, k0, T, ka);
  load_a_rows(q + 2 * C, ld, k0, T, va);
  load_tile(ks, q + C, ld, key0, T);
  Acc dk[8], dv[8];
  zero(dk);
  zero(dv);
  for (int64_t qt = ktile; qt < tiles; ++qt) {
    const int buf = (qt - ktile) & 1;
    // Buffer buf ^ 1 was last read before the previous iteration's second barrier: refill it.
    if (qt + 1 < tiles) {
      issue(qt + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's data visible; the previous dQ step is done with dss
    const uint16_t* qs = qs0 + buf * kTileElems;
    const uint16_t* dos = dos0 + buf * kTileElems;
    const float* lse_s = lse_s0 + buf * kTile;
    const float* dvec_s = dvec_s0 + buf * kTile;
    Acc p[8], dp[8];
    zero(p);
    mul_transposed(p, ka, qs);  // S^T (16 keys x 64 queries)
    if (qt == ktile || (qt + 1) * kTile > T) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * t + (e & 1);
          const int64_t key = k0 + g + 8 * (e >> 1), query = qt * kTile + col;
          p[j].v[e] = key <= query && query < T && key < T ? ex2(fmaf(p[j].v[e], scale2, -lse_s[col])) : 0.0f;
        }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j].v[e] = ex2(fmaf(p[j].v[e], scale2, -lse_s[8 * j + 2 * t + (e & 1)]));
    }
    mul_plain(dv, p, dos);  // dV += P^T dO
    zero(dp);
    mul_transposed(dp, va, dos);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j].v[e] = p[j].v[e] * (dp[j].v[e] - dvec_s[8 * j + 2 * t + (e & 1)]);  // dS^T
    mul_plain(dk, dp, qs);  // dK += dS^T Q
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // dS^T to shared memory, rows = this warp's keys
      uint16_t* r0 = dss + (16 * warp + g) * kPad + 8 * j + 2 * t;
      *reinterpret_cast<uint32_t*>(r0) = bits_of2(dp[j].v[0], dp[j].v[1]);
      *reinterpret_cast<uint32_t*>(r0 + 8 * kPad) = bits_of2(dp[j].v[2], dp[j].v[3]);
    }
    __syncthreads();
    // dQ rows 16 warp .. + 15 of this query tile: dS (queries x 64 keys) . K (64 keys x D).
    Acc dq[8];
    zero(dq);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // dS[query][key] = dss[key][query]
      // ldmatrix.trans, matrices: keys 16kk, 16kk, 16kk + 8, 16kk + 8 at queries 16w, 16w + 8, 16w, 16w + 8
      uint32_t a[4];
      const int lane = threadIdx.x & 31;
      ldsm4_t(a, dss + (16 * kk + 8 * (lane >> 4) + (lane & 7)) * kPad + 16 * warp + 8 * ((lane >> 3) & 1));
      mul_slice(dq, a, ks, kk);
    }
    // Four columns per atomic (sm_90's float4 atomicAdd): lanes t and t ^ 1 trade halves, the
    // even one then holds row g, columns 8n + 2t..+3, the odd one row g + 8, columns 8n + 2t - 2..+3.
    const bool odd = t & 1;
    const int64_t row = qt * kTile + 16 * warp + g + (odd ? 8 : 0);
    float* out = dq_acc + (bh * T + row) * D + 2 * (t & 2);
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float sx = odd ? dq[n].v[0] : dq[n].v[2], sy = odd ? dq[n].v[1] : dq[n].v[3];
      const float rx = __shfl_xor_sync(0xffffffffu, sx, 1), ry = __shfl_xor_sync(0xffffffffu, sy, 1);
      const float4 v = odd ? make_float4(rx, ry, dq[n].v[2], dq[n].v[3]) : make_float4(dq[n].v[0], dq[n].v[1], rx, ry);
      if (row < T) atomicAdd(reinterpret_cast<float4*>(out + 8 * n), v);
    }
  }
  // dK, dV rounded to bf16 into the k and v slots of dqkv, two columns per 32-bit store.
  const int64_t rows[2] = {k0 + g, k0 + g + 8};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= T) continue;
    uint16_t* out = dqkv + (b * T + rows[r]) * ld + h * D;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      *reinterpret_cast<uint32_t*>(out + C + 8 * n + 2 * t) =
          bits_of2(scale * dk[n].v[2 * r], scale * dk[n].v[2 * r + 1]);
      *reinterpret_cast<uint32_t*>(out + 2 * C + 8 * n + 2 * t) = bits_of2(dv[n].v[2 * r], dv[n].v[2 * r + 1]);
    }
  }
}

// dqkv[b, i, h D + d .. + 3] = bf16(scale dq_acc[(b H + h) T + i, d .. + 3]): four columns per
// index (a float4 in, 8 bytes out), into the q slots.
struct ScatterDq {
  const float* dq_acc;
  uint16_t* dqkv;
  int64_t T, C, H;
  float scale;
  __device__ void operator()(int64_t i) const {
    const int64_t d = 4 * (i % (D / 4)), row = i / (D / 4), bh = row / T, q = row % T, b = bh / H, h = bh % H;
    const float4 v = *reinterpret_cast<const float4*>(dq_acc + row * D + d);
    *reinterpret_cast<uint2*>(dqkv + (b * T + q) * 3 * C + h * D + d) =
        make_uint2(bits_of2(scale * v.x, scale * v.y), bits_of2(scale * v.z, scale * v.w));
  }
};

template <class F>
__global__ void scatter_kernel(int64_t n, F f) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) f(i);
}

// Shapes and the base pointers' alignment (cuda_kernels.cuh).
bool flash_shapes_ok(int64_t B, int64_t T, int64_t C, int64_t H) {
  return B > 0 && T > 0 && flash_attention_fits(B, C, H) && (T + kTile - 1) / kTile <= 0x7fffffff;
}

}  // namespace

// ================================================================================================
// Launchers

cudaError_t flash_attention_forward(const uint16_t* qkv, uint16_t* y, float* lse, int64_t B, int64_t T, int64_t C,
                                    int64_t H, cudaStream_t stream) {
  if (!flash_shapes_ok(B, T, C, H) || !flash_attention_aligned(qkv, y)) return cudaErrorInvalidValue;
  const float scale2 = kLog2e / sqrtf(static_cast<float>(D));
  const dim3 grid(static_cast<unsigned>((T + kForwardRows - 1) / kForwardRows), static_cast<unsigned>(B * H));
  flash_forward_kernel<<<grid, kForwardWarps * 32, 0, stream>>>(qkv, y, lse, T, C, H, scale2);
  return cudaGetLastError();
}

cudaError_t flash_attention_backward(const uint16_t* qkv, const uint16_t* y, const float* lse, const uint16_t* dy,
                                     uint16_t* dqkv, float* dq_acc, float* dvec, int64_t B, int64_t T, int64_t C,
                                     int64_t H, const LaunchLimits& lim, cudaStream_t stream) {
  if (!flash_shapes_ok(B, T, C, H) || !flash_attention_aligned(qkv, y, dy, dqkv) ||
      !aligned(dq_acc, 16))
    return cudaErrorInvalidValue;
  const float scale = 1.0f / sqrtf(static_cast<float>(D)), scale2 = kLog2e * scale;
  const int64_t items = B * T * H;  // one warp each
  flash_dvec_kernel<<<static_cast<unsigned>((items * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      y, dy, dvec, B * T, T, C, H);
  cudaError_t err = cudaMemsetAsync(dq_acc, 0, static_cast<size_t>(B * H * T * D) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  // Per call, not once: the attribute belongs to the current device, and a process may drive several.
  err = cudaFuncSetAttribute(flash_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBackwardSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((T + kTile - 1) / kTile), static_cast<unsigned>(B * H));
  flash_backward_kernel<<<grid, kWarps * 32, kBackwardSmem, stream>>>(qkv, dy, lse, dvec, dqkv, dq_acc, T, C, H,
                                                                      scale2, scale);
  const int64_t n = B * H * T * D / 4;
  scatter_kernel<<<grid_for(n, lim), kThreads, 0, stream>>>(n, ScatterDq{dq_acc, dqkv, T, C, H, scale});
  return cudaGetLastError();
}

}  // namespace tutti::cuda::kernels
