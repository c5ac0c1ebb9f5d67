// What the CUDA test files share: the devices, random and NaN-poisoned tensors, the relative error
// the comparisons use, and the timing loop of the opt-in timing tables.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"

namespace tutti::cuda_test {

inline const Device kGpu = Device::cuda(0);
inline const Device kCpu = Device::cpu();

inline bool have_gpu() { return device_available(kGpu); }
inline Backend& cpu() { return backend_for(kCpu); }
inline Backend& gpu() { return backend_for(kGpu); }
inline float* f32(const Tensor& t) { return t.data<float>(); }
inline BFloat16* bf16(const Tensor& t) { return static_cast<BFloat16*>(t.raw_data()); }

// Uniform in [lo, hi), on the CPU.
inline Tensor random_tensor(const Shape& shape, Rng& rng, double lo = -1.0, double hi = 1.0) {
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (float& x : v) x = static_cast<float>(lo + (hi - lo) * rng.uniform());
  return Tensor::from_vector(shape, v);
}

// An output buffer full of NaN, so an element the kernel forgot to write fails the comparison.
inline Tensor poisoned(const Shape& shape, Device device = kGpu) {
  return Tensor::full(shape, std::numeric_limits<float>::quiet_NaN(), device);
}

// ---- bf16 on the host: the reference rounding, and bf16 tensors' values ----------------------

// bf16 NaN (0xFFFF) in every element.
inline Tensor poisoned_bf16(const Shape& shape, Device device = kGpu) {
  Tensor t = Tensor::empty(shape, DType::bf16, kCpu);
  std::memset(t.raw_data(), 0xFF, t.nbytes());
  return t.to(device);
}

// Round to nearest even, as the GPU must; NaN stays a (quiet) NaN.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
inline float bf16_value(uint16_t b) {
  const uint32_t u = uint32_t{b} << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The values of a bf16 tensor (any device) as fp32 on the CPU.
inline Tensor widened(const Tensor& t) {
  Tensor c = t.to(kCpu).contiguous();
  std::vector<float> v(static_cast<size_t>(c.numel()));
  const auto* bits = static_cast<const uint16_t*>(c.raw_data());
  for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_value(bits[i]);
  return Tensor::from_vector(c.shape(), v);
}
// An fp32 CPU tensor whose values are those of x rounded to bf16.
inline Tensor rounded(const Tensor& x) {
  std::vector<float> v = x.to_vector<float>();
  for (float& e : v) e = bf16_value(bf16_bits(e));
  return Tensor::from_vector(x.shape(), v);
}
// x rounded to bf16, as a bf16 tensor on `device` (made on the host: independent of the kernel).
inline Tensor bf16_tensor(const Tensor& x, Device device) {
  const std::vector<float> v = x.to_vector<float>();
  Tensor t = Tensor::empty(x.shape(), DType::bf16, kCpu);
  auto* bits = static_cast<uint16_t*>(t.raw_data());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = bf16_bits(v[i]);
  return t.to(device);
}

// ||actual - expected|| / ||expected|| over all elements, in double; NaN anywhere gives NaN.
inline double relative_error(const Tensor& actual, const Tensor& expected) {
  const std::vector<float> a = actual.to_vector<float>(), e = expected.to_vector<float>();
  if (a.size() != e.size()) return std::numeric_limits<double>::quiet_NaN();
  double diff = 0.0, ref = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (double(a[i]) - e[i]) * (double(a[i]) - e[i]);
    ref += double(e[i]) * e[i];
  }
  return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

// |actual - expected| <= atol + rtol |expected| for every element; NaN never passes.
inline ::testing::AssertionResult all_close(const Tensor& actual, const Tensor& expected, double rtol, double atol) {
  if (!(actual.shape() == expected.shape()))
    return ::testing::AssertionFailure() << "shapes differ: " << actual.str() << " vs " << expected.str();
  const std::vector<float> a = actual.to_vector<float>(), e = expected.to_vector<float>();
  int64_t bad = 0, first = -1;
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::abs(static_cast<double>(a[i]) - e[i]);
    const bool ok = diff <= atol + rtol * std::abs(static_cast<double>(e[i]));  // false for NaN
    if (!ok) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
    }
    if (!(diff <= worst)) worst = diff;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << a.size() << " elements differ; first at " << first
                                       << ": " << a[static_cast<size_t>(first)] << " vs "
                                       << e[static_cast<size_t>(first)] << "; worst |diff| " << worst;
}

// Column sums a kernel wrote (`sums`, cols of them) against double sums of the (rows, cols) matrix
// `offset` elements into `values`: ||sums - ref|| / max(||ref||, 1); NaN anywhere gives NaN.
inline double column_sums_error(const Tensor& sums, const std::vector<float>& values, int64_t rows, int64_t cols,
                                int64_t offset = 0) {
  const std::vector<float> got = sums.to(kCpu).to_vector<float>();
  double err = 0.0, norm = 0.0;
  for (int64_t c = 0; c < cols; ++c) {
    double ref = 0.0;
    for (int64_t r = 0; r < rows; ++r) ref += values[size_t(offset + r * cols + c)];
    err += (got[size_t(c)] - ref) * (got[size_t(c)] - ref);
    norm += ref * ref;
  }
  return std::sqrt(err) / std::max(std::sqrt(norm), 1.0);
}

inline ::testing::AssertionResult within(double error, double bound) {
  if (error <= bound) return ::testing::AssertionSuccess() << "relative error " << error;  // false for NaN
  return ::testing::AssertionFailure() << "relative error " << error << " over " << bound;
}

// GELU in the tanh form (GPT-2's "gelu_new", what ops::gelu computes) and its derivative, in double.
inline double gelu_tanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
inline double gelu_tanh_grad(double x) {
  const double k = std::sqrt(2.0 / M_PI), c = 0.044715, t = std::tanh(k * (x + c * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x);
}

// The opt-in timing tables (not tests) run under TUTTI_CUDA_TIMING=1 only.
inline bool timing_requested() {
  const char* on = std::getenv("TUTTI_CUDA_TIMING");
  return on != nullptr && std::string(on) == "1";
}

// The median over `rounds` rounds of the mean time of `reps` back-to-back calls, in milliseconds.
inline double median_time_ms(const std::function<void()>& f, int reps, int rounds = 5) {
  f();
  gpu().synchronize();
  std::vector<double> times;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    gpu().synchronize();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace tutti::cuda_test
