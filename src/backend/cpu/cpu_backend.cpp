// The CPU backend: oneDNN sgemm for matrix products, OpenMP (the same pool oneDNN uses) for
// everything else, AVX2 for the transcendental loops. Letters: B batch, T time, C channels,
// H heads, D head size (C / H), N rows, V vocabulary.
#include "backend/cpu/cpu_backend.hpp"

#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/vec.hpp"
#include "tutti/core/error.hpp"

namespace tutti::cpu {
namespace {

constexpr size_t kAlignment = 64;
// Below this many elements a loop runs on one thread: waking the pool costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 14;

void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C; oneDNN rejects k = 0 (its lda/ldb would be 0)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  TUTTI_CHECK(st == dnnl_success, "dnnl_sgemm failed with status ", static_cast<int>(st), " for m=", m, " n=", n,
              " k=", k);
}

// Per-thread partial sums, combined in thread order after the parallel region: with a static
// schedule each thread always gets the same rows, so the result is the same run after run.
template <class T>
class ThreadPartials {
 public:
  ThreadPartials(bool parallel, int64_t width)
      : threads_(parallel ? omp_get_max_threads() : 1), width_(width),
        data_(static_cast<size_t>(threads_ * width), T(0)) {}
  int threads() const { return threads_; }
  T* of_this_thread() { return data_.data() + static_cast<int64_t>(omp_get_thread_num()) * width_; }
  void add_to(float* out) const {
    for (int t = 0; t < threads_; ++t)
      for (int64_t c = 0; c < width_; ++c) out[c] += static_cast<float>(data_[static_cast<size_t>(t * width_ + c)]);
  }
  double total() const {
    double s = 0.0;
    for (T v : data_) s += v;
    return s;
  }

 private:
  int threads_;
  int64_t width_;
  std::vector<T> data_;
};

}  // namespace

