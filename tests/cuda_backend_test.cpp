// The CUDA backend against the CPU backend: every kernel it implements (LayerNorm's in
// cuda_layernorm_test.cpp), on random inputs of several sizes (1, odd, and over a million
// elements), then the public ops with autograd on cuda:0. Without a GPU (or a build without CUDA)
// the GPU tests skip; the device query tests run everywhere.
// Letters: B batch, T time, C channels, H heads, N rows, V vocabulary.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <vector>

#include "backend/backend.hpp"
#include "cuda_test_util.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/ops/ops.hpp"

using namespace tutti;
using namespace tutti::cuda_test;

namespace {

constexpr int64_t kSizes[] = {1, 37, 1000, 1000003};

// ------------------------------------------------------------------------------------------------
// Helpers


Tensor random_indices(const Shape& shape, int64_t n, Rng& rng) {
  std::vector<int32_t> v(static_cast<size_t>(shape.numel()));
  for (int32_t& x : v) x = static_cast<int32_t>(rng.below(static_cast<uint64_t>(n)));
  return Tensor::from_vector(shape, v);
}


const int32_t* i32(const Tensor& t) { return t.data<int32_t>(); }

// GELU (tanh form) and its derivative in double, rounded to f32 at the end.
Tensor gelu_f64(const Tensor& x) {
  std::vector<float> v = x.to_vector<float>();
  for (float& e : v) e = static_cast<float>(gelu_tanh(e));
  return Tensor::from_vector(x.shape(), v);
}
Tensor gelu_backward_f64(const Tensor& x, const Tensor& dy) {
  std::vector<float> v = x.to_vector<float>();
  const std::vector<float> g = dy.to_vector<float>();
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(gelu_tanh_grad(v[i]) * g[i]);
  return Tensor::from_vector(x.shape(), v);
}


}  // namespace

// ================================================================================================
// Device query: runs on every machine

TEST(CudaDevice, QueryNeverThrows) {
  bool available = false;
  EXPECT_NO_THROW(available = device_available(kGpu));
  EXPECT_FALSE(device_available(Device::cuda(-1)));
  EXPECT_FALSE(device_available(Device::cuda(1 << 20)));
  if (!available) EXPECT_THROW(backend_for(kGpu), InvalidArgument);
}

TEST(CudaDevice, MissingDeviceIsAClearError) {
  EXPECT_THROW(backend_for(Device::cuda(1 << 20)), InvalidArgument);
}

// ================================================================================================
// Memory, copies, strided gather

TEST(CudaBackend, CopiesRoundTrip) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  EXPECT_STREQ(gpu().name(), "cuda");
  EXPECT_EQ(gpu().device(), kGpu);
  Rng rng(1);
  for (int64_t n : kSizes) {
    Tensor x = random_tensor({n}, rng);
    Tensor xg = x.to(kGpu);
    EXPECT_EQ(xg.device(), kGpu);
    Tensor yg = xg.clone();  // device to device
    EXPECT_TRUE(all_close(yg.to(kCpu), x, 0.0, 0.0)) << "n=" << n;
    Tensor idx = random_indices({n}, 1000, rng);
    EXPECT_EQ(idx.to(kGpu).to_vector<int32_t>(), idx.to_vector<int32_t>()) << "n=" << n;
  }
  Tensor zi = Tensor::zeros({37}, DType::i32, kGpu);
  EXPECT_EQ(zi.to_vector<int32_t>(), std::vector<int32_t>(37, 0));
  Tensor zf = Tensor::zeros({0}, DType::f32, kGpu);  // empty: nothing to copy
  EXPECT_EQ(zf.to_vector<float>().size(), 0u);
  gpu().synchronize();
}

TEST(CudaBackend, StridedCopyOfViews) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(2);
  for (const Shape& shape : {Shape{1, 1}, Shape{37, 5}, Shape{3, 7, 11}, Shape{2, 3, 4, 5, 6}, Shape{1000, 1003}}) {
    Tensor x = random_tensor(shape, rng);
    Tensor xg = x.to(kGpu);
    const int last = shape.ndim() - 1;
    Tensor t = x.transpose(0, last), tg = xg.transpose(0, last);
    EXPECT_TRUE(all_close(tg.contiguous(), t.contiguous(), 0.0, 0.0)) << shape.str();
    if (shape[last] > 2) {
      Tensor s = x.slice(last, 1, shape[last] - 1), sg = xg.slice(last, 1, shape[last] - 1);
      EXPECT_TRUE(all_close(sg.contiguous(), s.contiguous(), 0.0, 0.0)) << shape.str();
    }
  }
  // 4-byte integers and a single element through the same kernel.
  Tensor idx = random_indices({37, 41}, 100, rng);
  EXPECT_EQ(idx.to(kGpu).transpose(0, 1).contiguous().to_vector<int32_t>(),
            idx.transpose(0, 1).contiguous().to_vector<int32_t>());
  Tensor one = random_tensor({1, 1}, rng);
  EXPECT_TRUE(all_close(one.to(kGpu).transpose(0, 1).contiguous(), one, 0.0, 0.0));
}

// ================================================================================================
// Element-wise kernels

TEST(CudaBackend, Fill) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  for (int64_t n : kSizes) {
    Tensor g = poisoned({n}, kGpu);
    gpu().fill(f32(g), n, 3.25f);
    EXPECT_TRUE(all_close(g, Tensor::full({n}, 3.25f), 0.0, 0.0)) << "n=" << n;
  }
}

