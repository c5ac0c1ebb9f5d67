// The CUDA LayerNorm kernels (cuda_layernorm.cu) against the CPU backend: forward in fp32 and
// with y rounded to bf16, backward (dx, dw, db; dx also added into what it holds), over widths
// from 1 to 100003, aligned and misaligned pointers, with NaN guards around every buffer; and the
// backward's bit-for-bit determinism. Without a GPU the tests skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

constexpr int64_t kGuard = 8;  // NaN elements after each buffer (and `offset` before it)

// `values` on the GPU, `offset` elements into a buffer otherwise NaN (reading the NaN around them
// would spoil the result).
Tensor placed(const Tensor& values, int64_t offset) {
  std::vector<float> v(static_cast<size_t>(offset + values.numel() + kGuard), std::nanf(""));
  const std::vector<float> in = values.to_vector<float>();
  std::copy(in.begin(), in.end(), v.begin() + offset);
  return Tensor::from_vector({static_cast<int64_t>(v.size())}, v).to(kGpu);
}
Tensor placed_poison(int64_t n, int64_t offset) { return poisoned({offset + n + kGuard}, kGpu); }

// The `shape` values at `offset` of a placed buffer, on the CPU; NaN everywhere if the guards
// around them were written.
Tensor taken(const Tensor& buffer, int64_t offset, const Shape& shape) {
  std::vector<float> v = buffer.to_vector<float>();
  const auto first = v.begin() + offset, last = first + shape.numel();
  const bool guarded = std::all_of(v.begin(), first, [](float e) { return std::isnan(e); }) &&
                       std::all_of(last, v.end(), [](float e) { return std::isnan(e); });
  std::vector<float> out(first, last);
  if (!guarded) std::fill(out.begin(), out.end(), std::nanf(""));
  return Tensor::from_vector(shape, out);
}

std::vector<uint16_t> host_bits(const Tensor& bf16_buffer) {
  const Tensor c = bf16_buffer.to(kCpu);
  std::vector<uint16_t> bits(static_cast<size_t>(c.numel()));
  std::memcpy(bits.data(), c.raw_data(), bits.size() * sizeof(uint16_t));
  return bits;
}

// bf16 bits against fp32 values rounded to bf16: equal, or one ulp apart on the same side of zero
// (the two kernels may round their sums apart). Outside [offset, offset + n) the bits must still
// be the poison (0xFFFF).
::testing::AssertionResult bf16_within_ulp(const std::vector<uint16_t>& bits, int64_t offset,
                                           const std::vector<float>& reference) {
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < bits.size(); ++i) {
    const int64_t k = static_cast<int64_t>(i) - offset;
    bool ok;
    if (k < 0 || k >= static_cast<int64_t>(reference.size())) {
      ok = bits[i] == 0xFFFF;
    } else {
      const int a = bits[i], r = bf16_bits(reference[size_t(k)]);
      ok = !std::isnan(reference[size_t(k)]) && (a == r || (((a ^ r) & 0x8000) == 0 && std::abs(a - r) == 1));
    }
    if (!ok && bad++ == 0) first = static_cast<int64_t>(i);
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << bits.size() << " bf16 values off; first at buffer index "
                                       << first << " (offset " << offset << ")";
}

// Where each group of pointers starts, in elements of its buffer: inputs x and dy; parameters w,
// b, dw, db; outputs y, mean, rstd, dx (and, for the bf16 forward, y_bf16).
struct Offsets {
  int64_t in, param, out, out_bf16;
  const char* name;
};

