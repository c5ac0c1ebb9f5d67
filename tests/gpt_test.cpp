// The GPT module as a whole: gradients against finite differences, overfitting one batch, the
// KV cache against the full forward pass, and deterministic greedy generation.
#include <gtest/gtest.h>

#include <cmath>

#include "tutti/autograd/node.hpp"
#include "tutti/nn/gpt.hpp"
#include "tutti/optim/adamw.hpp"

using namespace tutti;

namespace {

nn::GPTConfig tiny(int layers = 2, int heads = 2, int dim = 8, int context = 6) {
  nn::GPTConfig c;
  c.n_layer = layers;
  c.n_head = heads;
  c.n_embd = dim;
  c.block_size = context;
  c.vocab_size = 256;
  return c;
}

Tensor tokens(Rng& rng, int64_t B, int64_t T, int vocab = 256) {
  std::vector<int32_t> v(static_cast<size_t>(B * T));
  for (auto& t : v) t = static_cast<int32_t>(rng.below(uint64_t(vocab)));
  return Tensor::from_vector({B, T}, v);
}

}  // namespace

TEST(GPT, ParameterNamesAndCountMatchGPT2) {
  nn::GPT model(tiny());
  auto named = model.named_parameters();
  ASSERT_EQ(named.size(), 2u + 2u * 12u + 2u);
  EXPECT_EQ(named[0].first, "wte.weight");
  EXPECT_EQ(named[1].first, "wpe.weight");
  EXPECT_EQ(named[2].first, "h.0.ln_1.weight");
  EXPECT_EQ(named[4].first, "h.0.attn.c_attn.weight");
  EXPECT_EQ(named[4].second.shape(), (Shape{8, 24}));  // Conv1D layout (in, out)
  EXPECT_EQ(named.back().first, "ln_f.bias");
  EXPECT_EQ(model.num_parameters(), tiny().num_parameters());
}

TEST(GPT, RejectsBadConfig) {
  EXPECT_THROW(nn::GPT(tiny(2, 3, 8)), ConfigError);  // heads do not divide dim
  EXPECT_THROW(nn::GPT(tiny(0)), ConfigError);
  nn::GPT model(tiny());
  Rng rng(1);
  EXPECT_THROW(model.forward(tokens(rng, 1, 7)), InvalidArgument);  // longer than the context
}

TEST(GPT, GradientMatchesFiniteDifferences) {
  nn::GPT model(tiny());
  Rng rng(3);
  for (auto& [name, p] : model.named_parameters()) nn::normal_(p, 0.3f, rng);  // large enough gradients
  const Tensor x = tokens(rng, 2, 6), y = tokens(rng, 2, 6);
  Tensor loss = model.loss(x, y);
  loss.backward();
  NoGradGuard no_grad;
  const float eps = 1e-2f;
  int checked = 0;
  for (auto& [name, p] : model.named_parameters()) {
    ASSERT_TRUE(p.grad().defined()) << name;
    const std::vector<float> grad = p.grad().to_vector<float>();
    float* w = p.data<float>();
    for (int k = 0; k < 6; ++k) {
      size_t i = static_cast<size_t>(rng.below(uint64_t(p.numel())));
      if (name == "wte.weight") {  // only rows of tokens in the batch get embedding gradient; pick one
        i = static_cast<size_t>(x.data<int32_t>()[k] * p.size(1) + int64_t(rng.below(uint64_t(p.size(1)))));
      }
      const float saved = w[i];
      w[i] = saved + eps;
      const double up = model.loss(x, y).item();
      w[i] = saved - eps;
      const double down = model.loss(x, y).item();
      w[i] = saved;
      const double fd = (up - down) / (2.0 * eps);
      EXPECT_NEAR(grad[i], fd, 2e-4 + 2e-2 * std::abs(fd)) << name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 6 * 28);
}

TEST(GPT, OverfitsOneBatch) {
  nn::GPT model(tiny(2, 2, 32, 16));
  Rng rng(5);
  model.init_weights(rng);
  const Tensor x = tokens(rng, 4, 16, 32), y = tokens(rng, 4, 16, 32);
  optim::AdamW opt(model.named_parameters(), {.lr = 3e-3f, .weight_decay = 0.0f});
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    Tensor loss = model.loss(x, y);
    opt.zero_grad();
    loss.backward();
    opt.step(3e-3f);
    (step == 0 ? first : last) = loss.item();
  }
  EXPECT_GT(first, 5.0);
  EXPECT_LT(last, 0.05) << "a tiny GPT must memorise one batch";
}

// AdamW updates every parameter in one pass (one launch on CUDA): a parameter given twice would
// be updated twice at once, so it is refused, naming it.
TEST(GPT, AdamWRefusesAParameterGivenTwice) {
  nn::GPT model(tiny(1));
  auto params = model.named_parameters();
  params.push_back({"again", params.front().second});
  try {
    optim::AdamW opt(params, {});
    FAIL() << "a repeated parameter was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'again' is given twice"), std::string::npos) << e.what();
  }
}

TEST(GPT, KvCacheMatchesFullForward) {
  nn::GPT model(tiny(2, 2, 16, 12));
  Rng rng(9);
  model.init_weights(rng);
  for (auto& [name, p] : model.named_parameters()) nn::normal_(p, 0.2f, rng);
  const Tensor x = tokens(rng, 1, 12);
  NoGradGuard no_grad;
  const std::vector<float> full = model.forward(x).to_vector<float>();  // (1, 12, 256)
  const std::vector<int32_t> ids = x.to_vector<int32_t>();
  nn::KVCache cache = model.new_cache();
  // a prefill of 5 tokens, then one at a time
  std::vector<float> step = model.forward_cached({ids.begin(), ids.begin() + 5}, cache).to_vector<float>();
  for (int64_t t = 4; t < 12; ++t) {
    if (t > 4) step = model.forward_cached({ids[size_t(t)]}, cache).to_vector<float>();
    for (int v = 0; v < 256; ++v)
      ASSERT_NEAR(step[size_t(v)], full[size_t(t * 256 + v)], 1e-4 + 1e-4 * std::abs(full[size_t(t * 256 + v)]))
          << "position " << t << " token " << v;
  }
  EXPECT_EQ(cache.length, 12);
  EXPECT_THROW(model.forward_cached({1}, cache), InvalidArgument);  // the cache is full
}

TEST(GPT, GreedyGenerationIsDeterministicAndSlidesPastTheContext) {
  nn::GPT model(tiny(2, 2, 16, 8));
  Rng rng(11);
  model.init_weights(rng);
  nn::SampleOptions greedy;
  greedy.temperature = 0.0f;
  greedy.max_tokens = 30;  // longer than the context of 8: the cache is refilled
  const auto a = nn::generate(model, {72, 105}, greedy);
  greedy.seed = 99;  // a seed does not matter when greedy
  const auto b = nn::generate(model, {72, 105}, greedy);
  EXPECT_EQ(a.size(), 30u);
  EXPECT_EQ(a, b);
  nn::SampleOptions hot;
  hot.temperature = 1.0f;
  hot.top_k = 5;
  hot.max_tokens = 30;
  hot.seed = 1;
  EXPECT_EQ(nn::generate(model, {72}, hot), nn::generate(model, {72}, hot));
  hot.max_tokens = -1;
  EXPECT_THROW(nn::generate(model, {72}, hot), InvalidArgument);
  EXPECT_THROW(nn::generate(model, {300}, greedy), InvalidArgument);
}
