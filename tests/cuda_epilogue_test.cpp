// GEMMs with fused epilogues on the CUDA backend (cuBLASLt: bias, bias + GELU keeping GELU's input,
// the bias gradient) against the CPU's fp32, at the kernel level and through the ops with autograd
// (linear, linear_gelu), fused against the unfused composition on the GPU too. Every output is
// poisoned (NaN) first; NaN never passes. Bounds (/work/.library/device/METHOD.md): fp32 with TF32
// off 1e-5 in ||out - ref|| / ||ref||; bf16 products against fp32 on the same rounded inputs 1e-5
// (only summation order differs), against fp32 on the original inputs 1e-2. Without a GPU, or
// with the fusion off (TUTTI_CUDA_LT=0), the GPU tests skip.
// Letters: N rows, in / out features; (m, n, k) a product's sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "backend/backend.hpp"
#include "cuda_test_util.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/ops/ops.hpp"

using namespace tutti;
using namespace tutti::cuda_test;

namespace {

constexpr double kFp32Bound = 1e-5;   // fp32 on the GPU (TF32 off) against the CPU
constexpr double kSameInputs = 1e-5;  // bf16 products against fp32 on the same rounded inputs
constexpr double kBf16Bound = 1e-2;   // bf16 operands against fp32

bool tf32_on() {
  const char* v = std::getenv("TUTTI_CUDA_TF32");
  return v != nullptr && std::string(v) == "1";
}

bool all_nan(const Tensor& t) {
  for (float v : t.to_vector<float>())
    if (!std::isnan(v)) return false;
  return true;
}

double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
Tensor map(const Tensor& x, double (*f)(double)) {
  std::vector<float> v = x.to_vector<float>();
  for (float& e : v) e = static_cast<float>(f(e));
  return Tensor::from_vector(x.shape(), v);
}
// Column sums of g (rows, cols) in double.
Tensor column_sums(const Tensor& g) {
  const std::vector<float> v = g.to_vector<float>();
  const int64_t rows = g.size(0), cols = g.size(1);
  std::vector<double> s(static_cast<size_t>(cols), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) s[size_t(c)] += v[size_t(r * cols + c)];
  return Tensor::from_vector({cols}, std::vector<float>(s.begin(), s.end()));
}

template <class T>
GemmOf<T> row_major(bool ta, int64_t m, int64_t n, int64_t k, const T* a, const T* b, float* c) {
  GemmOf<T> g;
  g.trans_a = ta;
  g.m = m, g.n = n, g.k = k;
  g.a = a, g.b = b, g.c = c;
  g.lda = ta ? m : k, g.ldb = n, g.ldc = n;
  return g;
}
bool run(const EpilogueGemmOf<float>& g) { return gpu().gemm_epilogue(g); }
bool run(const EpilogueGemmOf<BFloat16>& g) { return gpu().gemm_epilogue_bf16(g); }

struct Sizes {
  int64_t m, n, k;
};
// Odd sizes, a single row, and GPT-2's c_fc shapes at a few rows. n = 131 is not a multiple of 8,
// which GELU's aux matrix needs: the backend must decline that one and leave the output alone. It
// may decline other odd (misaligned) cases too; with every leading dimension a multiple of 8 it
// must fuse.
const Sizes kSizes[] = {{1, 8, 1}, {37, 131, 45}, {45, 64, 37}, {100, 96, 768}, {257, 3072, 768}, {768, 3072, 256}};

// One epilogue at one size, fp32 or bf16 operands, against the CPU.
template <class T>
void check_epilogue(GemmEpilogue e, const Sizes& s, Rng& rng) {
  const bool half = std::is_same_v<T, BFloat16>, grad = e == GemmEpilogue::bias_grad;
  const double bound = half ? kSameInputs : kFp32Bound;
  const std::string what = std::string(half ? "bf16" : "fp32") + " epilogue " + std::to_string(int(e)) + " m=" +
                           std::to_string(s.m) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k);
  // Forward epilogues: A (m, k), B (k, n). The bias gradient's product is dW = x^T g: A (k, m)^T.
  Tensor a = random_tensor(grad ? Shape{s.k, s.m} : Shape{s.m, s.k}, rng), b = random_tensor({s.k, s.n}, rng);
  const Tensor bias = random_tensor({s.n}, rng).to(kGpu);
  if (half) {
    a = rounded(a);
    b = rounded(b);
  }
  const Tensor ag = half ? bf16_tensor(a, kGpu) : a.to(kGpu), bg = half ? bf16_tensor(b, kGpu) : b.to(kGpu);
  Tensor c = poisoned({s.m, s.n}), aux = poisoned({s.m, s.n}), db = poisoned({s.n});
  EpilogueGemmOf<T> g;
  g.gemm = row_major<T>(grad, s.m, s.n, s.k, static_cast<const T*>(ag.raw_data()), static_cast<const T*>(bg.raw_data()),
                        f32(c));
  g.epilogue = e;
  g.bias = f32(bias);
  g.aux = f32(aux);
  g.bias_grad = f32(db);
  const bool fused = run(g);
  if (e == GemmEpilogue::bias_gelu && s.n % 8 != 0) {
    EXPECT_FALSE(fused) << what << ": aux's leading dimension is not a multiple of 8";
    EXPECT_TRUE(all_nan(c) && all_nan(aux)) << what << ": declined, yet wrote";
    return;
  }
  const bool aligned = s.n % 8 == 0 && s.k % 8 == 0 && (!grad || s.m % 8 == 0);
  if (!fused) {
    EXPECT_FALSE(aligned) << what << ": cuBLASLt declined an aligned case";
    EXPECT_TRUE(all_nan(c)) << what << ": declined, yet wrote";
    std::printf("%s: declined (misaligned), the caller runs it unfused\n", what.c_str());
    return;
  }
  const Tensor product = ops::matmul(a, b, grad, false);  // CPU fp32
  const Tensor pre = ops::add(product, bias.to(kCpu));
  if (e == GemmEpilogue::bias) EXPECT_TRUE(within(relative_error(c, pre), bound)) << what;
  if (grad) {
    EXPECT_TRUE(within(relative_error(c, product), bound)) << what << ": dW";
    EXPECT_TRUE(within(relative_error(db, column_sums(b)), bound)) << what << ": bias gradient";
  }
  if (e == GemmEpilogue::bias_gelu) {
    EXPECT_TRUE(within(relative_error(aux, pre), bound)) << what << ": aux (GELU's input)";
    // cuBLASLt documents "GELU" without its form: measure which one it computes.
    const double to_tanh = relative_error(c, map(pre, gelu_tanh)), to_erf = relative_error(c, map(pre, gelu_erf));
    EXPECT_TRUE(within(to_tanh, bound)) << what << ": against GELU's tanh form (erf form: " << to_erf << ")";
    if (s.m == 257) std::printf("%s: GELU against the tanh form %.2e, against the erf form %.2e\n", what.c_str(),
                                to_tanh, to_erf);
  }
}