TEST(CudaBackend, AddWithBroadcast) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(3);
  const int64_t cases[][2] = {{1, 1}, {1, 37}, {37, 1}, {1001, 37}, {3, 1000003}, {1000003, 1}};
  for (const auto& c : cases) {
    const int64_t outer = c[0], inner = c[1];
    Tensor a = random_tensor({outer * inner}, rng), b = random_tensor({inner}, rng);
    Tensor out = Tensor::empty({outer * inner}), out_g = poisoned({outer * inner}, kGpu);
    Tensor ag = a.to(kGpu), bg = b.to(kGpu);
    cpu().add(f32(a), f32(b), f32(out), outer, inner);
    gpu().add(f32(ag), f32(bg), f32(out_g), outer, inner);
    EXPECT_TRUE(all_close(out_g, out, 1e-6, 1e-7)) << outer << " x " << inner;
  }
}

TEST(CudaBackend, AxpyAndScale) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(4);
  for (int64_t n : kSizes) {
    Tensor x = random_tensor({n}, rng), y = random_tensor({n}, rng);
    Tensor xg = x.to(kGpu), yg = y.to(kGpu);
    cpu().axpy(-0.75f, f32(x), f32(y), n);
    gpu().axpy(-0.75f, f32(xg), f32(yg), n);
    EXPECT_TRUE(all_close(yg, y, 1e-5, 1e-6)) << "axpy n=" << n;
    Tensor s = Tensor::empty({n}), sg = poisoned({n}, kGpu);
    cpu().scale(f32(x), 1.5f, f32(s), n);
    gpu().scale(f32(xg), 1.5f, f32(sg), n);
    EXPECT_TRUE(all_close(sg, s, 1e-6, 0.0)) << "scale n=" << n;
  }
}

TEST(CudaBackend, GeluAndReluForwardBackward) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(5);
  for (int64_t n : kSizes) {
    Tensor x = random_tensor({n}, rng, -6.0, 6.0), dy = random_tensor({n}, rng);
    Tensor xg = x.to(kGpu), dyg = dy.to(kGpu);
    Tensor y = Tensor::empty({n}), yg = poisoned({n}, kGpu);
    Tensor dx = Tensor::empty({n}), dxg = poisoned({n}, kGpu);
    cpu().gelu_forward(f32(x), f32(y), n);
    gpu().gelu_forward(f32(xg), f32(yg), n);
    EXPECT_TRUE(all_close(yg, y, 1e-5, 1e-6)) << "gelu n=" << n;
    EXPECT_TRUE(all_close(yg, gelu_f64(x), 1e-5, 1e-6)) << "gelu vs float64, n=" << n;
    cpu().gelu_backward(f32(x), f32(dy), f32(dx), n);
    gpu().gelu_backward(f32(xg), f32(dyg), f32(dxg), n);
    // In float, 1 - t^2 loses absolute precision as |t| -> 1 (t off by an ulp moves it ~2.4e-7),
    // and x/2 k (1 + 3c x^2) scales that up to ~14 on [-6, 6]: ~4e-6 either side of the truth.
    EXPECT_TRUE(all_close(dxg, dx, 1e-5, 8e-6)) << "gelu_backward n=" << n;
    EXPECT_TRUE(all_close(dxg, gelu_backward_f64(x, dy), 1e-5, 4e-6)) << "gelu_backward vs float64, n=" << n;
    cpu().relu_forward(f32(x), f32(y), n);
    gpu().relu_forward(f32(xg), f32(yg), n);
    EXPECT_TRUE(all_close(yg, y, 0.0, 0.0)) << "relu n=" << n;
    cpu().relu_backward(f32(x), f32(dy), f32(dx), n);
    gpu().relu_backward(f32(xg), f32(dyg), f32(dxg), n);
    EXPECT_TRUE(all_close(dxg, dx, 0.0, 0.0)) << "relu_backward n=" << n;
  }
}

// Pointers one float past a 16-byte boundary take the kernels' scalar path instead of float4s.
TEST(CudaBackend, ElementwiseOnUnalignedPointers) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(17);
  for (int64_t n : {int64_t{2}, int64_t{38}, int64_t{1000004}}) {
    const int64_t m = n - 1;
    Tensor x = random_tensor({n}, rng, -3.0, 3.0), y = random_tensor({n}, rng);
    Tensor xg = x.to(kGpu), yg = y.to(kGpu);
    Tensor out = random_tensor({n}, rng);
    Tensor out_g = out.to(kGpu);
    cpu().gelu_forward(f32(x) + 1, f32(out) + 1, m);
    gpu().gelu_forward(f32(xg) + 1, f32(out_g) + 1, m);
    EXPECT_TRUE(all_close(out_g, out, 1e-5, 1e-6)) << "gelu n=" << m;
    cpu().add(f32(x) + 1, f32(y), f32(out), 1, m);
    gpu().add(f32(xg) + 1, f32(yg), f32(out_g), 1, m);
    EXPECT_TRUE(all_close(out_g, out, 1e-6, 1e-7)) << "add n=" << m;
    cpu().axpy(0.5f, f32(x), f32(y) + 1, m);
    gpu().axpy(0.5f, f32(xg), f32(yg) + 1, m);
    EXPECT_TRUE(all_close(yg, y, 1e-5, 1e-6)) << "axpy n=" << m;
    cpu().fill(f32(out) + 1, m, -2.0f);
    gpu().fill(f32(out_g) + 1, m, -2.0f);
    EXPECT_TRUE(all_close(out_g, out, 0.0, 0.0)) << "fill n=" << m;
  }
}

