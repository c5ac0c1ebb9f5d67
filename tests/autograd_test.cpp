// The autograd tape: accumulation into leaves, tensors used more than once, NoGradGuard,
// error cases, gradients that must not leak between tensors, and very deep graphs.
// Letters: N rows, C channels, V vocabulary.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "test_util.hpp"

using namespace tutti;
using namespace tutti::test;

namespace {

Tensor leaf(Rng& rng, const Shape& shape) {
  Tensor t = rand_tensor(rng, shape);
  t.set_requires_grad(true);
  return t;
}

Vec scaled(Vec v, double s) {
  for (double& x : v) x *= s;
  return v;
}

Vec plus(Vec a, const Vec& b) {
  for (size_t i = 0; i < a.size(); ++i) a[i] += b[i];
  return a;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// accumulation

TEST(Autograd, AccumulatesIntoLeavesAcrossBackwardCalls) {
  Rng rng(1);
  Tensor x = leaf(rng, {3, 5});
  const Tensor r = rand_tensor(rng, {3, 5});
  ops::sum(ops::scale(x, 3.0f)).backward();
  EXPECT_TRUE(all_close(x.grad(), Vec(15, 3.0), 1e-7, 0));

  const Tensor loss = weighted_sum(x, r);  // d/dx = r
  loss.backward();
  const Vec expected = plus(Vec(15, 3.0), to_f64(r));
  EXPECT_TRUE(all_close(x.grad(), expected, 1e-6, 1e-7));

  loss.backward();  // the same graph again: its saved tensors are still there
  EXPECT_TRUE(all_close(x.grad(), plus(expected, to_f64(r)), 1e-6, 1e-7));

  x.zero_grad();
  EXPECT_FALSE(x.grad().defined());
  loss.backward();
  EXPECT_TRUE(all_close(x.grad(), to_f64(r), 1e-6, 1e-7));
}

// A scalar leaf as the root of backward gets d(self)/d(self) = 1, accumulated like any other.
TEST(Autograd, LeafRoot) {
  Tensor x = Tensor::full({}, 2.0f);
  x.set_requires_grad(true);
  x.backward();
  x.backward();
  EXPECT_FLOAT_EQ(x.grad().item(), 2.0f);
}

// backward(gradient) from a non-scalar tensor equals backward of sum(tensor * gradient): how a
// pipeline stage continues the backward of the stage after it.
TEST(Autograd, BackwardWithAnOutputGradient) {
  Rng rng(3);
  Tensor x = leaf(rng, {4, 6});
  const Tensor w = rand_tensor(rng, {6, 5}), g = rand_tensor(rng, {4, 5});
  ops::matmul(x, w).backward(g);
  const Vec expected = to_f64(x.grad());
  x.zero_grad();
  weighted_sum(ops::matmul(x, w), g).backward();
  EXPECT_TRUE(all_close(x.grad(), expected, 1e-6, 1e-7));
  try {
    ops::matmul(x, w).backward(rand_tensor(rng, {5, 4}));
    FAIL() << "a gradient of the wrong shape was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("does not match"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ops::matmul(x, w).backward(), InvalidArgument);  // not one element, no gradient
}

// ------------------------------------------------------------------------------------------
// tensors used more than once get the sum of their gradients

TEST(Autograd, TensorUsedTwiceGetsSum) {
  Rng rng(2);
  Tensor x = leaf(rng, {4, 3});
  const Tensor r = rand_tensor(rng, {4, 3});
  weighted_sum(ops::add(x, x), r).backward();
  EXPECT_TRUE(all_close(x.grad(), scaled(to_f64(r), 2.0), 1e-6, 0));

  // matmul(x, x^T): d/dx sum(R * x x^T) = (R + R^T) x.
  Tensor y = leaf(rng, {4, 3});
  const Tensor r2 = rand_tensor(rng, {4, 4});
  weighted_sum(ops::matmul(y, y, false, true), r2).backward();
  const Vec yv = to_f64(y), rv = to_f64(r2);
  Vec expected(12, 0.0);
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < 3; ++k)
      for (int j = 0; j < 4; ++j) expected[i * 3 + k] += (rv[i * 4 + j] + rv[j * 4 + i]) * yv[j * 3 + k];
  EXPECT_TRUE(all_close(y.grad(), expected, 1e-5, 1e-6 * max_abs(expected)));
}

// An intermediate reached along two paths of different depth (a diamond) sums both before its
// own backward runs, including when one op hands back the same gradient buffer twice (add).
TEST(Autograd, DiamondThroughIntermediate) {
  Rng rng(3);
  Tensor x = leaf(rng, {2, 7});
  const Tensor r = rand_tensor(rng, {2, 7});
  const Tensor g = ops::gelu(x);
  const Tensor out = ops::add(ops::add(g, g), ops::add(ops::scale(g, 2.0f), g));  // 5 gelu(x)
  weighted_sum(out, r).backward();

  Tensor x2 = x.detach().clone();
  x2.set_requires_grad(true);
  weighted_sum(ops::scale(ops::gelu(x2), 5.0f), r).backward();
  EXPECT_TRUE(all_close(x.grad(), to_f64(x2.grad()), 1e-6, 1e-7));
}

// The residual stream: h feeds a LayerNorm branch and the next add. The add's gradient for h is
// pending when the LayerNorm's backward runs, which adds its part into it in place
// (Node::backward_into) instead of the engine adding it after: the same sums, to float rounding (the
// kernel may fuse the multiply and the add), as a graph where the LayerNorm reads a copy of h (no
// pending gradient to add into).
TEST(Autograd, LayerNormAddsIntoThePendingGradient) {
  Rng rng(4);
  const Tensor w = rand_tensor(rng, {8}), b = rand_tensor(rng, {8}), r = rand_tensor(rng, {3, 8});
  Tensor x = leaf(rng, {3, 8}), x2 = x.detach().clone();
  x2.set_requires_grad(true);
  auto block = [&](const Tensor& h, const Tensor& ln_input) {
    return ops::add(h, ops::gelu(ops::layer_norm(ln_input, w, b)));
  };
  const Tensor h = ops::scale(x, 1.5f), h2 = ops::scale(x2, 1.5f);
  weighted_sum(block(h, h), r).backward();
  weighted_sum(block(h2, ops::scale(h2, 1.0f)), r).backward();
  EXPECT_TRUE(all_close(x.grad(), to_f64(x2.grad()), 1e-6, 1e-7));
}

// GPT's tied embedding: one (V, C) table read by embedding() and by matmul(.., trans_b = true).
TEST(Autograd, TiedEmbeddingWeight) {
  Rng rng(4);
  const int64_t N = 9, V = 11, C = 6;
  const Tensor idx = rand_ints(rng, {N}, static_cast<int32_t>(V)), targets = rand_ints(rng, {N}, static_cast<int32_t>(V));
  const Tensor table = rand_tensor(rng, {V, C});
  auto loss_of = [&](const Tensor& for_embedding, const Tensor& for_logits) {
    const Tensor h = ops::gelu(ops::embedding(idx, for_embedding));               // (N, C)
    return ops::cross_entropy(ops::matmul(h, for_logits, false, true), targets);  // (N, V) -> ()
  };
  // The tied table's gradient is the sum of the two untied ones.
  Tensor tied = table.clone(), a = table.clone(), b = table.clone();
  for (Tensor* t : {&tied, &a, &b}) t->set_requires_grad(true);
  loss_of(tied, tied).backward();
  loss_of(a, b).backward();
  const Vec untied = plus(to_f64(a.grad()), to_f64(b.grad()));
  EXPECT_TRUE(all_close(tied.grad(), untied, 1e-6, 1e-7));
  // A second backward accumulates: the output head's part is added to the gradient so far, the
  // embedding's rows into that in place (Node::backward_into on a leaf).
  loss_of(tied, tied).backward();
  EXPECT_TRUE(all_close(tied.grad(), plus(untied, untied), 1e-6, 1e-7));

  // And matches finite differences of a float64 reference.
  auto ref = [&](const std::vector<Vec>& x) {
    const Vec& w = x[0];
    const Vec ids = to_f64(idx), tg = to_f64(targets);
    double loss = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      Vec h(C), logits(V);
      for (int64_t c = 0; c < C; ++c) {
        const double e = w[static_cast<size_t>(ids[n]) * C + c];
        h[c] = 0.5 * e * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (e + 0.044715 * e * e * e)));
      }
      double mx = -1e300, s = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        logits[v] = 0.0;
        for (int64_t c = 0; c < C; ++c) logits[v] += h[c] * w[v * C + c];
        mx = std::max(mx, logits[v]);
      }
      for (int64_t v = 0; v < V; ++v) s += std::exp(logits[v] - mx);
      loss += mx + std::log(s) - logits[static_cast<size_t>(tg[n])];
    }
    return Vec{loss / N};
  };
  check_op("tied embedding", {table.clone()}, {true},
           [&](const std::vector<Tensor>& t) { return loss_of(t[0], t[0]); }, ref, rng);
}