bool fusion_on() {
  const char* v = std::getenv("TUTTI_CUDA_LT");
  return v == nullptr || std::string(v) != "0";
}

}  // namespace

// ================================================================================================
// Kernels

TEST(CudaEpilogue, KernelsAgainstCpu) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!fusion_on()) GTEST_SKIP() << "fusion off (TUTTI_CUDA_LT=0)";
  if (tf32_on()) GTEST_SKIP() << "TUTTI_CUDA_TF32=1: the fp32 bound assumes full fp32";
  Rng rng(11);
  for (GemmEpilogue e : {GemmEpilogue::bias, GemmEpilogue::bias_gelu, GemmEpilogue::bias_grad})
    for (const Sizes& s : kSizes) {
      check_epilogue<float>(e, s, rng);
      check_epilogue<BFloat16>(e, s, rng);
    }
}

// Products written in bf16 (mixed precision's c_attn and c_fc): C, the bias and GELU's aux in bf16.
// Against the CPU in fp32 on the same rounded operands and bias: within bf16's rounding of C.
TEST(CudaEpilogue, Bf16OutputFusesBiasAndGelu) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!fusion_on()) GTEST_SKIP() << "fusion off (TUTTI_CUDA_LT=0)";
  Rng rng(13);
  for (const Sizes s : {Sizes{100, 96, 768}, Sizes{257, 3072, 768}})
    for (GemmEpilogue e : {GemmEpilogue::bias, GemmEpilogue::bias_gelu}) {
      const std::string what = std::string(e == GemmEpilogue::bias ? "bias" : "bias_gelu") + " m=" +
                               std::to_string(s.m) + " n=" + std::to_string(s.n);
      const Tensor a = rounded(random_tensor({s.m, s.k}, rng)), b = rounded(random_tensor({s.k, s.n}, rng));
      const Tensor bias = rounded(random_tensor({s.n}, rng));
      const Tensor ag = bf16_tensor(a, kGpu), bg = bf16_tensor(b, kGpu), biasg = bf16_tensor(bias, kGpu);
      Tensor c = poisoned_bf16({s.m, s.n}), aux = poisoned_bf16({s.m, s.n});
      EpilogueGemmOf<BFloat16> g;
      g.gemm = row_major<BFloat16>(false, s.m, s.n, s.k, bf16(ag), bf16(bg), nullptr);
      g.gemm.c_bf16 = bf16(c);
      g.epilogue = e;
      g.bias = biasg.raw_data();
      g.aux = aux.raw_data();
      ASSERT_TRUE(gpu().gemm_epilogue_bf16(g)) << what << ": declined";
      const Tensor pre = ops::add(ops::matmul(a, b), bias);
      if (e == GemmEpilogue::bias) {
        EXPECT_TRUE(within(relative_error(widened(c), pre), kBf16Bound)) << what;
      } else {
        EXPECT_TRUE(within(relative_error(widened(aux), pre), kBf16Bound)) << what << ": aux";
        EXPECT_TRUE(within(relative_error(widened(c), map(pre, gelu_tanh)), kBf16Bound)) << what;
      }
    }
}

