// The fused cross-entropy on the CUDA backend (cuda_xent_kernels.cu): the forward keeps per-row
// statistics (max, log sum exp), never the probabilities; the backward recomputes softmax from
// the logits. Checked against the CPU op in fp32 by ||out - ref|| / ||ref|| < 1e-5
// (METHOD.md: fp32 lands far under 1e-3), over random and odd shapes (V not a multiple of 4, rows of
// one element), targets at both edges, logits wide enough that the running max moves; outputs are
// poisoned (NaN) first, NaN never passes. TUTTI_CUDA_TIMING=1 also times the fused and the
// unfused kernels at GPT-2's B16 shape against their floors. Without a GPU everything skips.
// Letters: N rows, V vocabulary.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "cuda_test_util.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/ops/ops.hpp"

using namespace tutti;
using namespace tutti::cuda_test;

namespace {

constexpr double kBound = 1e-5;


Tensor random_logits(int64_t N, int64_t V, Rng& rng, double spread) {
  std::vector<float> v(static_cast<size_t>(N * V));
  for (float& x : v) x = static_cast<float>(spread * (2.0 * rng.uniform() - 1.0));
  return Tensor::from_vector({N, V}, v);
}

// Targets cycle through 0, V - 1 and random classes, so both edges are hit.
Tensor edge_targets(int64_t N, int64_t V, Rng& rng) {
  std::vector<int32_t> t(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    const int64_t pick = i % 3 == 0 ? 0 : i % 3 == 1 ? V - 1 : static_cast<int64_t>(rng.uniform() * V) % V;
    t[size_t(i)] = static_cast<int32_t>(pick);
  }
  return Tensor::from_vector({N}, t);
}


// ||a - b|| / ||b|| in double; infinity when a holds a NaN.
double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return std::numeric_limits<double>::infinity();
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Shape2 {
  int64_t N, V;
};
// Odd and even shapes: one class, one row, V below a warp, V not a multiple of 4 or 8, the
// block-size thresholds of row_threads, GPT-2's padded vocabulary and its unpadded one.
const std::vector<Shape2> kShapes = {{1, 1},    {1, 7},    {3, 5},     {4, 32},   {2, 255},  {5, 1023},
                                     {7, 1024}, {6, 4097}, {9, 12289}, {3, 50257}, {4, 50304}, {1, 50304}};

// ------------------------------------------------------------------------------------------------
// Through the op (autograd): loss and gradient against the CPU op.

void check_op(const Tensor& logits_cpu, const Tensor& targets_cpu) {
  Tensor a = logits_cpu.clone();
  a.set_requires_grad(true);
  Tensor loss_cpu = ops::cross_entropy(a, targets_cpu);
  loss_cpu.backward();

  Tensor b = logits_cpu.to(kGpu);
  b.set_requires_grad(true);
  Tensor loss_gpu = ops::cross_entropy(b, targets_cpu.to(kGpu));
  loss_gpu.backward();
  const float lc = loss_cpu.item(), lg = loss_gpu.to(kCpu).item();
  EXPECT_LE(std::abs(double(lg) - lc) / std::max(std::abs(double(lc)), 1e-30), kBound) << lg << " vs " << lc;
  EXPECT_LE(rel_error(b.grad().to(kCpu).to_vector<float>(), a.grad().to_vector<float>()), kBound);
  // The logits are left as they were (the gradient went to its own buffer).
  EXPECT_EQ(b.detach().to(kCpu).to_vector<float>(), logits_cpu.to_vector<float>());
}

void check_op(int64_t N, int64_t V, double spread, uint64_t seed) {
  SCOPED_TRACE("N=" + std::to_string(N) + " V=" + std::to_string(V) + " spread=" + std::to_string(spread));
  Rng rng(seed);
  const Tensor logits = random_logits(N, V, rng, spread);
  check_op(logits, edge_targets(N, V, rng));
}

TEST(CudaXent, OpMatchesCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  uint64_t seed = 1;
  for (const Shape2& s : kShapes) check_op(s.N, s.V, 4.0, seed++);
  check_op(64, 50304, 1.0, seed++);
}

TEST(CudaXent, WideLogitsMoveTheRunningMax) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  check_op(5, 4099, 60.0, 11);
  check_op(3, 50304, 300.0, 12);
  // Ascending rows (the max moves at every group a thread folds), the second 40 below the first.
  const int64_t N = 2, V = 9001;
  std::vector<float> v(size_t(N * V));
  for (int64_t i = 0; i < N * V; ++i) v[size_t(i)] = 0.01f * static_cast<float>(i % V) - 40.0f * float(i / V);
  check_op(Tensor::from_vector({N, V}, v), Tensor::from_vector({N}, std::vector<int32_t>{0, 9000}));
}

// ------------------------------------------------------------------------------------------------
// The backend's kernels directly: every output written (poisoned first), the statistics, and the
// backward in place (dlogits = logits).