// All sizes in one call (one launch on CUDA), decay on every other tensor, a bf16 copy of every
// tensor but the first, and one tensor starting a float past an aligned address (the scalar path):
// the moments and parameters as the CPU's, each copy the GPU's parameter rounded.
TEST(CudaBackend, AdamW) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(6);
  const AdamWStep step{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f - 0.9f * 0.9f * 0.9f, 1.0f - 0.95f * 0.95f * 0.95f, 0.5f};
  std::vector<int64_t> sizes(std::begin(kSizes), std::end(kSizes));
  sizes.push_back(1001);  // read from offset 1 below
  const size_t count = sizes.size();
  std::vector<Tensor> cpu_t, gpu_t, copies;  // per tensor: p, g, m, v
  std::vector<AdamWTensor> on_cpu, on_gpu;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = sizes[i], skip = i + 1 == count ? 1 : 0;
    for (auto [lo, hi] : {std::pair{-1.0, 1.0}, {-1.0, 1.0}, {-0.1, 0.1}, {0.0, 0.01}}) {
      cpu_t.push_back(random_tensor({n + skip}, rng, lo, hi));
      gpu_t.push_back(cpu_t.back().to(kGpu));
    }
    copies.push_back(poisoned_bf16({n}));
    auto args = [&](std::vector<Tensor>& t, BFloat16* copy) {
      float* p[4];
      for (int k = 0; k < 4; ++k) p[k] = f32(t[4 * i + size_t(k)]) + skip;
      return AdamWTensor{p[0], p[1], p[2], p[3], n, i % 2 == 0, copy};
    };
    on_cpu.push_back(args(cpu_t, nullptr));
    on_gpu.push_back(args(gpu_t, i == 0 ? nullptr : bf16(copies.back())));
  }
  cpu().adamw(on_cpu, step);
  gpu().adamw(on_gpu, step);
  for (size_t i = 0; i < count; ++i) {
    const std::string what = "n=" + std::to_string(sizes[i]);
    EXPECT_TRUE(all_close(gpu_t[4 * i], cpu_t[4 * i], 1e-5, 1e-7)) << "param " << what;
    EXPECT_TRUE(all_close(gpu_t[4 * i + 2], cpu_t[4 * i + 2], 1e-5, 1e-8)) << "m " << what;
    EXPECT_TRUE(all_close(gpu_t[4 * i + 3], cpu_t[4 * i + 3], 1e-5, 1e-10)) << "v " << what;
    EXPECT_TRUE(all_close(gpu_t[4 * i + 1], cpu_t[4 * i + 1], 0.0, 0.0)) << "grad unchanged " << what;
    if (i == 0) continue;
    const int64_t skip = i + 1 == count ? 1 : 0;
    const Tensor p = gpu_t[4 * i].to(kCpu).slice(0, skip, skip + sizes[i]).contiguous();
    EXPECT_TRUE(all_close(widened(copies[i]), rounded(p), 0.0, 0.0)) << "copy " << what;
  }
}

// ================================================================================================
// Reductions

TEST(CudaBackend, SumAndSumSquares) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(7);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{1000}, int64_t{1000003}, int64_t{5000011}}) {
    Tensor x = random_tensor({n}, rng, -1.0, 3.0);
    Tensor xg = x.to(kGpu);
    // Both sides add the same floats in double: only the order differs.
    const double sum = cpu().sum(f32(x), n), squares = cpu().sum_squares(f32(x), n);
    EXPECT_NEAR(gpu().sum(f32(xg), n), sum, 1e-10 * (std::abs(sum) + 1.0)) << "n=" << n;
    EXPECT_NEAR(gpu().sum_squares(f32(xg), n), squares, 1e-10 * (squares + 1.0)) << "n=" << n;
  }
}

TEST(CudaBackend, SumRows) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(8);
  const int64_t cases[][2] = {{1, 1}, {37, 1}, {1, 37}, {1000, 37}, {100003, 3}, {64, 4097}, {5000, 1000}, {0, 5}};
  for (const auto& c : cases) {
    const int64_t rows = c[0], cols = c[1];
    Tensor x = random_tensor({rows, cols}, rng);
    Tensor xg = x.to(kGpu);
    for (bool accumulate : {false, true}) {
      Tensor out = random_tensor({cols}, rng);
      Tensor out_g = accumulate ? out.to(kGpu) : poisoned({cols}, kGpu);
      cpu().sum_rows(f32(x), f32(out), rows, cols, accumulate);
      gpu().sum_rows(f32(xg), f32(out_g), rows, cols, accumulate);
      const double atol = 1e-6 * std::sqrt(static_cast<double>(rows)) + 1e-6;
      EXPECT_TRUE(all_close(out_g, out, 1e-4, atol)) << rows << " x " << cols << " accumulate=" << accumulate;
    }
  }
}

// ================================================================================================
// GEMM