// The MLP's backward product: C = (A B) * gelu'(aux), aux GELU's kept input, in bf16.
TEST(CudaEpilogue, Bf16Dgelu) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!fusion_on()) GTEST_SKIP() << "fusion off (TUTTI_CUDA_LT=0)";
  Rng rng(16);
  for (const Sizes s : {Sizes{64, 256, 96}, Sizes{1024, 3072, 768}}) {
    const std::string what = "m=" + std::to_string(s.m) + " n=" + std::to_string(s.n);
    const Tensor a = rounded(random_tensor({s.m, s.k}, rng)), b = rounded(random_tensor({s.k, s.n}, rng, -0.1, 0.1));
    const Tensor h = rounded(random_tensor({s.m, s.n}, rng, -3.0, 3.0));
    const Tensor ag = bf16_tensor(a, kGpu), bg = bf16_tensor(b, kGpu), hg = bf16_tensor(h, kGpu);
    Tensor c = poisoned_bf16({s.m, s.n});
    EpilogueGemmOf<BFloat16> g;
    g.gemm = row_major<BFloat16>(false, s.m, s.n, s.k, bf16(ag), bf16(bg), nullptr);
    g.gemm.c_bf16 = bf16(c);
    g.epilogue = GemmEpilogue::dgelu;
    g.aux = hg.raw_data();
    ASSERT_TRUE(gpu().gemm_epilogue_bf16(g)) << what << ": declined";
    std::vector<float> p = ops::matmul(a, b).to_vector<float>();
    const std::vector<float> hv = h.to_vector<float>();
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(p[i] * gelu_tanh_grad(hv[i]));
    EXPECT_TRUE(within(relative_error(widened(c), Tensor::from_vector({s.m, s.n}, p)), kBf16Bound)) << what;
  }
}