void* CpuBackend::raw_allocate(size_t bytes) {
  size_t rounded = (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  void* p = std::aligned_alloc(kAlignment, rounded);
  TUTTI_CHECK(p != nullptr, "out of host memory allocating ", bytes, " bytes");
  return p;
}
void CpuBackend::raw_deallocate(void* ptr, size_t) { std::free(ptr); }
void CpuBackend::copy_from_host(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::copy_to_host(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::copy_on_device(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }

void CpuBackend::strided_copy(const void* src, const Shape& shape, const Strides& strides, size_t elem, void* dst) {
  const int nd = shape.ndim();
  const int64_t total = shape.numel();
  if (total == 0) return;
  const int64_t inner = nd ? shape[nd - 1] : 1;
  const int64_t inner_stride = nd ? strides[nd - 1] : 1;
  const int64_t outer = total / inner;
  const auto* s = static_cast<const char*>(src);
  auto* d = static_cast<char*>(dst);
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
  for (int64_t o = 0; o < outer; ++o) {
    int64_t offset = 0, rest = o;
    for (int i = nd - 2; i >= 0; --i) {
      offset += (rest % shape[i]) * strides[i];
      rest /= shape[i];
    }
    char* out = d + static_cast<size_t>(o * inner) * elem;
    if (inner_stride == 1) {
      std::memcpy(out, s + static_cast<size_t>(offset) * elem, static_cast<size_t>(inner) * elem);
    } else {
      for (int64_t j = 0; j < inner; ++j)
        std::memcpy(out + j * elem, s + static_cast<size_t>(offset + j * inner_stride) * elem, elem);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Element-wise

void CpuBackend::fill(float* dst, int64_t n, float value) {
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

void CpuBackend::add(const float* a, const float* b, float* out, int64_t outer, int64_t inner) {
  const int64_t n = outer * inner;
  if (outer == 1 || inner >= n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
    return;
  }
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
  for (int64_t o = 0; o < outer; ++o) {
    const float* ar = a + o * inner;
    float* orow = out + o * inner;
#pragma omp simd
    for (int64_t i = 0; i < inner; ++i) orow[i] = ar[i] + b[i];
  }
}

void CpuBackend::axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void CpuBackend::scale(const float* x, float s, float* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
  for (int64_t i = 0; i < n; ++i) y[i] = s * x[i];
}

void CpuBackend::sum_rows(const float* x, float* out, int64_t rows, int64_t cols, bool accumulate) {
  if (!accumulate) std::fill(out, out + cols, 0.0f);
  ThreadPartials<float> part(rows * cols > kParallelGrain, cols);
#pragma omp parallel num_threads(part.threads())
  {
    float* mine = part.of_this_thread();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) mine[c] += row[c];
    }
  }
  part.add_to(out);
}

double CpuBackend::sum(const float* x, int64_t n) {
  ThreadPartials<double> part(n > kParallelGrain, 1);
#pragma omp parallel num_threads(part.threads())
  {
    double total = 0.0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) total += x[i];
    part.of_this_thread()[0] = total;
  }
  return part.total();
}

double CpuBackend::sum_squares(const float* x, int64_t n) {
  ThreadPartials<double> part(n > kParallelGrain, 1);
#pragma omp parallel num_threads(part.threads())
  {
    double total = 0.0;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
    part.of_this_thread()[0] = total;
  }
  return part.total();
}

// GELU, tanh form: y = x/2 (1 + tanh(u)), u = k (x + 0.044715 x^3), k = sqrt(2/pi). Computed as
// y = x s with s = sigmoid(2u) = (1 + tanh(u))/2, which does not cancel for negative x.
// dy/dx = s + x * 2 s (1 - s) * k (1 + 3 * 0.044715 x^2).
namespace {
constexpr float kGeluK = 0.7978845608028654f, kGeluC = 0.044715f;

float gelu_sigmoid_scalar(float x) { return 1.0f / (1.0f + std::exp(-2.0f * kGeluK * (x + kGeluC * x * x * x))); }

#ifdef TUTTI_AVX2
inline __m256 gelu_sigmoid8(__m256 v) {  // sigmoid(2u)
  const __m256 minus_2k = _mm256_set1_ps(-2.0f * kGeluK), c = _mm256_set1_ps(kGeluC), one = _mm256_set1_ps(1.0f);
  const __m256 u = _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_mul_ps(minus_2k, u))));
}
#endif

// Runs body(begin, end) over chunks of n in parallel.
template <class Body>
void chunked(int64_t n, Body body) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
  for (int64_t ch = 0; ch < chunks; ++ch) body(ch * kChunk, std::min(n, (ch + 1) * kChunk));
}
}  // namespace

void CpuBackend::gelu_forward(const float* x, float* y, int64_t n) {
  chunked(n, [&](int64_t i, int64_t end) {
#ifdef TUTTI_AVX2
    for (; i + 8 <= end; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      _mm256_storeu_ps(y + i, _mm256_mul_ps(v, gelu_sigmoid8(v)));
    }
#endif
    for (; i < end; ++i) y[i] = x[i] * gelu_sigmoid_scalar(x[i]);
  });
}

void CpuBackend::gelu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  chunked(n, [&](int64_t i, int64_t end) {
#ifdef TUTTI_AVX2
    const __m256 two_k = _mm256_set1_ps(2.0f * kGeluK), c3 = _mm256_set1_ps(3.0f * kGeluC);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= end; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 s = gelu_sigmoid8(v);
      const __m256 du = _mm256_mul_ps(two_k, _mm256_fmadd_ps(c3, _mm256_mul_ps(v, v), one));  // 2 du/dx
      const __m256 ds = _mm256_mul_ps(_mm256_mul_ps(s, _mm256_sub_ps(one, s)), du);
      const __m256 g = _mm256_fmadd_ps(v, ds, s);
      _mm256_storeu_ps(dx + i, _mm256_mul_ps(g, _mm256_loadu_ps(dy + i)));
    }
#endif
    for (; i < end; ++i) {
      const float v = x[i], s = gelu_sigmoid_scalar(v);
      const float g = s + v * s * (1.0f - s) * 2.0f * kGeluK * (1.0f + 3.0f * kGeluC * v * v);
      dx[i] = g * dy[i];
    }
  });
}