namespace {

struct GemmCase {
  int64_t m, n, k;
  bool trans_a, trans_b;
  int64_t batch = 1;
  bool shared_a = false, shared_b = false;  // stride 0: one matrix for the whole batch
  float alpha = 1.0f, beta = 0.0f;
  int64_t pad = 0;  // extra columns in every leading dimension
};

std::string describe(const GemmCase& c) {
  std::ostringstream s;
  s << "m=" << c.m << " n=" << c.n << " k=" << c.k << " ta=" << c.trans_a << " tb=" << c.trans_b
    << " batch=" << c.batch << " shared_a=" << c.shared_a << " shared_b=" << c.shared_b << " alpha=" << c.alpha
    << " beta=" << c.beta << " pad=" << c.pad;
  return s.str();
}

void expect_gemm_matches(const GemmCase& c, Rng& rng) {
  const int64_t rows_a = c.trans_a ? c.k : c.m, cols_a = c.trans_a ? c.m : c.k;
  const int64_t rows_b = c.trans_b ? c.n : c.k, cols_b = c.trans_b ? c.k : c.n;
  const int64_t lda = cols_a + c.pad, ldb = cols_b + c.pad, ldc = c.n + c.pad;
  const int64_t mats_a = c.shared_a ? 1 : c.batch, mats_b = c.shared_b ? 1 : c.batch;
  Tensor a = random_tensor({mats_a * rows_a * lda}, rng), b = random_tensor({mats_b * rows_b * ldb}, rng);
  Tensor out = random_tensor({c.batch * c.m * ldc}, rng);
  Tensor ag = a.to(kGpu), bg = b.to(kGpu), out_g = out.to(kGpu);
  Gemm g;
  g.trans_a = c.trans_a;
  g.trans_b = c.trans_b;
  g.m = c.m;
  g.n = c.n;
  g.k = c.k;
  g.alpha = c.alpha;
  g.beta = c.beta;
  g.lda = lda;
  g.ldb = ldb;
  g.ldc = ldc;
  g.batch = c.batch;
  g.stride_a = c.shared_a ? 0 : rows_a * lda;
  g.stride_b = c.shared_b ? 0 : rows_b * ldb;
  g.stride_c = c.m * ldc;
  Gemm gg = g;
  g.a = f32(a);
  g.b = f32(b);
  g.c = f32(out);
  gg.a = f32(ag);
  gg.b = f32(bg);
  gg.c = f32(out_g);
  cpu().gemm(g);
  gpu().gemm(gg);
  const double atol = 2e-6 * static_cast<double>(c.k) + 1e-6;
  EXPECT_TRUE(all_close(out_g, out, 1e-4, atol)) << describe(c);
}

}  // namespace

TEST(CudaBackend, GemmAllTransposes) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(9);
  const int64_t dims[][3] = {{1, 1, 1}, {37, 1, 5}, {1, 37, 129}, {64, 64, 64}, {129, 257, 67}, {1000, 37, 1003}};
  for (const auto& d : dims)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) expect_gemm_matches({d[0], d[1], d[2], ta, tb}, rng);
}

TEST(CudaBackend, GemmBatchedAlphaBetaAndLeadingDimensions) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(10);
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      expect_gemm_matches({37, 41, 43, ta, tb, 3}, rng);
      expect_gemm_matches({37, 41, 43, ta, tb, 5, true, false}, rng);
      expect_gemm_matches({37, 41, 43, ta, tb, 5, false, true}, rng);
      expect_gemm_matches({33, 17, 65, ta, tb, 2, false, false, 0.5f, 0.25f}, rng);
      expect_gemm_matches({33, 17, 65, ta, tb, 1, false, false, -1.0f, 1.0f, 3}, rng);
      expect_gemm_matches({33, 17, 65, ta, tb, 4, false, false, 1.0f, 0.0f, 5}, rng);
    }
  }
  // k == 0: C = beta C (padded so that no leading dimension is 0, which BLAS rejects).
  expect_gemm_matches({5, 7, 0, false, false, 1, false, false, 1.0f, 0.5f, 1}, rng);
  expect_gemm_matches({5, 7, 0, false, false, 3, false, false, 1.0f, 0.0f, 1}, rng);
}

TEST(CudaBackend, GemmRejectsSizesBeyondInt) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Gemm g;
  g.m = int64_t{1} << 32;
  g.n = 1;
  g.k = 1;
  g.lda = g.ldb = g.ldc = 1;
  EXPECT_THROW(gpu().gemm(g), InvalidArgument);
}

// ================================================================================================
// Row-wise fused kernels

TEST(CudaBackend, Softmax) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(11);
  const int64_t cases[][2] = {{1, 1}, {37, 37}, {1000, 3}, {1, 1000003}, {64, 50257}};
  for (const auto& c : cases) {
    const int64_t rows = c[0], cols = c[1];
    Tensor x = random_tensor({rows, cols}, rng, -8.0, 8.0);
    Tensor y = Tensor::empty({rows, cols}), yg = poisoned({rows, cols}, kGpu);
    Tensor xg = x.to(kGpu);
    cpu().softmax(f32(x), f32(y), rows, cols);
    gpu().softmax(f32(xg), f32(yg), rows, cols);
    EXPECT_TRUE(all_close(yg, y, 1e-4, 1e-9)) << rows << " x " << cols;
  }
}

TEST(CudaBackend, CrossEntropyForwardBackward) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(12);
  const int64_t cases[][2] = {{1, 1}, {37, 37}, {1000, 3}, {64, 50257}};
  for (const auto& c : cases) {
    const int64_t N = c[0], V = c[1];
    Tensor logits = random_tensor({N, V}, rng, -8.0, 8.0), targets = random_indices({N}, V, rng);
    Tensor probs = Tensor::empty({N, V}), losses = Tensor::empty({N});
    Tensor lg = logits.to(kGpu), tg = targets.to(kGpu);
    Tensor probs_g = poisoned({N, V}, kGpu), losses_g = poisoned({N}, kGpu);
    cpu().cross_entropy_forward(f32(logits), i32(targets), f32(probs), f32(losses), N, V);
    gpu().cross_entropy_forward(f32(lg), i32(tg), f32(probs_g), f32(losses_g), N, V);
    EXPECT_TRUE(all_close(probs_g, probs, 1e-4, 1e-9)) << N << " x " << V;
    EXPECT_TRUE(all_close(losses_g, losses, 1e-5, 1e-5)) << N << " x " << V;
    const float dloss = 1.0f / static_cast<float>(N);
    Tensor d = Tensor::empty({N, V}), dg = poisoned({N, V}, kGpu);
    cpu().cross_entropy_backward(f32(probs), i32(targets), dloss, f32(d), N, V);
    gpu().cross_entropy_backward(f32(probs_g), i32(tg), dloss, f32(dg), N, V);
    EXPECT_TRUE(all_close(dg, d, 1e-4, 1e-9)) << N << " x " << V;
  }
}