TEST(CudaEpilogue, DeclinesWhatItDoesNotFuse) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  Rng rng(12);
  const Tensor a = random_tensor({4, 8}, rng).to(kGpu), b = random_tensor({8, 16}, rng).to(kGpu);
  const Tensor bias = random_tensor({16}, rng).to(kGpu);
  Tensor c = poisoned({4, 16});
  EpilogueGemmOf<float> g;
  g.gemm = row_major<float>(false, 4, 16, 8, f32(a), f32(b), f32(c));
  g.bias = f32(bias);
  g.gemm.beta = 1.0f;  // accumulating into C is not fused
  EXPECT_FALSE(run(g));
  g.gemm.beta = 0.0f;
  g.gemm.batch = 2;  // nor batches
  EXPECT_FALSE(run(g));
  g.gemm.batch = 1;
  g.gemm.k = 0;  // nor an empty product
  EXPECT_FALSE(run(g));
  EXPECT_TRUE(all_nan(c));
  EXPECT_FALSE(backend_for(kCpu).gemm_epilogue(g)) << "the CPU has no fused path";
}

TEST(CudaEpilogue, GeluBackwardToBf16IsGeluBackwardRounded) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  Rng rng(16);
  for (int64_t n : {int64_t{1}, int64_t{37}, int64_t{1000003}})
    for (int64_t offset : {int64_t{0}, int64_t{1}}) {  // aligned (4 at a time) and not
      if (offset >= n) continue;
      const Tensor x = random_tensor({n}, rng, -6.0, 6.0).to(kGpu), dy = random_tensor({n}, rng).to(kGpu);
      Tensor dx = poisoned({n}), dx_bf16 = ops::to_bf16(poisoned({n}));
      gpu().gelu_backward(f32(x) + offset, f32(dy) + offset, f32(dx) + offset, n - offset);
      gpu().gelu_backward_bf16(f32(x) + offset, f32(dy) + offset, bf16(dx_bf16) + offset, n - offset);
      const Tensor expected = rounded(dx.to(kCpu).slice(0, offset, n));
      const std::vector<float> e = expected.to_vector<float>();
      const Tensor got = dx_bf16.to(kCpu);
      const auto* bits = static_cast<const uint16_t*>(got.raw_data());
      int64_t differ = 0;
      for (int64_t i = offset; i < n; ++i) differ += bf16_value(bits[i]) != e[size_t(i - offset)];
      EXPECT_EQ(differ, 0) << "n=" << n << " offset=" << offset << ": elements not equal to gelu_backward rounded";
    }
}

// A gradient rounded and its column sums in one pass: y bit for bit to_bf16's, the sums those of
// the unrounded values (fp32 on the GPU against double on the host); and sum_rows_bf16 of y, the
// sums of the rounded values. Shapes: one row-split and many, 16 bytes a thread (cols % 4 == 0 or
// % 8 == 0, aligned) and one element (other cols, or x one element in).
TEST(CudaEpilogue, ToBf16SumRowsIsToBf16AndColumnSums) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  Rng rng(17);
  struct Case {
    int64_t rows, cols, offset;
  };
  for (const Case& s : {Case{1, 4, 0}, Case{5, 3, 0}, Case{37, 768, 0}, Case{16384, 768, 0}, Case{2000, 770, 0},
                        Case{3000, 768, 1}, Case{0, 8, 0}}) {
    const std::string what = std::to_string(s.rows) + " x " + std::to_string(s.cols) + " offset " +
                             std::to_string(s.offset);
    const int64_t n = s.rows * s.cols;
    const Tensor x = random_tensor({n + s.offset}, rng).to(kGpu);
    Tensor y = ops::to_bf16(poisoned({n + s.offset})), expected = ops::to_bf16(poisoned({n + s.offset}));
    Tensor sums = poisoned({s.cols});
    gpu().to_bf16_sum_rows(f32(x) + s.offset, bf16(y) + s.offset, f32(sums), s.rows, s.cols);
    gpu().to_bf16(f32(x) + s.offset, bf16(expected) + s.offset, n);
    const Tensor got = y.to(kCpu), want = expected.to(kCpu);
    EXPECT_EQ(std::memcmp(static_cast<const uint16_t*>(got.raw_data()) + s.offset,
                          static_cast<const uint16_t*>(want.raw_data()) + s.offset, n * sizeof(uint16_t)),
              0)
        << what << ": y is not to_bf16's";
    Tensor sums_bf16 = poisoned({s.cols});
    gpu().sum_rows_bf16(bf16(y) + s.offset, f32(sums_bf16), s.rows, s.cols);
    const std::vector<float> xs = x.to(kCpu).to_vector<float>(), ys = widened(got).to_vector<float>();
    EXPECT_TRUE(within(column_sums_error(sums, xs, s.rows, s.cols, s.offset), kFp32Bound))
        << what << ": to_bf16_sum_rows' sums";
    EXPECT_TRUE(within(column_sums_error(sums_bf16, ys, s.rows, s.cols, s.offset), kFp32Bound))
        << what << ": sum_rows_bf16";
  }
}