// ------------------------------------------------------------------------------------------
// recording on and off

TEST(Autograd, NoGradGuardRecordsNothing) {
  Rng rng(5);
  Tensor x = leaf(rng, {3, 4});
  EXPECT_TRUE(grad_enabled());
  {
    NoGradGuard guard;
    EXPECT_FALSE(grad_enabled());
    const Tensor y = ops::linear(ops::gelu(x), rand_tensor(rng, {4, 2}));
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
    EXPECT_THROW(ops::sum(y).backward(), InvalidArgument);
    {
      NoGradGuard nested;
      EXPECT_FALSE(grad_enabled());
    }
    EXPECT_FALSE(grad_enabled());  // the inner guard restores "off", not "on"
    bool other_thread_enabled = false;  // the mode is per thread
    std::thread([&] { other_thread_enabled = grad_enabled(); }).join();
    EXPECT_TRUE(other_thread_enabled);
  }
  EXPECT_TRUE(grad_enabled());
  const Tensor z = ops::sum(ops::gelu(x));
  EXPECT_TRUE(z.requires_grad());
  ASSERT_NE(z.grad_fn(), nullptr);
  EXPECT_STREQ(z.grad_fn()->name(), "sum");
  EXPECT_FALSE(x.grad().defined());  // nothing ran backward yet

  // Inputs that need no grad record nothing either.
  const Tensor plain = ops::gelu(rand_tensor(rng, {3}));
  EXPECT_FALSE(plain.requires_grad());
  EXPECT_EQ(plain.grad_fn(), nullptr);
}

