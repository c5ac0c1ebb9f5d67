// Shared helpers for tests: seeded random tensors, float64 views of tensors, closeness checks,
// and the op checker that compares an op's forward with a float64 reference and its tape
// gradient with central finite differences of that reference (so FD noise is negligible).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "tutti/autograd/node.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/ops/ops.hpp"

namespace tutti::test {

// What f throws, or "(no exception)".
template <class F>
std::string message_of(F f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

using Vec = std::vector<double>;

// ---- random tensors -------------------------------------------------------------------------

// f32 tensor with elements uniform in [lo, hi).
inline Tensor rand_tensor(Rng& rng, const Shape& shape, double lo = -1.0, double hi = 1.0) {
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  for (float& x : v) x = static_cast<float>(lo + (hi - lo) * rng.uniform());
  return Tensor::from_vector(shape, v);
}

// i32 tensor with elements uniform in [0, n).
inline Tensor rand_ints(Rng& rng, const Shape& shape, int32_t n) {
  std::vector<int32_t> v(static_cast<size_t>(shape.numel()));
  for (int32_t& x : v) x = static_cast<int32_t>(rng.below(static_cast<uint64_t>(n)));
  return Tensor::from_vector(shape, v);
}

// ---- float64 views --------------------------------------------------------------------------

inline Vec to_f64(const Tensor& t) {
  if (t.dtype() == DType::i32) {
    const auto v = t.to_vector<int32_t>();
    return Vec(v.begin(), v.end());
  }
  const auto v = t.to_vector<float>();
  return Vec(v.begin(), v.end());
}

inline double max_abs(const Vec& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

inline double dot(const Vec& a, const Vec& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// |actual - expected| <= atol + rtol |expected| element-wise; reports the worst offenders.
inline ::testing::AssertionResult all_close(const Vec& actual, const Vec& expected, double rtol, double atol) {
  if (actual.size() != expected.size())
    return ::testing::AssertionFailure() << "size " << actual.size() << " != expected size " << expected.size();
  size_t bad = 0;
  std::ostringstream msg;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double a = actual[i], e = expected[i];
    if (std::isfinite(a) && std::abs(a - e) <= atol + rtol * std::abs(e)) continue;
    if (bad++ < 5) msg << "\n  [" << i << "] got " << a << ", expected " << e << " (diff " << a - e << ")";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << actual.size() << " elements differ (rtol " << rtol
                                       << ", atol " << atol << "):" << msg.str();
}
inline ::testing::AssertionResult all_close(const Tensor& actual, const Vec& expected, double rtol, double atol) {
  return all_close(to_f64(actual), expected, rtol, atol);
}

// ---- gradients ------------------------------------------------------------------------------

// sum(out * r) through the tape (reshape + matmul + sum), so backward seeds `out` with exactly r.
inline Tensor weighted_sum(const Tensor& out, const Tensor& r) {
  const int64_t n = out.numel();
  return ops::sum(ops::matmul(ops::reshape(out, {1, n}), r.contiguous().view({n, 1})));
}

// A float64 reference: all inputs flattened (integers as doubles) -> the output flattened.
using RefFn = std::function<Vec(const std::vector<Vec>&)>;
using OpFn = std::function<Tensor(const std::vector<Tensor>&)>;

// Central differences of sum(ref(xs) * r) with respect to xs[k][c] for each c in coords.
inline Vec finite_diff(const RefFn& ref, std::vector<Vec> xs, size_t k, const Vec& r, const std::vector<size_t>& coords,
                       double h) {
  Vec out;
  out.reserve(coords.size());
  for (size_t c : coords) {
    const double x0 = xs[k][c];
    xs[k][c] = x0 + h;
    const double up = dot(ref(xs), r);
    xs[k][c] = x0 - h;
    const double down = dot(ref(xs), r);
    xs[k][c] = x0;
    out.push_back((up - down) / (2.0 * h));
  }
  return out;
}

// All of [0, n) when n <= max_coords, else max_coords distinct indices (always the first and last).
inline std::vector<size_t> pick_coords(Rng& rng, size_t n, size_t max_coords) {
  std::vector<size_t> all(n);
  std::iota(all.begin(), all.end(), size_t{0});
  if (n <= max_coords) return all;
  // Partial Fisher-Yates over the interior [1, n-1): its first max_coords-2 entries are a sample.
  for (size_t i = 1; i + 1 < max_coords; ++i) std::swap(all[i], all[i + rng.below(n - 1 - i)]);
  std::vector<size_t> picked(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(max_coords - 1));
  picked.push_back(n - 1);
  std::sort(picked.begin(), picked.end());
  return picked;
}

// Tolerances: rtol per element, atol as a fraction of the largest |expected| value.
struct Tolerance {
  double fwd_rtol = 1e-5, fwd_atol = 1e-6;
  double grad_rtol = 1e-4, grad_atol = 1e-5;
  double grad_abs = 1e-12;  // absolute floor added to grad_atol, for gradients that cancel to ~0
  double fd_step = 1e-5;
  size_t max_fd_coords = 400;  // per input; larger inputs are sampled
};

// Forward of `op` against `ref`; then for every input flagged in `differentiable`, the tape's
// gradient of sum(out * R), R random and fixed, against finite differences of the reference.
inline void check_op(const std::string& label, std::vector<Tensor> inputs, const std::vector<bool>& differentiable,
                     const OpFn& op, const RefFn& ref, Rng& rng, const Tolerance& tol = {}) {
  SCOPED_TRACE(label);
  std::vector<Vec> xs;
  for (const Tensor& t : inputs) xs.push_back(to_f64(t));
  bool any_grad = false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!differentiable[i]) continue;
    inputs[i].set_requires_grad(true);
    any_grad = true;
  }
  const Tensor out = op(inputs);
  const Vec expected = ref(xs);
  EXPECT_TRUE(all_close(out, expected, tol.fwd_rtol, tol.fwd_atol * max_abs(expected))) << "forward";
  if (!any_grad) return;

  const Tensor r = rand_tensor(rng, out.shape());
  const Vec r64 = to_f64(r);
  weighted_sum(out, r).backward();
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (!differentiable[k]) continue;
    SCOPED_TRACE("gradient of input " + std::to_string(k));
    const Tensor g = inputs[k].grad();
    ASSERT_TRUE(g.defined());
    ASSERT_EQ(g.shape(), inputs[k].shape());
    const Vec g64 = to_f64(g);
    const std::vector<size_t> coords = pick_coords(rng, g64.size(), tol.max_fd_coords);
    const Vec fd = finite_diff(ref, xs, k, r64, coords, tol.fd_step);
    Vec got;
    for (size_t c : coords) got.push_back(g64[c]);
    EXPECT_TRUE(all_close(got, fd, tol.grad_rtol, tol.grad_atol * max_abs(fd) + tol.grad_abs));
  }
}

}  // namespace tutti::test