// ================================================================================================
// Ops with autograd: linear and linear_gelu, fused (on the GPU) against the CPU and against the
// unfused composition on the GPU (matmul, add, gelu: no epilogue)

namespace {

using LinearFn = std::function<Tensor(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& w_bf16)>;

// Output and the gradients of x, w and b of f on `device` (bf16 copy of w when mixed).
std::vector<Tensor> run_linear(const LinearFn& f, const Tensor& x, const Tensor& w, const Tensor& b, Device device,
                               bool mixed, const Tensor& weights) {
  const Tensor xd = x.to(device).set_requires_grad(true), wd = w.to(device).set_requires_grad(true);
  const Tensor bd = b.to(device).set_requires_grad(true);
  const Tensor out = f(xd, wd, bd, mixed ? ops::to_bf16(wd.detach()) : Tensor());
  const int64_t cols = out.size(-1);
  ops::sum(ops::linear(ops::reshape(out, {-1, cols}), weights.to(device))).backward();
  return {out.to(kCpu), xd.grad().to(kCpu), wd.grad().to(kCpu), bd.grad().to(kCpu)};
}

void expect_linear_matches(const LinearFn& fused, const LinearFn& unfused, int64_t N, int64_t in, int64_t out,
                           bool mixed, Rng& rng) {
  const Tensor x = random_tensor({N / 5 ? 5 : 1, N / 5 ? N / 5 : N, in}, rng), w = random_tensor({in, out}, rng);
  const Tensor b = random_tensor({out}, rng), weights = random_tensor({out, 1}, rng);
  const std::vector<Tensor> f = run_linear(fused, x, w, b, kGpu, mixed, weights);
  const std::vector<Tensor> u = run_linear(unfused, x, w, b, kGpu, mixed, weights);
  const std::vector<Tensor> c = run_linear(unfused, x, w, b, kCpu, false, weights);
  const char* names[] = {"output", "dx", "dW", "db"};
  const std::string what = std::string(mixed ? "bf16" : "fp32") + " N=" + std::to_string(N) + " in=" +
                           std::to_string(in) + " out=" + std::to_string(out);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_TRUE(within(relative_error(f[i], c[i]), mixed ? kBf16Bound : kFp32Bound)) << what << ": " << names[i]
                                                                                   << " against the CPU";
    // bf16: linear_gelu's fused bias gradient sums the rounded gradient the dW product reads (the
    // dW product's epilogue), the unfused one the fp32 gradient (linear's fused one does too, in
    // the pass that rounds it); the rest reads the same rounded operands.
    const double bound = mixed && i == 3 ? kBf16Bound : mixed ? kSameInputs : kFp32Bound;
    EXPECT_TRUE(within(relative_error(f[i], u[i]), bound)) << what << ": " << names[i] << " against unfused";
  }
}

Tensor unfused_linear(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& w_bf16) {
  return ops::add(ops::matmul(ops::reshape(x, {-1, w.size(0)}), w, false, false, w_bf16), b);
}

}  // namespace

TEST(CudaEpilogueOps, LinearAgainstCpuAndUnfused) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (tf32_on()) GTEST_SKIP() << "TUTTI_CUDA_TF32=1: the fp32 bound assumes full fp32";
  Rng rng(13);
  const LinearFn fused = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& wh) {
    return ops::reshape(ops::linear(x, w, b, wh), {-1, w.size(1)});
  };
  const LinearFn gelu_fused = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& wh) {
    return ops::reshape(ops::linear_gelu(x, w, b, wh), {-1, w.size(1)});
  };
  const LinearFn gelu_unfused = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& wh) {
    return ops::gelu(unfused_linear(x, w, b, wh));
  };
  for (bool mixed : {false, true})
    for (const Sizes& s : {Sizes{1, 8, 1}, Sizes{45, 131, 37}, Sizes{90, 256, 768}, Sizes{200, 3072, 768}}) {
      expect_linear_matches(fused, unfused_linear, s.m, s.k, s.n, mixed, rng);
      expect_linear_matches(gelu_fused, gelu_unfused, s.m, s.k, s.n, mixed, rng);
    }
}