void CpuBackend::relu_forward(const float* x, float* y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void CpuBackend::relu_backward(const float* x, const float* dy, float* dx, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
  for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

// ------------------------------------------------------------------------------------------
// GEMM

void CpuBackend::gemm(const Gemm& g) {
  if (g.batch == 1) {
    sgemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a, g.lda, g.b, g.ldb, g.beta, g.c, g.ldc);
    return;
  }
  // Many small products: one per thread (oneDNN runs single-threaded inside a parallel region).
  // Few large ones: one after another, each on all threads.
  const bool small = g.m * g.n * g.k < (1 << 22);
#pragma omp parallel for schedule(dynamic) if (small && g.batch > 1)
  for (int64_t i = 0; i < g.batch; ++i)
    sgemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, g.a + i * g.stride_a, g.lda, g.b + i * g.stride_b, g.ldb,
          g.beta, g.c + i * g.stride_c, g.ldc);
}

// ------------------------------------------------------------------------------------------
// LayerNorm

void CpuBackend::layer_norm_forward(const float* x, const float* w, const float* b, float* y, float* mean,
                                    float* rstd, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float* yr = y + r * cols;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < cols; ++c) s += xr[c];
    const float m = s / static_cast<float>(cols);
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < cols; ++c) v += (xr[c] - m) * (xr[c] - m);
    const float rs = 1.0f / std::sqrt(v / static_cast<float>(cols) + eps);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - m) * rs * w[c] + b[c];
    mean[r] = m;
    rstd[r] = rs;
  }
}

void CpuBackend::layer_norm_backward(const float* x, const float* w, const float* mean, const float* rstd,
                                     const float* dy, float* dx, float* dw, float* db, int64_t rows, int64_t cols,
                                     bool accumulate_dx) {
  const bool parallel = rows * cols > kParallelGrain;
  ThreadPartials<float> dw_parts(parallel, cols), db_parts(parallel, cols);
#pragma omp parallel num_threads(dw_parts.threads())
  {
    float* dw_part = dw_parts.of_this_thread();
    float* db_part = db_parts.of_this_thread();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * cols;
      const float* dyr = dy + r * cols;
      float* dxr = dx + r * cols;
      const float m = mean[r], rs = rstd[r];
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * rs;
        const float g = dyr[c] * w[c];
        sum_g += g;
        sum_gx += g * xhat;
        dw_part[c] += dyr[c] * xhat;
        db_part[c] += dyr[c];
      }
      const float inv = 1.0f / static_cast<float>(cols);
      const float mg = sum_g * inv, mgx = sum_gx * inv;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float xhat = (xr[c] - m) * rs;
        dxr[c] = (accumulate_dx ? dxr[c] : 0.0f) + rs * (dyr[c] * w[c] - mg - xhat * mgx);
      }
    }
  }
  dw_parts.add_to(dw);
  db_parts.add_to(db);
}

// ------------------------------------------------------------------------------------------
// Causal attention. Per (batch, head), rows are processed in blocks of kRowBlock so the masked
// upper triangle is (mostly) never computed: block [r0, r1) only needs keys [0, r1).

namespace {
constexpr int64_t kRowBlock = 64;

struct HeadView {  // pointers of one (b, h) inside qkv (B, T, 3C); row stride 3C
  const float *q, *k, *v;
};
HeadView head_view(const float* qkv, int64_t b, int64_t h, int64_t T, int64_t C, int64_t D) {
  const float* base = qkv + b * T * 3 * C + h * D;
  return {base, base + C, base + 2 * C};
}
}  // namespace

