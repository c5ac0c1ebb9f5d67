// Attention over a key/value cache for generation: a few new positions against a long cache.
// D = C / H is the head size.
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/vec.hpp"

namespace tutti::cpu {

void CpuBackend::attention_decode(const float* q, const float* k, const float* v, float* y, int64_t n, int64_t past,
                                  int64_t C, int64_t H) {
  const int64_t D = C / H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t len = past + i + 1;  // keys visible to this position
      std::vector<float> s(static_cast<size_t>(len));
      const float* qi = q + i * C + h * D;
      for (int64_t j = 0; j < len; ++j) {
        const float* kj = k + j * C + h * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
        s[static_cast<size_t>(j)] = dot * scale;
      }
      const float inv = 1.0f / exp_shifted(s.data(), max_of(s.data(), len), s.data(), len);
      float* yi = y + i * C + h * D;
      for (int64_t d = 0; d < D; ++d) yi[d] = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        const float p = s[static_cast<size_t>(j)] * inv;
        const float* vj = v + j * C + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) yi[d] += p * vj[d];
      }
    }
  }
}

}  // namespace tutti::cpu