TEST(CudaXent, KernelsWriteEveryOutput) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!gpu().fused_cross_entropy()) GTEST_SKIP() << "TUTTI_CUDA_XENT=0";
  uint64_t seed = 100;
  for (const Shape2& s : kShapes) {
    const int64_t N = s.N, V = s.V;
    SCOPED_TRACE("N=" + std::to_string(N) + " V=" + std::to_string(V));
    Rng rng(seed++);
    const Tensor x = random_logits(N, V, rng, 5.0), t = edge_targets(N, V, rng);
    const Tensor xg = x.to(kGpu), tg = t.to(kGpu);
    const size_t n = static_cast<size_t>(N), nv = static_cast<size_t>(N * V);
    std::vector<float> probs(nv), losses(n), dref(nv);
    backend_for(kCpu).cross_entropy_forward(f32(x), t.data<int32_t>(), probs.data(), losses.data(), N, V);
    const float dloss = 0.37f;
    backend_for(kCpu).cross_entropy_backward(probs.data(), t.data<int32_t>(), dloss, dref.data(), N, V);

    Tensor stats = poisoned({N, 2}), lg = poisoned({N}), d = poisoned({N, V});
    gpu().cross_entropy_stats(f32(xg), tg.data<int32_t>(), f32(stats), f32(lg), N, V);
    gpu().cross_entropy_backward_from_stats(f32(xg), tg.data<int32_t>(), f32(stats), dloss, f32(d), N, V);
    EXPECT_LE(rel_error(lg.to(kCpu).to_vector<float>(), losses), kBound);
    EXPECT_LE(rel_error(d.to(kCpu).to_vector<float>(), dref), kBound);
    // stats: the row max exactly, and log sum exp(x - max) = loss - max + x[target].
    const std::vector<float> st = stats.to(kCpu).to_vector<float>(), xv = x.to_vector<float>();
    for (int64_t r = 0; r < N; ++r) {
      const float mx = *std::max_element(xv.begin() + r * V, xv.begin() + (r + 1) * V);
      EXPECT_EQ(st[size_t(2 * r)], mx);
      const double log_sum = losses[size_t(r)] - mx + xv[size_t(r * V + t.data<int32_t>()[r])];
      EXPECT_NEAR(st[size_t(2 * r + 1)], log_sum, 1e-5 * std::max(1.0, std::abs(log_sum)));
    }
    // In place: the gradient over the logits' own buffer.
    Tensor inplace = x.to(kGpu);
    gpu().cross_entropy_backward_from_stats(f32(inplace), tg.data<int32_t>(), f32(stats), dloss, f32(inplace), N, V);
    EXPECT_LE(rel_error(inplace.to(kCpu).to_vector<float>(), dref), kBound);
  }
}

// A row whose start is not 16-byte aligned (a view one float in) takes the scalar path.
TEST(CudaXent, UnalignedRows) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!gpu().fused_cross_entropy()) GTEST_SKIP() << "TUTTI_CUDA_XENT=0";
  const int64_t N = 3, V = 4096;
  Rng rng(7);
  const Tensor x = random_logits(1, N * V + 1, rng, 3.0), t = edge_targets(N, V, rng);
  const std::vector<float> xv = x.to_vector<float>();
  const size_t n = static_cast<size_t>(N), nv = static_cast<size_t>(N * V);
  std::vector<float> probs(nv), losses(n), dref(nv);
  backend_for(kCpu).cross_entropy_forward(xv.data() + 1, t.data<int32_t>(), probs.data(), losses.data(), N, V);
  backend_for(kCpu).cross_entropy_backward(probs.data(), t.data<int32_t>(), 1.0f, dref.data(), N, V);
  const Tensor xg = x.to(kGpu), tg = t.to(kGpu);
  Tensor stats = poisoned({N, 2}), lg = poisoned({N}), d = poisoned({N * V + 1});
  gpu().cross_entropy_stats(f32(xg) + 1, tg.data<int32_t>(), f32(stats), f32(lg), N, V);
  gpu().cross_entropy_backward_from_stats(f32(xg) + 1, tg.data<int32_t>(), f32(stats), 1.0f, f32(d) + 1, N, V);
  EXPECT_LE(rel_error(lg.to(kCpu).to_vector<float>(), losses), kBound);
  std::vector<float> dv = d.to(kCpu).to_vector<float>();
  dv.erase(dv.begin());
  EXPECT_LE(rel_error(dv, dref), kBound);
}

// ------------------------------------------------------------------------------------------------
// bf16 logits (mixed precision's LM head): the kernels against the CPU on the same rounded values.
// Losses within 1e-5; the gradient, written in bf16, within 1e-2 (one rounding: <= 2^-9 each).

