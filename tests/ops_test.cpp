// The op conformance suite: every op in ops.hpp, forward against a float64 reference written
// here and backward against central finite differences of that reference, on random shapes
// including 1, odd sizes and 0; then the AVX2 exp/tanh paths, bad input, and thread counts.
// Letters: B batch, T time, C channels, H heads, D head size, V vocabulary, N rows,
// M/K/N matrix sizes (M x K times K x N).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "test_util.hpp"
#include "tutti/core/threads.hpp"

using namespace tutti;
using namespace tutti::test;

namespace {

// ------------------------------------------------------------------------------------------
// float64 references

Vec matmul_ref(const Vec& a, const Shape& sa, const Vec& b, const Shape& sb, bool ta, bool tb) {
  const int64_t ar = sa[-2], ac = sa[-1], br = sb[-2], bc = sb[-1];
  const int64_t M = ta ? ac : ar, K = ta ? ar : ac, N = tb ? br : bc;
  const int64_t batch = sa.ndim() == 3 ? sa[0] : sb.ndim() == 3 ? sb[0] : 1;
  const int64_t a_step = sa.ndim() == 3 ? ar * ac : 0, b_step = sb.ndim() == 3 ? br * bc : 0;
  Vec c(static_cast<size_t>(batch * M * N), 0.0);
  for (int64_t p = 0; p < batch; ++p)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k)
          s += a[p * a_step + (ta ? k * ac + i : i * ac + k)] * b[p * b_step + (tb ? j * bc + k : k * bc + j)];
        c[(p * M + i) * N + j] = s;
      }
  return c;
}

// x (n, in) W (in, out) + b (out); b empty for no bias.
Vec linear_ref(const Vec& x, const Vec& w, const Vec& b, int64_t n, int64_t in, int64_t out) {
  Vec y(static_cast<size_t>(n * out));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < in; ++i) s += x[r * in + i] * w[i * out + o];
      y[r * out + o] = s;
    }
  return y;
}

double gelu_ref(double x) { return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))); }

Vec layer_norm_ref(const Vec& x, const Vec& w, const Vec& b, int64_t C, double eps) {
  Vec y(x.size());
  for (size_t r = 0; C && r < x.size() / C; ++r) {
    const double* xr = &x[r * C];
    double m = 0.0, v = 0.0;
    for (int64_t c = 0; c < C; ++c) m += xr[c] / C;
    for (int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m) / C;
    for (int64_t c = 0; c < C; ++c) y[r * C + c] = (xr[c] - m) / std::sqrt(v + eps) * w[c] + b[c];
  }
  return y;
}

// qkv (B, T, 3C) -> y (B, T, C), causal softmax(q k^T / sqrt(D)) v per head.
Vec attention_ref(const Vec& qkv, int64_t B, int64_t T, int64_t C, int64_t H) {
  const int64_t D = C / H;
  Vec y(static_cast<size_t>(B * T * C), 0.0), p(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const double* q = qkv.data() + (b * T + i) * 3 * C + h * D;
        double mx = -std::numeric_limits<double>::infinity(), total = 0.0;
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = qkv.data() + (b * T + j) * 3 * C + C + h * D;
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
          p[j] = s / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, p[j]);
        }
        for (int64_t j = 0; j <= i; ++j) total += (p[j] = std::exp(p[j] - mx));
        for (int64_t j = 0; j <= i; ++j) {
          const double* v = qkv.data() + (b * T + j) * 3 * C + 2 * C + h * D;
          for (int64_t d = 0; d < D; ++d) y[(b * T + i) * C + h * D + d] += p[j] / total * v[d];
        }
      }
  return y;
}

Vec embedding_ref(const Vec& idx, const Vec& table, int64_t C) {
  Vec out;
  for (double i : idx)
    for (int64_t c = 0; c < C; ++c) out.push_back(table[static_cast<size_t>(i) * C + c]);
  return out;
}

double log_sum_exp(const double* x, int64_t n) {
  double mx = -std::numeric_limits<double>::infinity(), s = 0.0;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - mx);
  return mx + std::log(s);
}

double cross_entropy_ref(const Vec& logits, const Vec& targets, int64_t V) {
  const int64_t N = static_cast<int64_t>(targets.size());
  double loss = 0.0;
  for (int64_t r = 0; r < N; ++r) loss += log_sum_exp(&logits[r * V], V) - logits[r * V + int64_t(targets[r])];
  return loss / N;
}

Vec softmax_ref(const Vec& x, int64_t cols) {
  Vec y(x.size());
  for (size_t r = 0; cols && r < x.size() / cols; ++r) {
    const double lse = log_sum_exp(&x[r * cols], cols);
    for (int64_t j = 0; j < cols; ++j) y[r * cols + j] = std::exp(x[r * cols + j] - lse);
  }
  return y;
}

Vec map(const Vec& x, double (*f)(double)) {
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = f(x[i]);
  return y;
}