void CpuBackend::attention_forward(const float* qkv, float* y, float* probs, int64_t B, int64_t T, int64_t C,
                                   int64_t H) {
  const int64_t D = C / H, ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel for schedule(dynamic) collapse(2)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const HeadView hv = head_view(qkv, b, h, T, C, D);
      float* P = probs + (b * H + h) * T * T;  // (T, T)
      float* Y = y + b * T * C + h * D;        // (T, D), row stride C
      for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
        const int64_t r1 = std::min(T, r0 + kRowBlock), rows = r1 - r0;
        float* Pb = P + r0 * T;
        sgemm(false, true, rows, r1, D, scale, hv.q + r0 * ld, ld, hv.k, ld, 0.0f, Pb, T);
        for (int64_t i = r0; i < r1; ++i) {
          float* row = P + i * T;
          const int64_t n = i + 1;
          const float mx = max_of(row, n);
          const float inv = 1.0f / exp_shifted(row, mx, row, n);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) row[j] *= inv;
          std::fill(row + n, row + T, 0.0f);
        }
        sgemm(false, false, rows, D, r1, 1.0f, Pb, T, hv.v, ld, 0.0f, Y + r0 * C, C);
      }
    }
  }
}

void CpuBackend::attention_backward(const float* qkv, const float* probs, const float* dy, float* dqkv, int64_t B,
                                    int64_t T, int64_t C, int64_t H) {
  const int64_t D = C / H, ld = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::fill(dqkv, dqkv + B * T * 3 * C, 0.0f);
#pragma omp parallel
  {
    std::vector<float> dp_buf(static_cast<size_t>(kRowBlock * T));
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const HeadView hv = head_view(qkv, b, h, T, C, D);
        float* dq = dqkv + b * T * 3 * C + h * D;
        float* dk = dq + C;
        float* dv = dq + 2 * C;
        const float* P = probs + (b * H + h) * T * T;
        const float* dY = dy + b * T * C + h * D;
        for (int64_t r0 = 0; r0 < T; r0 += kRowBlock) {
          const int64_t r1 = std::min(T, r0 + kRowBlock), rows = r1 - r0;
          const float* Pb = P + r0 * T;
          float* dP = dp_buf.data();  // (rows, r1), row stride T
          // dV[0:r1] += P[r0:r1, 0:r1]^T dY[r0:r1]
          sgemm(true, false, r1, D, rows, 1.0f, Pb, T, dY + r0 * C, C, 1.0f, dv, ld);
          // dP = dY[r0:r1] V[0:r1]^T
          sgemm(false, true, rows, r1, D, 1.0f, dY + r0 * C, C, hv.v, ld, 0.0f, dP, T);
          // dS = P * (dP - sum_j P dP), scaled for Q K^T
          for (int64_t i = 0; i < rows; ++i) {
            const float* p = Pb + i * T;
            float* d = dP + i * T;
            const int64_t n = r0 + i + 1;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < n; ++j) dot += p[j] * d[j];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) d[j] = scale * p[j] * (d[j] - dot);
            std::fill(d + n, d + r1, 0.0f);
          }
          // dQ[r0:r1] = dS K[0:r1];  dK[0:r1] += dS^T Q[r0:r1]
          sgemm(false, false, rows, D, r1, 1.0f, dP, T, hv.k, ld, 0.0f, dq + r0 * ld, ld);
          sgemm(true, false, r1, D, rows, 1.0f, dP, T, hv.q + r0 * ld, ld, 1.0f, dk, ld);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Embedding, cross-entropy, softmax

void CpuBackend::embedding_forward(const int32_t* idx, const float* table, float* out, int64_t n, int64_t C,
                                   int64_t) {
#pragma omp parallel for schedule(static) if (n * C > kParallelGrain)
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < 0) std::memset(out + i * C, 0, static_cast<size_t>(C) * sizeof(float));
    else std::memcpy(out + i * C, table + static_cast<int64_t>(idx[i]) * C, static_cast<size_t>(C) * sizeof(float));
  }
}