void check_layer_norm(int64_t rows, int64_t cols, Rng& rng) {
  const float eps = 1e-5f;
  const Tensor x = random_tensor({rows, cols}, rng, -2.0, 3.0), w = random_tensor({cols}, rng),
               b = random_tensor({cols}, rng), dy = random_tensor({rows, cols}, rng);
  const Tensor dw0 = random_tensor({cols}, rng), db0 = random_tensor({cols}, rng);  // dw, db accumulate
  Tensor y = Tensor::empty({rows, cols}), mean = Tensor::empty({rows}), rstd = Tensor::empty({rows});
  cpu().layer_norm_forward(f32(x), f32(w), f32(b), f32(y), f32(mean), f32(rstd), rows, cols, eps);
  Tensor dx = Tensor::empty({rows, cols}), dw = dw0.clone(), db = db0.clone();
  cpu().layer_norm_backward(f32(x), f32(w), f32(mean), f32(rstd), f32(dy), f32(dx), f32(dw), f32(db), rows, cols,
                            false);
  // dx = rstd (dy w - mean(dy w) - xhat mean(dy w xhat)) cancels to 0 at cols = 1 (to rounding
  // residue, which may differ between the backends): its error is relative to the larger of
  // ||dx|| and ||rstd dy w||, the size of its terms.
  double terms = 0.0;
  {
    const std::vector<float> g = dy.to_vector<float>(), wv = w.to_vector<float>(), rv = rstd.to_vector<float>();
    for (size_t i = 0; i < g.size(); ++i) {
      const double t = double(rv[i / size_t(cols)]) * g[i] * wv[i % size_t(cols)];
      terms += t * t;
    }
  }
  const std::vector<float> dx_ref = dx.to_vector<float>();
  auto dx_error = [&](const Tensor& actual) {
    const std::vector<float> a = actual.to_vector<float>();
    double diff = 0.0, ref = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff += (double(a[i]) - dx_ref[i]) * (double(a[i]) - dx_ref[i]);
      ref += double(dx_ref[i]) * dx_ref[i];
    }
    return std::sqrt(diff / std::max({ref, terms, 1e-300}));  // NaN stays NaN
  };
  // bf16 y 4 elements in: 8-byte aligned, not 16 (its float4 path needs only 8).
  for (const Offsets& o : {Offsets{0, 0, 0, 4, "aligned"}, Offsets{1, 1, 1, 1, "all + 1"},
                           Offsets{1, 0, 0, 0, "x, dy + 1"}, Offsets{0, 1, 0, 0, "w, b + 1"},
                           Offsets{0, 0, 1, 1, "outputs + 1"}}) {
    const std::string what = std::to_string(rows) + " x " + std::to_string(cols) + ", " + o.name;
    const int64_t n = rows * cols;
    const Tensor xg = placed(x, o.in), dyg = placed(dy, o.in), wg = placed(w, o.param), bg = placed(b, o.param);
    Tensor yg = placed_poison(n, o.out), mean_g = placed_poison(rows, o.out), rstd_g = placed_poison(rows, o.out);
    gpu().layer_norm_forward(f32(xg) + o.in, f32(wg) + o.param, f32(bg) + o.param, f32(yg) + o.out,
                             f32(mean_g) + o.out, f32(rstd_g) + o.out, rows, cols, eps);
    const Tensor y_gpu = taken(yg, o.out, {rows, cols}), mean_gpu = taken(mean_g, o.out, {rows}),
                 rstd_gpu = taken(rstd_g, o.out, {rows});
    EXPECT_TRUE(within(relative_error(y_gpu, y), 1e-5)) << "y " << what;
    EXPECT_TRUE(within(relative_error(mean_gpu, mean), 1e-5)) << "mean " << what;
    EXPECT_TRUE(within(relative_error(rstd_gpu, rstd), 1e-5)) << "rstd " << what;

    // bf16 y: the fp32 kernel's y rounded; mean and rstd bit for bit the fp32 kernel's.
    Tensor yh = poisoned_bf16({o.out_bf16 + n + kGuard}, kGpu);
    Tensor mean_h = placed_poison(rows, o.out), rstd_h = placed_poison(rows, o.out);
    gpu().layer_norm_forward_bf16(f32(xg) + o.in, f32(wg) + o.param, f32(bg) + o.param, bf16(yh) + o.out_bf16,
                                  f32(mean_h) + o.out, f32(rstd_h) + o.out, rows, cols, eps);
    EXPECT_TRUE(bf16_within_ulp(host_bits(yh), o.out_bf16, y_gpu.to_vector<float>())) << "y bf16 " << what;
    EXPECT_TRUE(all_close(taken(mean_h, o.out, {rows}), mean_gpu, 0.0, 0.0)) << "mean (bf16 y) " << what;
    EXPECT_TRUE(all_close(taken(rstd_h, o.out, {rows}), rstd_gpu, 0.0, 0.0)) << "rstd (bf16 y) " << what;

    // Backward from the CPU's mean and rstd, so that only the backward is compared.
    const Tensor mg = placed(mean, o.param), rg = placed(rstd, o.param);
    Tensor dxg = placed_poison(n, o.out), dwg = placed(dw0, o.param), dbg = placed(db0, o.param);
    gpu().layer_norm_backward(f32(xg) + o.in, f32(wg) + o.param, f32(mg) + o.param, f32(rg) + o.param,
                              f32(dyg) + o.in, f32(dxg) + o.out, f32(dwg) + o.param, f32(dbg) + o.param, rows, cols,
                              false);
    EXPECT_TRUE(within(dx_error(taken(dxg, o.out, {rows, cols})), 1e-5)) << "dx " << what;
    EXPECT_TRUE(within(relative_error(taken(dwg, o.param, {cols}), dw), 1e-5)) << "dw " << what;
    EXPECT_TRUE(within(relative_error(taken(dbg, o.param, {cols}), db), 1e-5)) << "db " << what;
  }
}

}  // namespace