std::string shape_label(const char* op, std::initializer_list<int64_t> dims) {
  std::string s = op;
  for (int64_t d : dims) s += " " + std::to_string(d);
  return s;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// matmul

struct MatCase {
  int64_t batch_a, batch_b, M, K, N;  // batch 0: a 2-D operand
};

void check_matmul(Rng& rng, const MatCase& mc, bool ta, bool tb) {
  auto shape = [](int64_t batch, int64_t r, int64_t c) { return batch ? Shape{batch, r, c} : Shape{r, c}; };
  const Shape sa = ta ? shape(mc.batch_a, mc.K, mc.M) : shape(mc.batch_a, mc.M, mc.K);
  const Shape sb = tb ? shape(mc.batch_b, mc.N, mc.K) : shape(mc.batch_b, mc.K, mc.N);
  check_op(
      "matmul a" + sa.str() + (ta ? "^T" : "") + " b" + sb.str() + (tb ? "^T" : ""),
      {rand_tensor(rng, sa), rand_tensor(rng, sb)}, {true, true},
      [=](const std::vector<Tensor>& in) { return ops::matmul(in[0], in[1], ta, tb); },
      [=](const std::vector<Vec>& x) { return matmul_ref(x[0], sa, x[1], sb, ta, tb); }, rng);
}

TEST(OpsMatmul, TwoDimensionalAllTransposes) {
  Rng rng(1);
  for (const MatCase& mc : {MatCase{0, 0, 1, 1, 1}, {0, 0, 3, 5, 7}, {0, 0, 17, 1, 9}, {0, 0, 1, 13, 1},
                            {0, 0, 33, 65, 17}, {0, 0, 8, 16, 24}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) check_matmul(rng, mc, ta, tb);
}

TEST(OpsMatmul, BatchedAllTransposes) {
  Rng rng(2);
  for (const MatCase& mc : {MatCase{1, 1, 2, 3, 4}, {3, 3, 5, 7, 1}, {2, 2, 1, 9, 6}, {4, 4, 9, 11, 13}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) check_matmul(rng, mc, ta, tb);
}

TEST(OpsMatmul, BroadcastsTwoDimensionalOperand) {
  Rng rng(3);
  for (const MatCase& mc : {MatCase{3, 0, 4, 5, 6}, {2, 0, 1, 7, 3}, {0, 3, 4, 5, 6}, {0, 2, 5, 1, 3}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) check_matmul(rng, mc, ta, tb);
}

TEST(OpsMatmul, EmptyDimensions) {
  Rng rng(4);
  // K = 0 gives zeros; M, N or batch = 0 give empty outputs.
  for (const MatCase& mc : {MatCase{0, 0, 0, 3, 4}, {0, 0, 3, 4, 0}, {0, 0, 3, 0, 4}, {2, 2, 3, 0, 4},
                            {0, 0, 0, 0, 0}, {0, 2, 3, 0, 2}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) check_matmul(rng, mc, ta, tb);
}

TEST(OpsMatmul, NonContiguousInputs) {
  Rng rng(5);
  const Tensor a = rand_tensor(rng, {6, 4}).transpose(0, 1);   // (4, 6) view
  const Tensor b = rand_tensor(rng, {6, 9}).slice(1, 2, 7);    // (6, 5) view
  check_op("matmul of views", {a, b}, {true, true},
           [](const std::vector<Tensor>& in) { return ops::matmul(in[0], in[1]); },
           [](const std::vector<Vec>& x) { return matmul_ref(x[0], {4, 6}, x[1], {6, 5}, false, false); }, rng);
}

// ------------------------------------------------------------------------------------------
// linear

TEST(OpsLinear, WithAndWithoutBias) {
  Rng rng(10);
  const std::vector<std::vector<int64_t>> x_shapes = {{1, 1}, {5, 3}, {7}, {2, 3, 9}, {2, 5, 1}, {0, 4}, {2, 0, 6}};
  for (const auto& xs : x_shapes) {
    const Shape x_shape(xs);
    const int64_t in = xs.back(), n = x_shape.numel() / in;
    for (int64_t out : {1, 7, 16}) {
      for (bool bias : {false, true}) {
        std::vector<Tensor> inputs{rand_tensor(rng, x_shape), rand_tensor(rng, {in, out})};
        if (bias) inputs.push_back(rand_tensor(rng, {out}));
        check_op(
            "linear x" + x_shape.str() + " out " + std::to_string(out) + (bias ? " bias" : ""), inputs,
            std::vector<bool>(inputs.size(), true),
            [](const std::vector<Tensor>& t) { return ops::linear(t[0], t[1], t.size() > 2 ? t[2] : Tensor()); },
            [=](const std::vector<Vec>& x) { return linear_ref(x[0], x[1], bias ? x[2] : Vec{}, n, in, out); }, rng);
      }
    }
  }
}

// y = residual + x W (+ b): the residual's gradient is y's; the GPT's branch ends.
TEST(OpsLinear, WithResidual) {
  Rng rng(12);
  for (const auto& xs : std::vector<std::vector<int64_t>>{{5, 3}, {2, 3, 9}, {0, 4}}) {
    const Shape x_shape(xs);
    const int64_t in = xs.back(), n = x_shape.numel() / in, out = 7;
    Shape y_shape = x_shape;
    y_shape[-1] = out;
    for (bool bias : {false, true}) {
      std::vector<Tensor> inputs{rand_tensor(rng, x_shape), rand_tensor(rng, {in, out}), rand_tensor(rng, y_shape)};
      if (bias) inputs.push_back(rand_tensor(rng, {out}));
      check_op(
          "linear + residual x" + x_shape.str() + (bias ? " bias" : ""), inputs, std::vector<bool>(inputs.size(), true),
          [bias](const std::vector<Tensor>& t) {
            return ops::linear(t[0], t[1], bias ? t[3] : Tensor(), Tensor(), DType::f32, t[2]);
          },
          [=](const std::vector<Vec>& x) {
            Vec y = linear_ref(x[0], x[1], bias ? x[3] : Vec{}, n, in, out);
            for (size_t i = 0; i < y.size(); ++i) y[i] += x[2][i];
            return y;
          },
          rng);
    }
  }
  const Tensor x = rand_tensor(rng, {4, 3}), w = rand_tensor(rng, {3, 5});
  EXPECT_THROW(ops::linear(x, w, Tensor(), Tensor(), DType::f32, rand_tensor(rng, {4, 4})), InvalidArgument);
  EXPECT_THROW(ops::mlp(x, w, rand_tensor(rng, {5}), rand_tensor(rng, {5, 3}), Tensor(), Tensor(), Tensor(),
                        rand_tensor(rng, {4, 5})),
               InvalidArgument);
}

TEST(OpsLinear, ZeroFeatures) {
  Rng rng(11);
  for (auto [in, out] : {std::pair<int64_t, int64_t>{0, 5}, {4, 0}}) {
    check_op(
        shape_label("linear in/out", {in, out}),
        {rand_tensor(rng, {3, in}), rand_tensor(rng, {in, out}), rand_tensor(rng, {out})}, {true, true, true},
        [](const std::vector<Tensor>& t) { return ops::linear(t[0], t[1], t[2]); },
        [=](const std::vector<Vec>& x) { return linear_ref(x[0], x[1], x[2], 3, in, out); },
        rng);
  }
}

// ------------------------------------------------------------------------------------------
// add, scale

TEST(OpsAdd, SameShapeAndBroadcast) {
  Rng rng(20);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{1}, {1}},       {{7}, {7}},       {{3, 5}, {3, 5}},     {{2, 3, 9}, {9}},  {{2, 3, 9}, {3, 9}},
      {{4, 1}, {1}},    {{5, 3}, {}},     {{1, 6}, {6}},        {{0, 4}, {4}},     {{3, 0}, {0}},
      {{2, 3, 17}, {2, 3, 17}}, {{0}, {0}}, {{}, {}}};
  for (const auto& [sa, sb] : cases) {
    const int64_t inner = sb.numel();
    check_op(
        "add " + sa.str() + " + " + sb.str(), {rand_tensor(rng, sa), rand_tensor(rng, sb)}, {true, true},
        [](const std::vector<Tensor>& t) { return ops::add(t[0], t[1]); },
        [=](const std::vector<Vec>& x) {
          Vec y(x[0].size());
          for (size_t i = 0; i < y.size(); ++i) y[i] = x[0][i] + x[1][i % inner];
          return y;
        },
        rng);
  }
}

TEST(OpsScale, Factors) {
  Rng rng(21);
  for (const Shape& s : {Shape{}, Shape{1}, Shape{13}, Shape{3, 0}, Shape{4, 5, 6}})
    for (float f : {0.0f, 1.0f, -2.5f, 0.125f}) {
      check_op(
          "scale " + s.str() + " by " + std::to_string(f), {rand_tensor(rng, s)}, {true},
          [f](const std::vector<Tensor>& t) { return ops::scale(t[0], f); },
          [f](const std::vector<Vec>& x) {
            Vec y = x[0];
            for (double& v : y) v *= f;
            return y;
          },
          rng);
    }
}

TEST(OpsAdd, NonContiguousInputsAndLinearOfAView) {
  Rng rng(22);
  const Tensor a = rand_tensor(rng, {2, 5, 4}).transpose(1, 2), b = rand_tensor(rng, {5, 4}).transpose(0, 1);
  check_op(
      "add of views (2, 4, 5) + (4, 5)", {a, b}, {true, true},
      [](const std::vector<Tensor>& t) { return ops::add(t[0], t[1]); },
      [](const std::vector<Vec>& x) {
        Vec y = x[0];
        for (size_t i = 0; i < y.size(); ++i) y[i] += x[1][i % 20];
        return y;
      },
      rng);
  check_op(
      "linear of a view", {rand_tensor(rng, {6, 3}).transpose(0, 1), rand_tensor(rng, {6, 2}), rand_tensor(rng, {2})},
      {true, true, true}, [](const std::vector<Tensor>& t) { return ops::linear(t[0], t[1], t[2]); },
      [](const std::vector<Vec>& x) { return linear_ref(x[0], x[1], x[2], 3, 6, 2); }, rng);
}

// ------------------------------------------------------------------------------------------
// gelu, relu

TEST(OpsActivation, GeluAndRelu) {
  Rng rng(30);
  for (const Shape& s : {Shape{1}, Shape{7}, Shape{8}, Shape{9}, Shape{3, 17}, Shape{0}, Shape{2, 3, 33}}) {
    check_op(
        "gelu " + s.str(), {rand_tensor(rng, s, -4, 4)}, {true},
        [](const std::vector<Tensor>& t) { return ops::gelu(t[0]); },
        [](const std::vector<Vec>& x) { return map(x[0], gelu_ref); }, rng);
    check_op(
        "relu " + s.str(), {rand_tensor(rng, s, -4, 4)}, {true},
        [](const std::vector<Tensor>& t) { return ops::relu(t[0]); },
        [](const std::vector<Vec>& x) { return map(x[0], [](double v) { return v > 0 ? v : 0.0; }); }, rng);
  }
}

// The AVX2 tanh (via exp8) on large |x| and on every tail length n % 8: outputs are finite, and
// gelu and its derivative match float64 to f32 accuracy (absolute near the flat negative side).
TEST(OpsActivation, GeluLargeInputsAndVectorTail) {
  Rng rng(31);
  for (int64_t n : {1, 5, 8, 15, 16, 23, 64 + 7, 4096 + 3, 16384 + 9}) {  // the last one runs on all threads
    Tensor x = rand_tensor(rng, {n}, -20, 20);
    Tolerance tol;
    tol.fwd_atol = 1e-6;   // relative to max |y| ~ 20
    tol.grad_atol = 1e-5;  // relative to max |dy/dx| ~ 1.1
    tol.max_fd_coords = 200;
    check_op(
        shape_label("gelu large n", {n}), {x}, {true}, [](const std::vector<Tensor>& t) { return ops::gelu(t[0]); },
        [](const std::vector<Vec>& v) { return map(v[0], gelu_ref); }, rng, tol);
  }
  // Exact landmarks, in both the vector body (first 8) and the scalar tail.
  const std::vector<float> xs = {0.0f, 1e-4f, -1e-4f, 3.0f, -3.0f, 10.0f, -10.0f, 20.0f,
                                 -20.0f, 60.0f, -60.0f, 1e4f, -1e4f, 1e19f, -1e19f, 0.5f};
  for (int64_t n : {8, 16}) {
    const std::vector<float> v(xs.begin(), xs.begin() + n);
    const Tensor y = ops::gelu(Tensor::from_vector({n}, v));
    const Vec expected = map(Vec(v.begin(), v.end()), [](double t) { return std::abs(t) > 30 ? std::max(t, 0.0) : gelu_ref(t); });
    EXPECT_TRUE(all_close(y, expected, 1e-6, 1e-6)) << "gelu landmarks, n=" << n;
  }
}

// ------------------------------------------------------------------------------------------
// layer_norm

TEST(OpsLayerNorm, Shapes) {
  Rng rng(40);
  for (const Shape& s : {Shape{3, 7}, Shape{2, 3, 33}, Shape{9}, Shape{0, 5}, Shape{4, 64}, Shape{1, 3}}) {
    const int64_t C = s[-1];
    for (float eps : {1e-5f, 1e-1f}) {
      check_op(
          "layer_norm " + s.str() + " eps " + std::to_string(eps),
          {rand_tensor(rng, s, -2, 3), rand_tensor(rng, {C}, 0.5, 1.5), rand_tensor(rng, {C})}, {true, true, true},
          [eps](const std::vector<Tensor>& t) { return ops::layer_norm(t[0], t[1], t[2], eps); },
          [=](const std::vector<Vec>& x) { return layer_norm_ref(x[0], x[1], x[2], C, eps); }, rng);
    }
  }
}

// C = 1 and 2 are ill-conditioned in f32: dx is a difference of O(rstd |dy w|) terms that cancel
// (to exactly 0 for C = 1), so it is compared with an absolute floor of that size.
TEST(OpsLayerNorm, OneAndTwoChannels) {
  Rng rng(42);
  for (const Shape& s : {Shape{1, 1}, Shape{4, 1}, Shape{1, 2}, Shape{5, 2}}) {
    const int64_t C = s[-1];
    const float eps = 0.1f;
    Tolerance tol;
    tol.grad_abs = 1e-6;
    check_op(
        "layer_norm " + s.str(), {rand_tensor(rng, s, -2, 3), rand_tensor(rng, {C}, 0.5, 1.5), rand_tensor(rng, {C})},
        {true, true, true}, [eps](const std::vector<Tensor>& t) { return ops::layer_norm(t[0], t[1], t[2], eps); },
        [=](const std::vector<Vec>& x) { return layer_norm_ref(x[0], x[1], x[2], C, eps); }, rng, tol);
  }
}

TEST(OpsLayerNorm, NonContiguousInput) {
  Rng rng(41);
  const Tensor x = rand_tensor(rng, {6, 5}).transpose(0, 1);  // (5, 6) view
  check_op(
      "layer_norm of a view", {x, rand_tensor(rng, {6}), rand_tensor(rng, {6})}, {true, true, true},
      [](const std::vector<Tensor>& t) { return ops::layer_norm(t[0], t[1], t[2]); },
      [](const std::vector<Vec>& v) { return layer_norm_ref(v[0], v[1], v[2], 6, 1e-5); }, rng);
}

// ------------------------------------------------------------------------------------------
// causal_attention: the CPU kernel blocks rows by 64, so T around and past 64 matters.

TEST(OpsAttention, Shapes) {
  Rng rng(50);
  struct Case { int64_t B, T, C, H; };
  for (const Case& c : {Case{1, 1, 4, 2}, {2, 5, 6, 3}, {1, 70, 10, 2}, {2, 130, 3, 1}, {1, 64, 8, 2},
                        {1, 65, 4, 1}, {3, 7, 12, 4}, {2, 9, 5, 5}, {0, 3, 4, 2}, {2, 0, 4, 2}, {2, 4, 0, 2}}) {
    Tolerance tol;
    tol.max_fd_coords = 700;
    check_op(
        shape_label("causal_attention B T C H", {c.B, c.T, c.C, c.H}), {rand_tensor(rng, {c.B, c.T, 3 * c.C}, -2, 2)},
        {true}, [&](const std::vector<Tensor>& t) { return ops::causal_attention(t[0], static_cast<int>(c.H)); },
        [&](const std::vector<Vec>& x) { return attention_ref(x[0], c.B, c.T, c.C, c.H); }, rng, tol);
  }
}

// ------------------------------------------------------------------------------------------
// embedding

TEST(OpsEmbedding, RepeatedIndices) {
  Rng rng(60);
  struct Case { Shape idx; int32_t V; int64_t C; };
  for (const Case& c : {Case{{1}, 1, 1}, {{6}, 3, 5}, {{2, 7}, 4, 9}, {{0}, 5, 3}, {{3, 4}, 50, 16}, {{5}, 7, 0}, {{0}, 0, 3}}) {
    Tensor idx = rand_ints(rng, c.idx, c.V);
    if (idx.numel() > 1) idx.data<int32_t>()[1] = idx.data<int32_t>()[0];  // at least one repeat
    const int64_t C = c.C;
    check_op(
        "embedding idx" + c.idx.str() + " table (" + std::to_string(c.V) + ", " + std::to_string(C) + ")",
        {idx, rand_tensor(rng, {c.V, C})}, {false, true},
        [](const std::vector<Tensor>& t) { return ops::embedding(t[0], t[1]); },
        [C](const std::vector<Vec>& x) { return embedding_ref(x[0], x[1], C); }, rng);
  }
}

// ------------------------------------------------------------------------------------------
// cross_entropy, softmax

TEST(OpsCrossEntropy, Shapes) {
  Rng rng(70);
  for (auto [N, V] : {std::pair<int64_t, int32_t>{1, 1}, {1, 2}, {5, 7}, {3, 17}, {4, 100}, {2, 8}}) {
    check_op(
        shape_label("cross_entropy N V", {N, V}), {rand_tensor(rng, {N, V}, -3, 3), rand_ints(rng, {N}, V)},
        {true, false}, [](const std::vector<Tensor>& t) { return ops::cross_entropy(t[0], t[1]); },
        [V](const std::vector<Vec>& x) { return Vec{cross_entropy_ref(x[0], x[1], V)}; }, rng);
  }
}

// Logits of magnitude 1e3: exp never overflows (shifted by the row max), the loss and its
// gradient stay finite and match float64.
TEST(OpsCrossEntropy, LargeLogits) {
  Rng rng(71);
  for (auto [N, V] : {std::pair<int64_t, int32_t>{3, 5}, {4, 19}, {2, 64}}) {
    Tolerance tol;
    tol.fwd_rtol = 1e-4;  // the loss is a difference of values ~1e3
    tol.fd_step = 1e-3;
    check_op(
        shape_label("cross_entropy large N V", {N, V}), {rand_tensor(rng, {N, V}, -1e3, 1e3), rand_ints(rng, {N}, V)},
        {true, false}, [](const std::vector<Tensor>& t) { return ops::cross_entropy(t[0], t[1]); },
        [V](const std::vector<Vec>& x) { return Vec{cross_entropy_ref(x[0], x[1], V)}; }, rng, tol);
  }
  // Equal huge logits: loss log V exactly, uniform gradient.
  Tensor logits = Tensor::full({2, 11}, 1e3f);
  logits.set_requires_grad(true);
  Tensor loss = ops::cross_entropy(logits, Tensor::from_vector({2}, std::vector<int32_t>{0, 10}));
  EXPECT_NEAR(loss.item(), std::log(11.0), 1e-5);
  loss.backward();
  Vec expected(22, 1.0 / 11 / 2);
  expected[0] -= 0.5;
  expected[21] -= 0.5;
  EXPECT_TRUE(all_close(logits.grad(), expected, 1e-5, 1e-7));
}

TEST(OpsSoftmax, Shapes) {
  Rng rng(72);
  for (const Shape& s : {Shape{1}, Shape{3, 1}, Shape{2, 7}, Shape{4, 8}, Shape{3, 19}, Shape{2, 3, 65}, Shape{0, 4},
                         Shape{4, 0}, Shape{}}) {
    const int64_t cols = s.ndim() ? s[-1] : 1;
    for (double range : {3.0, 1e3}) {
      check_op(
          "softmax " + s.str() + " range " + std::to_string(range), {rand_tensor(rng, s, -range, range)}, {false},
          [](const std::vector<Tensor>& t) { return ops::softmax(t[0]); },
          [cols](const std::vector<Vec>& x) { return softmax_ref(x[0], cols); }, rng);
    }
  }
  const Tensor y = ops::softmax(Tensor::full({2, 13}, -1e3f));
  EXPECT_TRUE(all_close(y, Vec(26, 1.0 / 13), 1e-6, 0));
}

// ------------------------------------------------------------------------------------------
// sum, mean, reshape

TEST(OpsReduce, SumAndMean) {
  Rng rng(80);
  for (const Shape& s : {Shape{}, Shape{1}, Shape{17}, Shape{3, 5}, Shape{2, 3, 7}, Shape{0}, Shape{300, 70}}) {
    check_op(
        "sum " + s.str(), {rand_tensor(rng, s)}, {true}, [](const std::vector<Tensor>& t) { return ops::sum(t[0]); },
        [](const std::vector<Vec>& x) { return Vec{std::accumulate(x[0].begin(), x[0].end(), 0.0)}; }, rng);
    if (s.numel() == 0) continue;
    check_op(
        "mean " + s.str(), {rand_tensor(rng, s)}, {true}, [](const std::vector<Tensor>& t) { return ops::mean(t[0]); },
        [](const std::vector<Vec>& x) {
          return Vec{std::accumulate(x[0].begin(), x[0].end(), 0.0) / static_cast<double>(x[0].size())};
        },
        rng);
  }
}

TEST(OpsReshape, ShapesAndViews) {
  Rng rng(81);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{2, 3, 4}, {6, 4}}, {{2, 3, 4}, {-1}}, {{5}, {1, 5, 1}}, {{}, {1}}, {{0, 3}, {3, 0}}, {{4, 6}, {3, -1}}};
  for (const auto& [from, to] : cases) {
    check_op(
        "reshape " + from.str() + " to " + to.str(), {rand_tensor(rng, from)}, {true},
        [to](const std::vector<Tensor>& t) { return ops::reshape(t[0], to); },
        [](const std::vector<Vec>& x) { return x[0]; }, rng);
  }
  const Tensor x = rand_tensor(rng, {3, 4}).transpose(0, 1);  // (4, 3) view: reshape copies
  check_op(
      "reshape of a view", {x}, {true}, [](const std::vector<Tensor>& t) { return ops::reshape(t[0], {2, 6}); },
      [](const std::vector<Vec>& v) { return v[0]; }, rng);
  EXPECT_EQ(ops::reshape(rand_tensor(rng, {2, 6}), {3, -1, 2}).shape(), (Shape{3, 2, 2}));
}

// ------------------------------------------------------------------------------------------
// bad input: every op rejects bad shapes and dtypes with InvalidArgument

TEST(OpsBadInput, ShapesAndDtypes) {
  Rng rng(90);
  const Tensor m23 = rand_tensor(rng, {2, 3}), m34 = rand_tensor(rng, {3, 4}), m24 = rand_tensor(rng, {2, 4});
  const Tensor ints = rand_ints(rng, {2, 3}, 3), v3 = rand_tensor(rng, {3}), none;
  // matmul
  EXPECT_THROW(ops::matmul(m23, m24), InvalidArgument);                        // inner 3 vs 2
  EXPECT_THROW(ops::matmul(m23, m34, true, false), InvalidArgument);           // inner 2 vs 3
  EXPECT_THROW(ops::matmul(m23, m34, false, true), InvalidArgument);           // inner 3 vs 4
  EXPECT_THROW(ops::matmul(v3, m34), InvalidArgument);                         // 1-D
  EXPECT_THROW(ops::matmul(rand_tensor(rng, {1, 2, 2, 3}), m34), InvalidArgument);  // 4-D
  EXPECT_THROW(ops::matmul(rand_tensor(rng, {2, 2, 3}), rand_tensor(rng, {3, 3, 4})), InvalidArgument);  // batch
  EXPECT_THROW(ops::matmul(ints, m34), InvalidArgument);
  EXPECT_THROW(ops::matmul(none, m34), InvalidArgument);
  // linear
  EXPECT_THROW(ops::linear(m24, m34), InvalidArgument);                          // in 4 vs 3
  EXPECT_THROW(ops::linear(m23, v3), InvalidArgument);                           // 1-D weight
  EXPECT_THROW(ops::linear(m23, m34, rand_tensor(rng, {3})), InvalidArgument);   // bias size
  EXPECT_THROW(ops::linear(m23, m34, rand_tensor(rng, {1, 4})), InvalidArgument);
  EXPECT_THROW(ops::linear(m23, rand_tensor(rng, {4, 3}).transpose(0, 1)), InvalidArgument);  // strided weight
  EXPECT_THROW(ops::linear(ints, m34), InvalidArgument);
  EXPECT_THROW(ops::linear(m23, m34, rand_ints(rng, {4}, 2)), InvalidArgument);
  // add, scale, activations
  EXPECT_THROW(ops::add(m23, rand_tensor(rng, {2})), InvalidArgument);           // not a suffix
  EXPECT_THROW(ops::add(v3, m23), InvalidArgument);                              // b bigger than a
  EXPECT_THROW(ops::add(m23, ints), InvalidArgument);
  EXPECT_THROW(ops::scale(ints, 2.0f), InvalidArgument);
  EXPECT_THROW(ops::gelu(ints), InvalidArgument);
  EXPECT_THROW(ops::relu(ints), InvalidArgument);
  EXPECT_THROW(ops::gelu(none), InvalidArgument);
  // layer_norm
  EXPECT_THROW(ops::layer_norm(m23, rand_tensor(rng, {2}), v3), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(m23, v3, rand_tensor(rng, {1, 3})), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(m23, v3, none), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(Tensor::full({}, 1.0f), rand_tensor(rng, {1}), rand_tensor(rng, {1})), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(m23, v3, v3, 0.0f), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(ints, v3, v3), InvalidArgument);
  // causal_attention
  const Tensor qkv = rand_tensor(rng, {2, 5, 12});  // C = 4
  EXPECT_THROW(ops::causal_attention(qkv, 3), InvalidArgument);                  // 3 heads do not divide 4
  EXPECT_THROW(ops::causal_attention(qkv, 0), InvalidArgument);
  EXPECT_THROW(ops::causal_attention(qkv, -2), InvalidArgument);
  EXPECT_THROW(ops::causal_attention(rand_tensor(rng, {2, 5, 10}), 1), InvalidArgument);  // not 3C
  EXPECT_THROW(ops::causal_attention(rand_tensor(rng, {5, 12}), 2), InvalidArgument);     // 2-D
  EXPECT_THROW(ops::causal_attention(rand_ints(rng, {2, 5, 12}, 2), 2), InvalidArgument);
  // embedding
  const Tensor table = rand_tensor(rng, {5, 3});
  EXPECT_THROW(ops::embedding(Tensor::from_vector({3}, std::vector<int32_t>{0, 5, 1}), table), InvalidArgument);
  EXPECT_THROW(ops::embedding(Tensor::from_vector({2}, std::vector<int32_t>{-1, 0}), table), InvalidArgument);
  EXPECT_THROW(ops::embedding(v3, table), InvalidArgument);                      // f32 indices
  EXPECT_THROW(ops::embedding(rand_ints(rng, {2}, 3), v3), InvalidArgument);     // 1-D table
  EXPECT_THROW(ops::embedding(rand_ints(rng, {2}, 3), rand_ints(rng, {5, 3}, 3)), InvalidArgument);
  // cross_entropy
  const Tensor logits = rand_tensor(rng, {3, 4});
  EXPECT_THROW(ops::cross_entropy(logits, Tensor::from_vector({3}, std::vector<int32_t>{0, 4, 1})), InvalidArgument);
  EXPECT_THROW(ops::cross_entropy(logits, Tensor::from_vector({3}, std::vector<int32_t>{0, -1, 1})), InvalidArgument);
  EXPECT_THROW(ops::cross_entropy(logits, rand_ints(rng, {2}, 4)), InvalidArgument);   // count
  EXPECT_THROW(ops::cross_entropy(logits, v3), InvalidArgument);                       // f32 targets
  EXPECT_THROW(ops::cross_entropy(rand_tensor(rng, {1, 3, 4}), rand_ints(rng, {1}, 4)), InvalidArgument);
  EXPECT_THROW(ops::cross_entropy(rand_tensor(rng, {0, 4}), rand_ints(rng, {0}, 4)), InvalidArgument);
  EXPECT_THROW(ops::cross_entropy(rand_ints(rng, {3, 4}, 2), rand_ints(rng, {3}, 4)), InvalidArgument);
  // mixed precision's bf16 results: they need a bf16 weight copy, and the CPU has no bf16 kernels
  const Tensor v4 = rand_tensor(rng, {4}), half = Tensor::empty({3, 4}, DType::bf16, Device::cpu());
  EXPECT_THROW(ops::matmul(m23, m34, false, false, none, DType::bf16), InvalidArgument);  // no copy of b
  EXPECT_THROW(ops::linear(m23, m34, none, none, DType::bf16), InvalidArgument);
  EXPECT_THROW(ops::linear_gelu(m23, m34, v4, none, DType::bf16), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(m23, v3, v3, 1e-5f, DType::i32), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(m23, v3, v3, 1e-5f, DType::bf16), InvalidArgument);  // not on the CPU
  EXPECT_THROW(ops::cross_entropy(half, rand_ints(rng, {3}, 4)), InvalidArgument);   // not on the CPU
  EXPECT_THROW(ops::linear(half, rand_tensor(rng, {4, 2})), InvalidArgument);       // bf16 x, fp32 product
  // mlp: the second layer's weight must take the first's outputs
  EXPECT_THROW(ops::mlp(m23, m34, v4, rand_tensor(rng, {5, 2}), none), InvalidArgument);
  EXPECT_THROW(ops::mlp(m23, m34, v4, rand_tensor(rng, {4, 2}), v3), InvalidArgument);  // bias 3 vs 2
  // attention with its projection: the projection takes C = 2 inputs, the residual its result
  const Tensor qkv6 = rand_tensor(rng, {1, 3, 6});
  EXPECT_THROW(ops::attention(qkv6, 1, rand_tensor(rng, {3, 2}), none), InvalidArgument);
  EXPECT_THROW(ops::attention(qkv6, 3, rand_tensor(rng, {2, 2}), none), InvalidArgument);  // 3 heads of C = 2
  EXPECT_THROW(ops::attention(qkv6, 1, rand_tensor(rng, {2, 2}), none, none, rand_tensor(rng, {1, 3, 3})),
               InvalidArgument);
  EXPECT_THROW(ops::attention(rand_tensor(rng, {1, 3, 5}), 1, rand_tensor(rng, {2, 2}), none), InvalidArgument);
  // reductions, reshape, softmax
  EXPECT_THROW(ops::sum(ints), InvalidArgument);
  EXPECT_THROW(ops::mean(rand_tensor(rng, {0, 3})), InvalidArgument);
  EXPECT_THROW(ops::reshape(m23, {4, 2}), InvalidArgument);
  EXPECT_THROW(ops::reshape(m23, {-1, -1}), InvalidArgument);
  EXPECT_THROW(ops::softmax(ints), InvalidArgument);
}

TEST(OpsBadInput, MixedDevices) {
  if (!device_available(Device::cuda())) GTEST_SKIP() << "no CUDA device: mixed-device checks need one";
  Rng rng(91);
  const Tensor a = rand_tensor(rng, {2, 3}), b = rand_tensor(rng, {3, 4}).to(Device::cuda());
  EXPECT_THROW(ops::matmul(a, b), InvalidArgument);
  EXPECT_THROW(ops::linear(a, b), InvalidArgument);
  EXPECT_THROW(ops::add(a, rand_tensor(rng, {3}).to(Device::cuda())), InvalidArgument);
  EXPECT_THROW(ops::layer_norm(a, rand_tensor(rng, {3}).to(Device::cuda()), rand_tensor(rng, {3})), InvalidArgument);
  EXPECT_THROW(ops::embedding(rand_ints(rng, {2}, 3), b), InvalidArgument);
  EXPECT_THROW(ops::cross_entropy(a, rand_ints(rng, {2}, 3).to(Device::cuda())), InvalidArgument);
}

// ------------------------------------------------------------------------------------------
// thread-count independence: sizes above the kernels' parallel grain, so 2 threads really split

TEST(OpsThreads, OneAndTwoThreadsAgree) {
  const int previous = num_threads();
  auto run = [](int threads) {
    set_num_threads(threads);
    Rng rng(100);
    std::vector<Tensor> leaves = {rand_tensor(rng, {2, 130, 3 * 48}), rand_tensor(rng, {48, 300}),
                                  rand_tensor(rng, {300}), rand_tensor(rng, {300}), rand_tensor(rng, {300}),
                                  rand_tensor(rng, {300, 48}), rand_tensor(rng, {97, 48})};
    for (Tensor& t : leaves) t.set_requires_grad(true);
    const Tensor idx = rand_ints(rng, {2, 130}, 97);
    Tensor h = ops::add(ops::causal_attention(leaves[0], 4), ops::embedding(idx, leaves[6]));  // (2, 130, 48)
    h = ops::gelu(ops::linear(h, leaves[1], leaves[2]));                                       // (2, 130, 300)
    h = ops::linear(ops::layer_norm(h, leaves[3], leaves[4]), leaves[5]);                      // (2, 130, 48)
    const Tensor logits = ops::matmul(ops::reshape(h, {260, 48}), leaves[6], false, true);     // (260, 97)
    const Tensor loss = ops::cross_entropy(logits, rand_ints(rng, {260}, 97));
    loss.backward();
    std::vector<Vec> out = {to_f64(logits), to_f64(ops::softmax(logits)), to_f64(loss)};
    for (const Tensor& t : leaves) out.push_back(to_f64(t.grad()));
    return out;
  };
  const std::vector<Vec> one = run(1), two = run(2);
  set_num_threads(previous);
  for (size_t i = 0; i < one.size(); ++i)
    EXPECT_TRUE(all_close(two[i], one[i], 1e-6, 1e-6 * max_abs(one[i]))) << "result " << i;
}