TEST(Autograd, BackwardNeedsOneElementThatRequiresGrad) {
  Rng rng(6);
  Tensor x = leaf(rng, {2, 3});
  EXPECT_THROW(ops::scale(x, 2.0f).backward(), InvalidArgument);                   // 6 elements
  EXPECT_THROW(ops::reshape(ops::sum(x), {1, 1}).slice(0, 0, 0).backward(), InvalidArgument);  // 0 elements
  EXPECT_THROW(rand_tensor(rng, {}).backward(), InvalidArgument);                   // no grad
  EXPECT_FALSE(x.grad().defined());
  ops::reshape(ops::sum(x), {1, 1}).backward();  // (1, 1) is one element: fine
  EXPECT_TRUE(all_close(x.grad(), Vec(6, 1.0), 0, 0));
}

// ------------------------------------------------------------------------------------------
// gradients stay where they belong

TEST(Autograd, IntermediateGradsDoNotLeak) {
  Rng rng(7);
  Tensor x = leaf(rng, {3, 4});
  const Tensor y = ops::scale(x, 2.0f);          // intermediates
  const Tensor z = ops::reshape(y, {4, 3});
  const Tensor r = rand_tensor(rng, {4, 3});
  weighted_sum(z, r).backward();
  EXPECT_FALSE(y.grad().defined());
  EXPECT_FALSE(z.grad().defined());
  EXPECT_TRUE(all_close(x.grad(), scaled(to_f64(r), 2.0), 1e-6, 0));

  // Two leaves whose gradients come from one buffer (add hands back the same gradient for both)
  // get separate storage: writing one leaf's grad leaves the other alone.
  Tensor a = leaf(rng, {5}), b = leaf(rng, {5});
  const Tensor r5 = rand_tensor(rng, {5});
  const Vec r5_values = to_f64(r5);
  weighted_sum(ops::add(a, b), r5).backward();
  a.grad().data<float>()[0] = 100.0f;
  EXPECT_TRUE(all_close(b.grad(), r5_values, 0, 0));
  EXPECT_TRUE(all_close(r5, r5_values, 0, 0));  // R, which became the gradient buffer's source

  // A leaf fed through reshape (whose gradient is a view of its output gradient) owns its grad,
  // and a second backward adds to it without touching the graph's saved tensors.
  Tensor c = leaf(rng, {2, 6});
  const Vec r_values = to_f64(r);
  const Tensor loss = weighted_sum(ops::reshape(c, {3, 4}), r);
  loss.backward();
  const Vec once = to_f64(c.grad());
  loss.backward();
  EXPECT_TRUE(all_close(c.grad(), scaled(once, 2.0), 1e-7, 0));
  EXPECT_TRUE(all_close(r, r_values, 0, 0));

  // detach() cuts the history: no gradient reaches the original.
  Tensor d = leaf(rng, {4});
  ops::sum(ops::add(ops::scale(d.detach(), 3.0f), leaf(rng, {4}))).backward();
  EXPECT_FALSE(d.grad().defined());
}