void check_bf16_kernels(const Tensor& x, const Tensor& t, int64_t offset) {
  const int64_t N = t.numel(), V = (x.numel() - offset) / N;
  const std::vector<float> xr = rounded(x).to_vector<float>();  // what the GPU reads
  const size_t n = static_cast<size_t>(N), nv = static_cast<size_t>(N * V);
  std::vector<float> probs(nv), losses(n), dref(nv);
  const float dloss = 0.61f;
  cpu().cross_entropy_forward(xr.data() + offset, t.data<int32_t>(), probs.data(), losses.data(), N, V);
  cpu().cross_entropy_backward(probs.data(), t.data<int32_t>(), dloss, dref.data(), N, V);
  const Tensor xg = bf16_tensor(x, kGpu), tg = t.to(kGpu);
  Tensor stats = poisoned({N, 2}), lg = poisoned({N}), d = poisoned_bf16({x.numel()});
  gpu().cross_entropy_stats_bf16(bf16(xg) + offset, tg.data<int32_t>(), f32(stats), f32(lg), N, V);
  gpu().cross_entropy_backward_from_stats_bf16(bf16(xg) + offset, tg.data<int32_t>(), f32(stats), dloss,
                                               bf16(d) + offset, N, V);
  EXPECT_LE(rel_error(lg.to(kCpu).to_vector<float>(), losses), kBound);
  std::vector<float> dv = widened(d).to_vector<float>();
  dv.erase(dv.begin(), dv.begin() + offset);
  EXPECT_LE(rel_error(dv, dref), 1e-2);
}

TEST(CudaXent, Bf16LogitsKernels) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!gpu().fused_cross_entropy()) GTEST_SKIP() << "TUTTI_CUDA_XENT=0";
  uint64_t seed = 300;
  for (const Shape2& s : kShapes) {
    SCOPED_TRACE("N=" + std::to_string(s.N) + " V=" + std::to_string(s.V));
    Rng rng(seed++);
    check_bf16_kernels(random_logits(s.N, s.V, rng, 5.0), edge_targets(s.N, s.V, rng), 0);
  }
  SCOPED_TRACE("rows not 8-byte aligned");
  Rng rng(seed);
  check_bf16_kernels(random_logits(1, 3 * 4096 + 1, rng, 3.0), edge_targets(3, 4096, rng), 1);
}

// ------------------------------------------------------------------------------------------------
// Timing at GPT-2's B16 shape (N = 16 x 1024, V = 50304), fused against unfused, each against its
// floor: bytes (each input read once, each output written once) over the device-to-device copy
// rate measured here (bytes read plus written).

double time_ms(const std::function<void()>& f) { return median_time_ms(f, 5, 7); }

TEST(CudaXent, Timing) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!timing_requested()) GTEST_SKIP() << "set TUTTI_CUDA_TIMING=1 to time the kernels";
  const int64_t N = 16 * 1024, V = 50304;
  const double nv = double(N) * V;
  Rng rng(3);
  std::vector<float> tile(size_t(1) << 22);
  for (float& v : tile) v = static_cast<float>(8.0 * rng.uniform() - 4.0);
  const Tensor src = Tensor::from_vector({int64_t(tile.size())}, tile).to(kGpu);
  Tensor x = Tensor::empty({N, V}, DType::f32, kGpu), out = Tensor::empty({N, V}, DType::f32, kGpu);
  for (int64_t i = 0; i < N * V; i += int64_t(tile.size()))
    gpu().copy_on_device(f32(x) + i, f32(src), size_t(std::min<int64_t>(int64_t(tile.size()), N * V - i)) * 4);
  const Tensor targets = edge_targets(N, V, rng).to(kGpu);
  Tensor losses = Tensor::empty({N}, DType::f32, kGpu), stats = Tensor::empty({N, 2}, DType::f32, kGpu);
  const int32_t* t = targets.data<int32_t>();
  const double copy_ms = time_ms([&] { gpu().copy_on_device(f32(out), f32(x), size_t(nv) * 4); });
  const double rate = 2.0 * nv * 4 / (copy_ms * 1e-3);
  struct Row {
    const char* name;
    double ms, bytes;
  };
  const auto fwd = [&] { gpu().cross_entropy_forward(f32(x), t, f32(out), f32(losses), N, V); };
  const auto bwd = [&] { gpu().cross_entropy_backward(f32(x), t, 1.0f / N, f32(out), N, V); };
  const auto fused_fwd = [&] { gpu().cross_entropy_stats(f32(x), t, f32(stats), f32(losses), N, V); };
  const auto fused_bwd = [&] {
    gpu().cross_entropy_backward_from_stats(f32(x), t, f32(stats), 1.0f / N, f32(out), N, V);
  };
  const std::vector<Row> rows = {{"unfused forward (probs written)", time_ms(fwd), 8.0 * nv},
                                 {"unfused backward (from probs)", time_ms(bwd), 8.0 * nv},
                                 {"fused forward (stats only)", time_ms(fused_fwd), 4.0 * nv},
                                 {"fused backward (from logits)", time_ms(fused_bwd), 8.0 * nv}};
  std::printf("device-to-device copy: %.0f GB/s (read + written); N %lld, V %lld\n", rate / 1e9, (long long)N,
              (long long)V);
  std::printf("%-34s %9s %9s %7s %8s\n", "kernel", "ms", "floor ms", "floor%", "GB/s");
  for (const Row& r : rows)
    std::printf("%-34s %9.3f %9.3f %6.0f%% %8.0f\n", r.name, r.ms, r.bytes / rate * 1e3,
                100.0 * r.bytes / rate * 1e3 / r.ms, r.bytes / (r.ms * 1e-3) / 1e9);
}

}  // namespace