// A vocabulary-parallel rank's part: columns [first, first + V) of a vocabulary whose targets
// fall in and out of them.
TEST(CudaBackend, VocabParallelCrossEntropy) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(21);
  const int64_t cases[][3] = {{1, 1, 0}, {37, 37, 37}, {1000, 3, 3}, {64, 25152, 25152}};  // N, V, first
  for (const auto& c : cases) {
    const int64_t N = c[0], V = c[1], first = c[2];
    Tensor logits = random_tensor({N, V}, rng, -8.0, 8.0), targets = random_indices({N}, first + V, rng);
    Tensor lg = logits.to(kGpu), tg = targets.to(kGpu);
    Tensor stats = Tensor::empty({N, 3}), stats_g = poisoned({N, 3}, kGpu);
    cpu().vocab_cross_entropy_stats(f32(logits), i32(targets), first, f32(stats), N, V);
    gpu().vocab_cross_entropy_stats(f32(lg), i32(tg), first, f32(stats_g), N, V);
    EXPECT_TRUE(all_close(stats_g, stats, 1e-5, 1e-6)) << N << " x " << V;
    Tensor lse = random_tensor({N}, rng, 2.0, 9.0), lse_g = lse.to(kGpu);
    const float dloss = 1.0f / static_cast<float>(N);
    Tensor d = Tensor::empty({N, V}), dg = poisoned({N, V}, kGpu);
    cpu().vocab_cross_entropy_backward(f32(logits), i32(targets), first, f32(lse), dloss, f32(d), N, V);
    gpu().vocab_cross_entropy_backward(f32(lg), i32(tg), first, f32(lse_g), dloss, f32(dg), N, V);
    EXPECT_TRUE(all_close(dg, d, 1e-4, 1e-9)) << N << " x " << V;
  }
}

// Negative indices (rows another rank of a vocabulary-parallel group holds): zero rows, no gradient.
TEST(CudaBackend, EmbeddingOfOtherRanksRows) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 4, C = 3, V = 2;
  Tensor idx = Tensor::from_vector({n}, std::vector<int32_t>{1, -1, 0, -1});
  Rng rng(22);
  Tensor table = random_tensor({V, C}, rng), dout = random_tensor({n, C}, rng);
  Tensor out = Tensor::empty({n, C}), out_g = poisoned({n, C}, kGpu), table_g = table.to(kGpu);
  cpu().embedding_forward(i32(idx), f32(table), f32(out), n, C, V);
  Tensor idx_g = idx.to(kGpu);
  gpu().embedding_forward(i32(idx_g), f32(table_g), f32(out_g), n, C, V);
  EXPECT_TRUE(all_close(out_g, out, 0.0, 0.0));
  for (float v : out.slice(0, 1, 2).contiguous().to_vector<float>()) EXPECT_EQ(v, 0.0f);
  Tensor dt = Tensor::zeros({V, C}), dt_g = Tensor::zeros({V, C}, DType::f32, kGpu), dout_g = dout.to(kGpu);
  cpu().embedding_backward(i32(idx), f32(dout), f32(dt), n, C);
  gpu().embedding_backward(i32(idx_g), f32(dout_g), f32(dt_g), n, C);
  EXPECT_TRUE(all_close(dt_g, dt, 1e-6, 1e-7));
}

TEST(CudaBackend, EmbeddingForwardBackward) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(14);
  const int64_t cases[][3] = {{1, 1, 1}, {37, 37, 5}, {1000, 768, 50}, {100003, 3, 1000}};  // n, C, V
  for (const auto& c : cases) {
    const int64_t n = c[0], C = c[1], V = c[2];
    Tensor idx = random_indices({n}, V, rng), table = random_tensor({V, C}, rng), dout = random_tensor({n, C}, rng);
    Tensor idx_g = idx.to(kGpu), table_g = table.to(kGpu), dout_g = dout.to(kGpu);
    Tensor out = Tensor::empty({n, C}), out_g = poisoned({n, C}, kGpu);
    cpu().embedding_forward(i32(idx), f32(table), f32(out), n, C, V);
    gpu().embedding_forward(i32(idx_g), f32(table_g), f32(out_g), n, C, V);
    EXPECT_TRUE(all_close(out_g, out, 0.0, 0.0)) << n << " " << C << " " << V;
    Tensor dt = random_tensor({V, C}, rng);
    Tensor dt_g = dt.to(kGpu);
    cpu().embedding_backward(i32(idx), f32(dout), f32(dt), n, C);
    gpu().embedding_backward(i32(idx_g), f32(dout_g), f32(dt_g), n, C);
    // Repeated rows add in a different order (atomics).
    const double atol = 1e-6 * std::sqrt(static_cast<double>(n)) + 1e-6;
    EXPECT_TRUE(all_close(dt_g, dt, 1e-5, atol)) << n << " " << C << " " << V;
  }
}