// ------------------------------------------------------------------------------------------
// deep graphs: backward is iterative, and tearing the graph down does not recurse per node

TEST(Autograd, DeepChain) {
  Rng rng(8);
  Tensor x = leaf(rng, {4});
  const Tensor c = rand_tensor(rng, {4});
  Tensor y = x;
  for (int i = 0; i < 1000; ++i) y = (i % 2) ? ops::scale(y, 1.001f) : ops::add(y, c);
  const Tensor loss = ops::sum(y);
  loss.backward();
  EXPECT_TRUE(all_close(x.grad(), Vec(4, std::pow(double{1.001f}, 500)), 1e-5, 0));
}

// relu saves its input (so the input is held twice) and reshape saves nothing: both kinds of
// node must be freed without one stack frame per op. x > 0, so the gradient is exactly 1.
TEST(Autograd, VeryDeepChainTeardown) {
  Tensor x = Tensor::full({3}, 0.5f);
  x.set_requires_grad(true);
  {
    Tensor y = x;
    for (int i = 0; i < 300000; ++i) y = (i % 2) ? ops::reshape(y, {3}) : ops::relu(y);
    ops::sum(y).backward();
  }  // the graph goes here
  EXPECT_TRUE(all_close(x.grad(), Vec(3, 1.0), 0, 0));
}

// ------------------------------------------------------------------------------------------
// on_grad_ready: data parallelism starts a bucket's reduction from this hook, so it must fire
// exactly once per backward, only when every use of the leaf has delivered its gradient.

TEST(Autograd, GradReadyHookFiresOnceWhenTheGradientIsFinal) {
  Rng rng(21);
  Tensor table = leaf(rng, {5, 3});  // used twice, like GPT's tied embedding and LM head
  Tensor other = leaf(rng, {3});
  std::vector<std::string> events;
  table.impl().on_grad_ready = [&](TensorImpl& t) {
    events.push_back("table");
    EXPECT_TRUE(t.grad != nullptr);
  };
  other.impl().on_grad_ready = [&](TensorImpl&) { events.push_back("other"); };
  const Tensor idx = Tensor::from_vector({2}, std::vector<int32_t>{1, 4});
  const Tensor emb = ops::embedding(idx, table);                            // first use (oldest node)
  const Tensor logits = ops::matmul(ops::add(emb, other), table, false, true);  // second use
  ops::sum(logits).backward();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events.back(), "table") << "the table's gradient is final only after the embedding's backward";
  // Its gradient at that moment is the complete one: the same as without the hook.
  Tensor again = table.detach().clone().set_requires_grad(true);
  Tensor other2 = other.detach().clone().set_requires_grad(true);
  ops::sum(ops::matmul(ops::add(ops::embedding(idx, again), other2), again, false, true)).backward();
  EXPECT_TRUE(all_close(table.grad(), to_f64(again.grad()), 0, 0));
  events.clear();
  ops::sum(ops::matmul(ops::add(ops::embedding(idx, table), other), table, false, true)).backward();
  EXPECT_EQ(events.size(), 2u) << "once per backward";
  table.impl().on_grad_ready = nullptr;
  other.impl().on_grad_ready = nullptr;
}