TEST(EpilogueOps, LinearGeluOnCpuIsGeluOfLinear) {
  Rng rng(14);
  const Tensor x = random_tensor({3, 7, 5}, rng), w = random_tensor({5, 16}, rng), b = random_tensor({16}, rng);
  const Tensor fused = ops::linear_gelu(x, w, b), plain = ops::gelu(ops::linear(x, w, b));
  EXPECT_EQ(fused.to_vector<float>(), plain.to_vector<float>()) << "the CPU path must not change";
  const Tensor w2 = random_tensor({16, 4}, rng), b2 = random_tensor({4}, rng);
  EXPECT_EQ(ops::mlp(x, w, b, w2, b2).to_vector<float>(), ops::linear(plain, w2, b2).to_vector<float>())
      << "mlp on the CPU is its two ops";
}

// ================================================================================================
// Timings at GPT-2 124M's batch-16 shapes in bf16 (not a test: TUTTI_CUDA_TIMING=1 prints the
// table): each linear layer's GEMM with its epilogue fused against the GEMM and the separate
// kernels, and each floor: max(flops / 790 TFLOP/s, bytes / 3.0 TB/s), both measured on an H200
// (bench/RESULTS.md). Bytes: bf16 operands read once, fp32 outputs (and aux) written once.

namespace {

void print_row(const char* name, double unfused, double fused, double flops, double bytes) {
  const double floor_ms = std::max(flops / 790e9, bytes / 3.0e9);
  std::printf("%-34s %9.3f %9.3f %9.3f %7.0f%% %7.0f%%\n", name, unfused, fused, floor_ms, 100 * floor_ms / unfused,
              100 * floor_ms / fused);
}

}  // namespace

double time_ms(const std::function<void()>& f, int reps = 20) { return median_time_ms(f, reps); }