TEST(CudaBackend, LayerNormForwardBackward) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(13);
  for (int64_t cols : {1, 3, 4, 37, 64, 768, 1000, 3072, 8200})
    for (int64_t rows : {1, 7}) check_layer_norm(rows, cols, rng);
  // The GPT's shape; rows looping over a fixed grid (one-warp rows and wider ones); the widths
  // around the backward's (4096) and the forward's (16384) limits of the registers.
  const int64_t more[][2] = {{16384, 768}, {2000, 1000}, {1000, 3072}, {4097, 3},
                             {300, 4096}, {300, 4100}, {3, 16384}, {3, 20000}, {3, 100003}};
  for (const auto& c : more) check_layer_norm(c[0], c[1], rng);
}

// The same inputs give the same bits: dw and db are summed in a fixed order.
TEST(CudaBackend, LayerNormBackwardIsDeterministic) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(31);
  for (const int64_t cols : {int64_t{768}, int64_t{8200}}) {
    const int64_t rows = 4099;
    const Tensor x = random_tensor({rows, cols}, rng).to(kGpu), dy = random_tensor({rows, cols}, rng).to(kGpu),
                 w = random_tensor({cols}, rng).to(kGpu), b = random_tensor({cols}, rng).to(kGpu);
    Tensor y = Tensor::empty({rows, cols}, DType::f32, kGpu), dx = Tensor::empty({rows, cols}, DType::f32, kGpu);
    Tensor mean = Tensor::empty({rows}, DType::f32, kGpu), rstd = Tensor::empty({rows}, DType::f32, kGpu);
    gpu().layer_norm_forward(f32(x), f32(w), f32(b), f32(y), f32(mean), f32(rstd), rows, cols, 1e-5f);
    std::vector<float> first;
    for (int run = 0; run < 3; ++run) {
      Tensor dw = Tensor::zeros({cols}, DType::f32, kGpu), db = Tensor::zeros({cols}, DType::f32, kGpu);
      gpu().layer_norm_backward(f32(x), f32(w), f32(mean), f32(rstd), f32(dy), f32(dx), f32(dw), f32(db), rows, cols,
                                false);
      std::vector<float> got = dw.to_vector<float>();
      const std::vector<float> dbv = db.to_vector<float>();
      got.insert(got.end(), dbv.begin(), dbv.end());
      if (run == 0) {
        first = got;
      } else {
        EXPECT_EQ(std::memcmp(got.data(), first.data(), got.size() * sizeof(float)), 0) << "cols " << cols;
      }
    }
  }
}