void CpuBackend::embedding_backward(const int32_t* idx, const float* dout, float* dtable, int64_t n, int64_t C) {
  // Each thread owns a slice of the channels, so repeated indices never race and the sum order is fixed.
#pragma omp parallel if (n * C > kParallelGrain)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t c0 = C * t / nt, c1 = C * (t + 1) / nt;
    for (int64_t i = 0; i < n; ++i) {
      if (idx[i] < 0) continue;
      float* dst = dtable + static_cast<int64_t>(idx[i]) * C;
      const float* src = dout + i * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

void CpuBackend::cross_entropy_forward(const float* logits, const int32_t* targets, float* probs, float* losses,
                                       int64_t N, int64_t V) {
#pragma omp parallel for schedule(static) if (N * V > kParallelGrain)
  for (int64_t r = 0; r < N; ++r) {
    const float* x = logits + r * V;
    float* p = probs + r * V;
    const float mx = max_of(x, V);
    const float total = exp_shifted(x, mx, p, V);
    const float inv = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) p[j] *= inv;
    losses[r] = std::log(total) + mx - x[targets[r]];
  }
}

void CpuBackend::cross_entropy_backward(const float* probs, const int32_t* targets, float dloss, float* dlogits,
                                        int64_t N, int64_t V) {
#pragma omp parallel for schedule(static) if (N * V > kParallelGrain)
  for (int64_t r = 0; r < N; ++r) {
    const float* p = probs + r * V;
    float* d = dlogits + r * V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) d[j] = p[j] * dloss;
    d[targets[r]] -= dloss;
  }
}

void CpuBackend::vocab_cross_entropy_stats(const float* logits, const int32_t* targets, int64_t first, float* stats,
                                           int64_t N, int64_t V) {
#pragma omp parallel
  {
    std::vector<float> scratch(static_cast<size_t>(V));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const float* x = logits + r * V;
      const float mx = max_of(x, V);
      const int64_t t = targets[r] - first;
      stats[3 * r] = mx;
      stats[3 * r + 1] = exp_shifted(x, mx, scratch.data(), V);
      stats[3 * r + 2] = t >= 0 && t < V ? x[t] : 0.0f;
    }
  }
}

void CpuBackend::vocab_cross_entropy_backward(const float* logits, const int32_t* targets, int64_t first,
                                              const float* lse, float dloss, float* dlogits, int64_t N, int64_t V) {
#pragma omp parallel for schedule(static) if (N * V > kParallelGrain)
  for (int64_t r = 0; r < N; ++r) {
    float* d = dlogits + r * V;
    exp_shifted(logits + r * V, lse[r], d, V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) d[j] *= dloss;
    const int64_t t = targets[r] - first;
    if (t >= 0 && t < V) d[t] -= dloss;
  }
}

void CpuBackend::softmax(const float* x, float* y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    const float mx = max_of(x + r * cols, cols);
    const float inv = 1.0f / exp_shifted(x + r * cols, mx, y + r * cols, cols);
    for (int64_t j = 0; j < cols; ++j) y[r * cols + j] *= inv;
  }
}

// AdamW as in PyTorch: p *= 1 - lr wd; m, v updated; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
void CpuBackend::adamw(std::span<const AdamWTensor> tensors, const AdamWStep& s) {
  const float step = s.lr / s.bias_correction1;
  const float inv_sqrt_bc2 = 1.0f / std::sqrt(s.bias_correction2);
  for (const AdamWTensor& t : tensors) {
    const float decay = t.decay ? 1.0f - s.lr * s.weight_decay : 1.0f;
    float *param = t.param, *m = t.m, *v = t.v;
    const float* grad = t.grad;
    const int64_t n = t.n;
#pragma omp parallel for simd schedule(static) if (n > kParallelGrain)
    for (int64_t i = 0; i < n; ++i) {
      const float g = grad[i] * s.grad_scale;
      m[i] = s.beta1 * m[i] + (1.0f - s.beta1) * g;
      v[i] = s.beta2 * v[i] + (1.0f - s.beta2) * g * g;
      param[i] = param[i] * decay - step * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + s.eps);
    }
    if (t.copy) to_bf16(t.param, t.copy, n);
  }
}

}  // namespace tutti::cpu