TEST(CudaBackend, CausalAttentionForwardBackward) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(15);
  const int64_t cases[][4] = {{1, 1, 4, 1}, {2, 37, 48, 3}, {2, 64, 128, 4}, {1, 257, 64, 2}, {3, 5, 12, 12}};
  for (const auto& c : cases) {
    const int64_t B = c[0], T = c[1], C = c[2], H = c[3];
    const std::string what = "B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
                             " H=" + std::to_string(H);
    Tensor qkv = random_tensor({B, T, 3 * C}, rng, -2.0, 2.0), dy = random_tensor({B, T, C}, rng);
    Tensor qkv_g = qkv.to(kGpu), dy_g = dy.to(kGpu);
    Tensor y = Tensor::empty({B, T, C}), probs = Tensor::empty({B, H, T, T});
    Tensor y_g = poisoned({B, T, C}, kGpu), probs_g = poisoned({B, H, T, T}, kGpu);
    cpu().attention_forward(f32(qkv), f32(y), f32(probs), B, T, C, H);
    gpu().attention_forward(f32(qkv_g), f32(y_g), f32(probs_g), B, T, C, H);
    EXPECT_TRUE(all_close(probs_g, probs, 1e-4, 1e-6)) << what;
    EXPECT_TRUE(all_close(y_g, y, 1e-4, 1e-5)) << what;
    Tensor dqkv = Tensor::empty({B, T, 3 * C}), dqkv_g = poisoned({B, T, 3 * C}, kGpu);
    cpu().attention_backward(f32(qkv), f32(probs), f32(dy), f32(dqkv), B, T, C, H);
    gpu().attention_backward(f32(qkv_g), f32(probs_g), f32(dy_g), f32(dqkv_g), B, T, C, H);
    EXPECT_TRUE(all_close(dqkv_g, dqkv, 1e-4, 1e-5)) << what;
  }
}

TEST(CudaBackend, AttentionDecode) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(16);
  const int64_t cases[][4] = {{1, 0, 4, 1}, {1, 37, 48, 3}, {5, 100, 64, 4}, {37, 0, 48, 2}, {1, 1000, 768, 12}};
  for (const auto& c : cases) {  // n, past, C, H
    const int64_t n = c[0], past = c[1], C = c[2], H = c[3], L = past + n;
    Tensor q = random_tensor({n, C}, rng, -2.0, 2.0), k = random_tensor({L, C}, rng, -2.0, 2.0),
           v = random_tensor({L, C}, rng);
    Tensor y = Tensor::empty({n, C}), y_g = poisoned({n, C}, kGpu);
    Tensor qg = q.to(kGpu), kg = k.to(kGpu), vg = v.to(kGpu);
    cpu().attention_decode(f32(q), f32(k), f32(v), f32(y), n, past, C, H);
    gpu().attention_decode(f32(qg), f32(kg), f32(vg), f32(y_g), n, past, C, H);
    EXPECT_TRUE(all_close(y_g, y, 1e-4, 1e-5)) << "n=" << n << " past=" << past << " C=" << C << " H=" << H;
  }
}

// ================================================================================================
// The public ops on cuda:0, with autograd

namespace {

using OpFn = std::function<Tensor(const std::vector<Tensor>&)>;

// Reduces an op's output to a scalar with uneven weights per column (so every upstream gradient is
// not the same), on the output's device.
Tensor weighted_sum(const Tensor& out, const Tensor& weights) {
  if (out.numel() == 1) return ops::reshape(out, {});
  const int64_t cols = out.size(-1);
  return ops::sum(ops::linear(ops::reshape(out, {-1, cols}), weights.to(out.device())));
}

// Runs f on the CPU inputs and on copies of them on cuda:0, with every f32 input requiring grad;
// compares the outputs and each input's gradient.
void expect_op_matches(const std::vector<Tensor>& inputs, const OpFn& f, double rtol, double atol,
                       const std::string& what) {
  std::vector<Tensor> on_cpu, on_gpu;
  for (const Tensor& t : inputs) {
    Tensor c = t.clone(), g = t.to(kGpu);
    if (t.dtype() == DType::f32) {
      c.set_requires_grad(true);
      g.set_requires_grad(true);
    }
    on_cpu.push_back(c);
    on_gpu.push_back(g);
  }
  Tensor out_c = f(on_cpu), out_g = f(on_gpu);
  ASSERT_EQ(out_g.device(), kGpu) << what;
  EXPECT_TRUE(all_close(out_g, out_c, rtol, atol)) << what << ": output";
  Rng rng(99);
  const Tensor weights = random_tensor({out_c.ndim() ? out_c.size(-1) : 1, 1}, rng);
  weighted_sum(out_c, weights).backward();
  weighted_sum(out_g, weights).backward();
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].dtype() != DType::f32) continue;
    ASSERT_TRUE(on_cpu[i].grad().defined()) << what << ": input " << i;
    ASSERT_TRUE(on_gpu[i].grad().defined()) << what << ": input " << i;
    EXPECT_EQ(on_gpu[i].grad().device(), kGpu) << what << ": input " << i;
    EXPECT_TRUE(all_close(on_gpu[i].grad(), on_cpu[i].grad(), rtol, atol)) << what << ": grad of input " << i;
  }
}

}  // namespace