// accumulate_dx: dx added to what the buffer holds (the residual stream's pending gradient), on the
// float4 path (768), the scalar one (37) and the wide rows' (8200), against the plain dx plus it.
TEST(CudaBackend, LayerNormBackwardAddsIntoDx) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(32);
  for (const int64_t cols : {int64_t{768}, int64_t{37}, int64_t{8200}}) {
    const int64_t rows = 257;
    const Tensor x = random_tensor({rows, cols}, rng).to(kGpu), dy = random_tensor({rows, cols}, rng).to(kGpu),
                 w = random_tensor({cols}, rng).to(kGpu), b = random_tensor({cols}, rng).to(kGpu);
    const Tensor before = random_tensor({rows, cols}, rng);
    Tensor y = Tensor::empty({rows, cols}, DType::f32, kGpu), mean = Tensor::empty({rows}, DType::f32, kGpu);
    Tensor rstd = Tensor::empty({rows}, DType::f32, kGpu);
    gpu().layer_norm_forward(f32(x), f32(w), f32(b), f32(y), f32(mean), f32(rstd), rows, cols, 1e-5f);
    Tensor plain = poisoned({rows, cols}), added = before.to(kGpu);
    for (Tensor* dx : {&plain, &added}) {
      Tensor dw = Tensor::zeros({cols}, DType::f32, kGpu), db = Tensor::zeros({cols}, DType::f32, kGpu);
      gpu().layer_norm_backward(f32(x), f32(w), f32(mean), f32(rstd), f32(dy), f32(*dx), f32(dw), f32(db), rows, cols,
                                dx == &added);
    }
    const std::vector<float> p = plain.to_vector<float>(), a = added.to_vector<float>(), o = before.to_vector<float>();
    double worst = 0.0;
    for (size_t i = 0; i < p.size(); ++i) {  // a NaN (an element not written) stays the worst
      const double diff = std::abs(double(a[i]) - (double(p[i]) + o[i]));
      if (!(diff <= worst)) worst = diff;
    }
    EXPECT_LE(worst, 1e-5) << "cols " << cols;  // |values| ~1: one rounding apart at most
  }
}

// layer_norm_backward_bf16: dx, dw and db bit for bit layer_norm_backward's (added into dx too),
// dx as written rounded (bit for bit to_bf16's) and summed down the columns (fp32 against double),
// on the float4 path (768, 2048: 1 and 2 warps a row), the scalar one (37) and the wide rows' (8200:
// the backend's separate pass).
TEST(CudaBackend, LayerNormBackwardRoundsAndSumsDx) {
  if (!tutti::device_available(tutti::Device::cuda(0))) GTEST_SKIP() << "no CUDA device";
  Rng rng(33);
  for (const int64_t cols : {int64_t{768}, int64_t{2048}, int64_t{37}, int64_t{8200}})
    for (const bool add : {false, true}) {
      const std::string what = "cols " + std::to_string(cols) + (add ? ", added into dx" : "");
      const int64_t rows = 1031;
      const Tensor x = random_tensor({rows, cols}, rng).to(kGpu), dy = random_tensor({rows, cols}, rng).to(kGpu),
                   w = random_tensor({cols}, rng).to(kGpu), b = random_tensor({cols}, rng).to(kGpu);
      const Tensor before = random_tensor({rows, cols}, rng).to(kGpu);
      Tensor y = Tensor::empty({rows, cols}, DType::f32, kGpu), mean = Tensor::empty({rows}, DType::f32, kGpu);
      Tensor rstd = Tensor::empty({rows}, DType::f32, kGpu);
      gpu().layer_norm_forward(f32(x), f32(w), f32(b), f32(y), f32(mean), f32(rstd), rows, cols, 1e-5f);
      std::vector<std::vector<float>> outs;  // dx, dw, db of each call
      Tensor dx_bf16 = ops::to_bf16(poisoned({rows, cols})), sums = poisoned({cols}), dx;
      for (const bool round : {false, true}) {
        dx = add ? before.clone() : poisoned({rows, cols});
        Tensor dw = Tensor::zeros({cols}, DType::f32, kGpu), db = Tensor::zeros({cols}, DType::f32, kGpu);
        if (round)
          gpu().layer_norm_backward_bf16(f32(x), f32(w), f32(mean), f32(rstd), f32(dy), f32(dx), f32(dw), f32(db),
                                         bf16(dx_bf16), f32(sums), rows, cols, add);
        else
          gpu().layer_norm_backward(f32(x), f32(w), f32(mean), f32(rstd), f32(dy), f32(dx), f32(dw), f32(db), rows,
                                    cols, add);
        for (const Tensor* t : {&dx, &dw, &db}) outs.push_back(t->to_vector<float>());
      }
      for (int k = 0; k < 3; ++k)
        EXPECT_EQ(std::memcmp(outs[k].data(), outs[k + 3].data(), outs[k].size() * sizeof(float)), 0)
            << what << ": " << (k == 0 ? "dx" : k == 1 ? "dw" : "db");
      Tensor expected = ops::to_bf16(poisoned({rows, cols}));
      gpu().to_bf16(f32(dx), bf16(expected), rows * cols);
      EXPECT_EQ(host_bits(dx_bf16), host_bits(expected)) << what << ": dx_bf16";
      EXPECT_TRUE(within(column_sums_error(sums, outs[3], rows, cols), 1e-5)) << what << ": sums";
    }
}