TEST(CudaEpilogueTiming, Gpt2Shapes) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!timing_requested()) GTEST_SKIP() << "set TUTTI_CUDA_TIMING=1 to time the kernels";
  if (!fusion_on()) GTEST_SKIP() << "fusion off (TUTTI_CUDA_LT=0)";
  const int64_t N = 16 * 1024, C = 768;
  Rng rng(15);
  const Tensor x = ops::to_bf16(random_tensor({N * 4 * C}, rng).to(kGpu));
  const Tensor w = ops::to_bf16(random_tensor({4 * C * C}, rng).to(kGpu)), bias = random_tensor({4 * C}, rng).to(kGpu);
  const Tensor g32 = random_tensor({N * 4 * C}, rng).to(kGpu);
  Tensor out = Tensor::empty({N * 4 * C}, DType::f32, kGpu), aux = Tensor::empty({N * 4 * C}, DType::f32, kGpu);
  Tensor dw = Tensor::empty({4 * C * C}, DType::f32, kGpu), db = Tensor::empty({4 * C}, DType::f32, kGpu);
  std::printf("%-34s %9s %9s %9s %8s %8s\n", "GPT-2 B16 bf16, one layer", "apart ms", "fused ms", "floor ms",
              "apart", "fused");
  struct Layer {
    const char* name;
    int64_t in, out;
    bool gelu;
  };
  for (const Layer& l : {Layer{"c_attn", C, 3 * C, false}, Layer{"attn.c_proj", C, C, false},
                         Layer{"c_fc + GELU", C, 4 * C, true}, Layer{"mlp.c_proj", 4 * C, C, false}}) {
    const double flops = 2.0 * N * l.in * l.out;
    EpilogueGemmOf<BFloat16> f;
    f.gemm = row_major<BFloat16>(false, N, l.out, l.in, bf16(x), bf16(w), f32(out));
    f.epilogue = l.gelu ? GemmEpilogue::bias_gelu : GemmEpilogue::bias;
    f.bias = f32(bias);
    f.aux = f32(aux);
    const double fused = time_ms([&] { ASSERT_TRUE(run(f)); });
    const double apart = time_ms([&] {
      gpu().gemm_bf16(f.gemm);
      gpu().add(f32(out), f32(bias), f32(out), N, l.out);
      if (l.gelu) gpu().gelu_forward(f32(out), f32(aux), N * l.out);
    });
    const double bytes = 2.0 * N * l.in + 2.0 * l.in * l.out + 4.0 * N * l.out * (l.gelu ? 2 : 1);
    print_row((std::string(l.name) + " forward").c_str(), apart, fused, flops, bytes);
    // Backward's dW = x^T g (g rounded to bf16) with the bias gradient, against dW then sum_rows.
    EpilogueGemmOf<BFloat16> b;
    b.gemm = row_major<BFloat16>(true, l.in, l.out, N, bf16(x), bf16(x), f32(dw));
    b.epilogue = GemmEpilogue::bias_grad;
    b.bias_grad = f32(db);
    const double fused_b = time_ms([&] { ASSERT_TRUE(run(b)); });
    const double apart_b = time_ms([&] {
      gpu().gemm_bf16(b.gemm);
      gpu().sum_rows(f32(g32), f32(db), N, l.out, false);
    });
    print_row((std::string(l.name) + " dW + bias grad").c_str(), apart_b, fused_b, flops,
              2.0 * N * (l.in + l.out) + 4.0 * l.in * l.out);
  }
  // The MLP in bf16 (ops::mlp): c_fc writing GELU's output and input in bf16, against fp32; and
  // mlp.c_proj's dx product with GELU's gradient (DGELU, bf16 out) against the fp32 product then
  // gelu_backward_bf16.
  const double flops = 2.0 * N * C * 4 * C;
  Tensor out16 = Tensor::empty({N * 4 * C}, DType::bf16, kGpu), aux16 = Tensor::empty({N * 4 * C}, DType::bf16, kGpu);
  const Tensor bias16 = ops::to_bf16(bias);
  EpilogueGemmOf<BFloat16> f32_out, f16_out;
  f32_out.gemm = row_major<BFloat16>(false, N, 4 * C, C, bf16(x), bf16(w), f32(out));
  f32_out.epilogue = GemmEpilogue::bias_gelu;
  f32_out.bias = f32(bias);
  f32_out.aux = f32(aux);
  f16_out = f32_out;
  f16_out.gemm.c = nullptr;
  f16_out.gemm.c_bf16 = bf16(out16);
  f16_out.bias = bias16.raw_data();
  f16_out.aux = aux16.raw_data();
  print_row("c_fc + GELU, bf16 out (vs fp32 out)", time_ms([&] { ASSERT_TRUE(run(f32_out)); }),
            time_ms([&] { ASSERT_TRUE(run(f16_out)); }), flops, 2.0 * N * C + 2.0 * N * 4 * C * 2);
  EpilogueGemmOf<BFloat16> dg;  // dh = (g W2^T) gelu'(h): (N, C) x (C, 4C) with W2 (4C, C) read transposed
  dg.gemm = row_major<BFloat16>(false, N, 4 * C, C, bf16(x), bf16(w), nullptr);
  dg.gemm.trans_b = true;
  dg.gemm.ldb = C;
  dg.gemm.c_bf16 = bf16(out16);
  dg.epilogue = GemmEpilogue::dgelu;
  dg.aux = aux16.raw_data();
  GemmBf16 plain = dg.gemm;
  plain.c_bf16 = nullptr;
  plain.c = f32(out);
  const double apart = time_ms([&] {
    gpu().gemm_bf16(plain);
    gpu().gelu_backward_bf16(bf16(aux16), f32(out), bf16(out16), N * 4 * C);
  });
  print_row("mlp.c_proj dx + DGELU (vs apart)", apart, time_ms([&] { ASSERT_TRUE(run(dg)); }), flops,
            2.0 * N * C + 2.0 * N * 4 * C * 2);
}