TEST(CudaOps, MatmulAndLinear) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(20);
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      Tensor a = ta ? random_tensor({43, 37}, rng) : random_tensor({37, 43}, rng);
      Tensor b = tb ? random_tensor({29, 43}, rng) : random_tensor({43, 29}, rng);
      expect_op_matches({a, b}, [=](const std::vector<Tensor>& t) { return ops::matmul(t[0], t[1], ta, tb); }, 1e-4,
                        1e-4, "matmul ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
    }
  }
  // Batched (B, M, K) x (K, N): the 2-D operand's gradient is reduced over the batch.
  expect_op_matches({random_tensor({3, 17, 33}, rng), random_tensor({33, 9}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::matmul(t[0], t[1]); }, 1e-4, 1e-4,
                    "batched matmul, broadcast b");
  expect_op_matches({random_tensor({4, 17, 33}, rng), random_tensor({4, 9, 33}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::matmul(t[0], t[1], false, true); }, 1e-4, 1e-4,
                    "batched matmul");
  expect_op_matches({random_tensor({2, 37, 65}, rng), random_tensor({65, 130}, rng), random_tensor({130}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::linear(t[0], t[1], t[2]); }, 1e-4, 1e-4,
                    "linear with bias");
  expect_op_matches({random_tensor({1, 1}, rng), random_tensor({1, 1}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::linear(t[0], t[1]); }, 1e-4, 1e-4,
                    "linear 1x1, no bias");
}

TEST(CudaOps, ElementwiseAndReductions) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(21);
  expect_op_matches({random_tensor({37, 41}, rng), random_tensor({41}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::add(t[0], t[1]); }, 1e-5, 1e-5,
                    "add, broadcast");
  expect_op_matches({random_tensor({5, 7}, rng), random_tensor({5, 7}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::add(t[0], t[1]); }, 1e-5, 1e-5, "add");
  for (int64_t n : {int64_t{1}, int64_t{37}, int64_t{1000003}}) {
    const std::string size = " n=" + std::to_string(n);
    expect_op_matches({random_tensor({n}, rng, -4.0, 4.0)},
                      [](const std::vector<Tensor>& t) { return ops::gelu(t[0]); }, 1e-5, 1e-5, "gelu" + size);
    expect_op_matches({random_tensor({n}, rng, -4.0, 4.0)},
                      [](const std::vector<Tensor>& t) { return ops::relu(t[0]); }, 1e-5, 1e-5, "relu" + size);
    expect_op_matches({random_tensor({n}, rng)}, [](const std::vector<Tensor>& t) { return ops::scale(t[0], -2.5f); },
                      1e-5, 1e-5, "scale" + size);
    expect_op_matches({random_tensor({n}, rng)}, [](const std::vector<Tensor>& t) { return ops::sum(t[0]); }, 1e-5,
                      1e-4, "sum" + size);
    expect_op_matches({random_tensor({n}, rng)}, [](const std::vector<Tensor>& t) { return ops::mean(t[0]); }, 1e-5,
                      1e-6, "mean" + size);
  }
}

TEST(CudaOps, FusedOps) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(22);
  expect_op_matches({random_tensor({2, 37, 96}, rng, -2.0, 2.0), random_tensor({96}, rng), random_tensor({96}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::layer_norm(t[0], t[1], t[2]); }, 1e-4, 1e-4,
                    "layer_norm");
  expect_op_matches({random_tensor({37, 101}, rng, -5.0, 5.0), random_indices({37}, 101, rng)},
                    [](const std::vector<Tensor>& t) { return ops::cross_entropy(t[0], t[1]); }, 1e-5, 1e-5,
                    "cross_entropy");
  expect_op_matches({random_indices({3, 37}, 50, rng), random_tensor({50, 24}, rng)},
                    [](const std::vector<Tensor>& t) { return ops::embedding(t[0], t[1]); }, 1e-5, 1e-5,
                    "embedding");
  expect_op_matches({random_tensor({2, 37, 3 * 48}, rng, -2.0, 2.0)},
                    [](const std::vector<Tensor>& t) { return ops::causal_attention(t[0], 4); }, 1e-4, 1e-4,
                    "causal_attention");
  Tensor x = random_tensor({37, 1001}, rng, -6.0, 6.0);
  EXPECT_TRUE(all_close(ops::softmax(x.to(kGpu)), ops::softmax(x), 1e-4, 1e-9)) << "softmax";
}

// x -> linear -> gelu -> layer_norm -> linear -> cross_entropy, gradients of every parameter.
TEST(CudaOps, SmallNetworkGradients) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(23);
  const int64_t N = 16, D = 37, Hd = 64, V = 11;
  std::vector<Tensor> inputs{random_tensor({N, D}, rng),  random_tensor({D, Hd}, rng, -0.3, 0.3),
                             random_tensor({Hd}, rng),     random_tensor({Hd}, rng, 0.5, 1.5),
                             random_tensor({Hd}, rng),     random_tensor({Hd, V}, rng, -0.3, 0.3),
                             random_tensor({V}, rng),      random_indices({N}, V, rng)};
  expect_op_matches(
      inputs,
      [](const std::vector<Tensor>& t) {
        Tensor h = ops::gelu(ops::linear(t[0], t[1], t[2]));
        h = ops::layer_norm(h, t[3], t[4]);
        return ops::cross_entropy(ops::linear(h, t[5], t[6]), t[7]);
      },
      1e-4, 1e-5, "small network");
}

TEST(CudaOps, MixedDevicesAreRejected) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(24);
  Tensor a = random_tensor({3, 4}, rng), b = random_tensor({4, 5}, rng);
  EXPECT_THROW(ops::matmul(a.to(kGpu), b), InvalidArgument);
  EXPECT_THROW(ops::add(a.to(kGpu), a), InvalidArgument);
}

// ================================================================================================
// Timings (not a test: run with TUTTI_CUDA_TIMING=1 to print a table of achieved rates)

namespace {


}  // namespace

double time_ms(const std::function<void()>& f, int reps = 20) { return median_time_ms(f, reps); }

TEST(CudaBackendTiming, PrintsRates) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  if (!timing_requested()) GTEST_SKIP() << "set TUTTI_CUDA_TIMING=1 to time the kernels";
  Rng rng(30);
  const int64_t n = int64_t{1} << 26;  // 256 MiB of f32
  Tensor x = random_tensor({n}, rng).to(kGpu), y = random_tensor({n}, rng).to(kGpu), z = Tensor::empty({n}, DType::f32, kGpu);
  const double gb = static_cast<double>(n) * sizeof(float) / 1e9;
  std::printf("%-34s %10s %12s\n", "kernel", "ms", "rate");
  auto row = [](const char* name, double ms, double amount, const char* unit) {
    std::printf("%-34s %10.4f %9.1f %s\n", name, ms, amount / (ms * 1e-3), unit);
  };
  row("copy_on_device 2^26 (r+w)", time_ms([&] { gpu().copy_on_device(f32(z), f32(x), n * sizeof(float)); }), 2 * gb,
      "GB/s");
  row("fill 2^26 (w)", time_ms([&] { gpu().fill(f32(z), n, 1.0f); }), gb, "GB/s");
  row("scale 2^26 (r+w)", time_ms([&] { gpu().scale(f32(x), 2.0f, f32(z), n); }), 2 * gb, "GB/s");
  row("add 2^26 (2r+w)", time_ms([&] { gpu().add(f32(x), f32(y), f32(z), 1, n); }), 3 * gb, "GB/s");
  row("add bcast 2^16 x 1024 (r+w)", time_ms([&] { gpu().add(f32(x), f32(y), f32(z), n / 1024, 1024); }), 2 * gb,
      "GB/s");
  row("gelu_forward 2^26 (r+w)", time_ms([&] { gpu().gelu_forward(f32(x), f32(z), n); }), 2 * gb, "GB/s");
  row("gelu_backward 2^26 (2r+w)", time_ms([&] { gpu().gelu_backward(f32(x), f32(y), f32(z), n); }), 3 * gb, "GB/s");
  row("sum 2^26 (r, incl. copy to host)", time_ms([&] { gpu().sum(f32(x), n); }), gb, "GB/s");
  row("sum_rows 65536 x 1024 (r)", time_ms([&] { gpu().sum_rows(f32(x), f32(z), n / 1024, 1024, false); }), gb,
      "GB/s");
  row("softmax 1024 x 65536 (r+w)", time_ms([&] { gpu().softmax(f32(x), f32(z), 1024, n / 1024); }), 2 * gb, "GB/s");
  row("layer_norm_fwd 87381 x 768 (r+w)",
      time_ms([&] {
        gpu().layer_norm_forward(f32(x), f32(y), f32(y), f32(z), f32(y) + 768, f32(y) + 768 + 87381, 87381, 768,
                                 1e-5f);
      }),
      2.0 * 87381 * 768 * 4 / 1e9, "GB/s");
  for (int64_t s : {int64_t{1024}, int64_t{4096}}) {
    Gemm g;
    g.m = g.n = g.k = s;
    g.a = f32(x);
    g.b = f32(y);
    g.c = f32(z);
    g.lda = g.ldb = g.ldc = s;
    const std::string name = "gemm fp32 " + std::to_string(s) + "^3";
    row(name.c_str(), time_ms([&] { gpu().gemm(g); }, 10), 2.0 * s * s * s / 1e12, "TFLOP/s");
  }

  // LayerNorm at the GPT's (B T, C) = (16384, 768), each against its floor: the bytes it must move
  // (x, y, dy, dx and the row statistics) at the copy rate above (bytes read + written).
  const double copy_ms = time_ms([&] { gpu().copy_on_device(f32(z), f32(x), n * sizeof(float)); });
  const double copy_rate = 2 * gb * 1e9 / (copy_ms * 1e-3);
  const int64_t N = 16384, C = 768;
  const Tensor lx = random_tensor({N, C}, rng).to(kGpu), ldy = random_tensor({N, C}, rng).to(kGpu),
               lw = random_tensor({C}, rng).to(kGpu), lb = random_tensor({C}, rng).to(kGpu);
  Tensor ly = Tensor::empty({N, C}, DType::f32, kGpu), lyh = Tensor::empty({N, C}, DType::bf16, kGpu),
         ldx = Tensor::empty({N, C}, DType::f32, kGpu), lmean = Tensor::empty({N}, DType::f32, kGpu),
         lrstd = Tensor::empty({N}, DType::f32, kGpu), ldw = Tensor::zeros({C}, DType::f32, kGpu),
         ldb = Tensor::zeros({C}, DType::f32, kGpu);
  std::printf("\n%-40s %10s %10s %9s   (copy rate %.0f GB/s)\n", "LayerNorm 16384 x 768", "ms", "floor ms",
              "of floor", copy_rate / 1e9);
  auto versus_floor = [&](const char* name, double ms, double bytes) {
    const double floor_ms = bytes / copy_rate * 1e3;
    std::printf("%-40s %10.4f %10.4f %8.0f%%\n", name, ms, floor_ms, 100.0 * floor_ms / ms);
  };
  const double elems = static_cast<double>(N * C), stats = 8.0 * N;  // mean and rstd, 4 bytes each a row
  versus_floor("forward, fp32 y (r 4 + w 4 B)", time_ms([&] {
                 gpu().layer_norm_forward(f32(lx), f32(lw), f32(lb), f32(ly), f32(lmean), f32(lrstd), N, C, 1e-5f);
               }),
               8.0 * elems + stats);
  versus_floor("forward, bf16 y (r 4 + w 2 B)", time_ms([&] {
                 gpu().layer_norm_forward_bf16(f32(lx), f32(lw), f32(lb), bf16(lyh), f32(lmean), f32(lrstd), N, C,
                                               1e-5f);
               }),
               6.0 * elems + stats);
  versus_floor("backward, dx dw db (r 8 + w 4 B)", time_ms([&] {
                 gpu().layer_norm_backward(f32(lx), f32(lw), f32(lmean), f32(lrstd), f32(ldy), f32(ldx), f32(ldw),
                                           f32(ldb), N, C, false);
               }),
               12.0 * elems + stats);
}
