// GPT-2. Letters: B batch, T time, C channels (n_embd), V vocabulary, L layers.
#include "tutti/nn/gpt.hpp"

#include <algorithm>
#include <cmath>
#include <functional>

#include "tutti/autograd/node.hpp"
#include "tutti/ops/ops.hpp"

namespace tutti::nn {

// ------------------------------------------------------------------------------------------
// Config

void GPTConfig::validate() const {
  TUTTI_CHECK_AS(ConfigError, n_layer > 0, "layers must be positive, got ", n_layer);
  TUTTI_CHECK_AS(ConfigError, n_head > 0, "heads must be positive, got ", n_head);
  TUTTI_CHECK_AS(ConfigError, n_embd > 0, "dim must be positive, got ", n_embd);
  TUTTI_CHECK_AS(ConfigError, n_embd % n_head == 0, "heads (", n_head, ") must divide dim (", n_embd, ")");
  TUTTI_CHECK_AS(ConfigError, block_size > 0, "context must be positive, got ", block_size);
  TUTTI_CHECK_AS(ConfigError, vocab_size > 0, "vocab_size must be positive, got ", vocab_size);
  TUTTI_CHECK_AS(ConfigError, layer_norm_epsilon > 0, "layer_norm_epsilon must be positive, got ", layer_norm_epsilon);
}

int64_t GPTConfig::num_parameters() const {
  const int64_t C = n_embd, L = n_layer;
  const int64_t per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C);
  return int64_t{vocab_size} * C + int64_t{block_size} * C + L * per_block + 2 * C;
}

double GPTConfig::flops_per_token(int T) const {
  const double C = n_embd, L = n_layer;
  const double matmul_params = 12.0 * L * C * C + double(vocab_size) * C;  // blocks + tied LM head
  return 6.0 * matmul_params + 12.0 * L * C * T;                            // + attention (PaLM, appendix B)
}

// ------------------------------------------------------------------------------------------
// Block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))

struct Attention : Module {
  Attention(int64_t C) : c_attn(C, 3 * C), c_proj(C, C) {
    register_module("c_attn", c_attn);
    register_module("c_proj", c_proj);
  }
  Linear c_attn, c_proj;
};

struct Mlp : Module {
  Mlp(int64_t C) : c_fc(C, 4 * C), c_proj(4 * C, C) {
    register_module("c_fc", c_fc);
    register_module("c_proj", c_proj);
  }
  Tensor forward(const Tensor& x) const { return c_proj.forward(ops::gelu(c_fc.forward(x))); }
  Linear c_fc, c_proj;
};

struct GPT::Block : Module {
  Block(const GPTConfig& cfg)
      : ln_1(cfg.n_embd, cfg.layer_norm_epsilon), attn(cfg.n_embd), ln_2(cfg.n_embd, cfg.layer_norm_epsilon),
        mlp(cfg.n_embd), n_head(cfg.n_head) {
    register_module("ln_1", ln_1);
    register_module("attn", attn);
    register_module("ln_2", ln_2);
    register_module("mlp", mlp);
  }
  Tensor forward(const Tensor& x) const {  // (B, T, C)
    Tensor qkv = attn.c_attn.forward(ln_1.forward(x));  // (B, T, 3C)
    Tensor h = ops::add(x, attn.c_proj.forward(ops::causal_attention(qkv, n_head)));
    return ops::add(h, mlp.forward(ln_2.forward(h)));
  }
  LayerNorm ln_1;
  Attention attn;
  LayerNorm ln_2;
  Mlp mlp;
  int n_head;
};

// ------------------------------------------------------------------------------------------
// GPT

GPT::GPT(const GPTConfig& config)
    : config_((config.validate(), config)), wte_(config.vocab_size, config.n_embd),
      wpe_(config.block_size, config.n_embd), ln_f_(config.n_embd, config.layer_norm_epsilon) {
  register_module("wte", wte_);
  register_module("wpe", wpe_);
  for (int l = 0; l < config.n_layer; ++l) {
    blocks_.push_back(std::make_unique<Block>(config));
    register_module("h." + std::to_string(l), *blocks_.back());
  }
  register_module("ln_f", ln_f_);
}

GPT::~GPT() = default;

void GPT::init_weights(Rng& rng) {
  const float std = 0.02f, proj_std = 0.02f / std::sqrt(2.0f * static_cast<float>(config_.n_layer));
  normal_(wte_.weight, std, rng);
  normal_(wpe_.weight, std, rng);
  for (auto& b : blocks_) {
    for (Linear* lin : {&b->attn.c_attn, &b->attn.c_proj, &b->mlp.c_fc, &b->mlp.c_proj}) {
      const bool residual = lin == &b->attn.c_proj || lin == &b->mlp.c_proj;
      normal_(lin->weight, residual ? proj_std : std, rng);
      lin->bias.zero_();
    }
    for (LayerNorm* ln : {&b->ln_1, &b->ln_2}) {
      ln->weight.fill_(1.0f);
      ln->bias.zero_();
    }
  }
  ln_f_.weight.fill_(1.0f);
  ln_f_.bias.zero_();
}

namespace {
Tensor positions(int64_t start, int64_t count, Device device) {
  std::vector<int32_t> p(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) p[static_cast<size_t>(i)] = static_cast<int32_t>(start + i);
  return Tensor::from_vector({count}, p).to(device);
}
}  // namespace

Tensor GPT::forward(const Tensor& idx) const {
  TUTTI_CHECK_AS(InvalidArgument, idx.ndim() == 2 && idx.dtype() == DType::i32, "GPT input must be (B, T) i32, got ",
                 idx.str());
  const int64_t B = idx.size(0), T = idx.size(1), C = config_.n_embd;
  TUTTI_CHECK_AS(InvalidArgument, T <= config_.block_size, "sequence of ", T, " tokens exceeds the context of ",
                 config_.block_size);
  Tensor x = ops::add(wte_.forward(idx), wpe_.forward(positions(0, T, idx.device())));  // (B, T, C)
  for (const auto& block : blocks_) x = block->forward(x);
  x = ops::reshape(ln_f_.forward(x), {B * T, C});
  Tensor logits = ops::matmul(x, wte_.weight, false, true);  // (B*T, V): the head is tied to wte
  return ops::reshape(logits, {B, T, config_.vocab_size});
}

Tensor GPT::loss(const Tensor& idx, const Tensor& targets) const {
  TUTTI_CHECK_AS(InvalidArgument, targets.shape() == idx.shape(), "targets ", targets.str(), " do not match inputs ",
                 idx.str());
  Tensor logits = forward(idx);
  return ops::cross_entropy(ops::reshape(logits, {-1, config_.vocab_size}), targets.contiguous().view({-1}));
}

KVCache GPT::new_cache() const {
  KVCache cache;
  const Device device = wte_.weight.device();
  for (int l = 0; l < config_.n_layer; ++l) {
    cache.keys.push_back(Tensor::zeros({config_.block_size, config_.n_embd}, DType::f32, device));
    cache.values.push_back(Tensor::zeros({config_.block_size, config_.n_embd}, DType::f32, device));
  }
  return cache;
}

Tensor GPT::forward_cached(const std::vector<int32_t>& tokens, KVCache& cache) const {
  NoGradGuard no_grad;
  const int64_t n = static_cast<int64_t>(tokens.size()), past = cache.length, C = config_.n_embd;
  TUTTI_CHECK_AS(InvalidArgument, n > 0, "forward_cached needs at least one token");
  TUTTI_CHECK_AS(InvalidArgument, past + n <= config_.block_size, "positions up to ", past + n,
                 " exceed the context of ", config_.block_size);
  const Device device = wte_.weight.device();
  Tensor idx = Tensor::from_vector({n}, tokens).to(device);
  Tensor x = ops::add(wte_.forward(idx), wpe_.forward(positions(past, n, device)));  // (n, C)
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Block& b = *blocks_[l];
    Tensor qkv = b.attn.c_attn.forward(b.ln_1.forward(x));  // (n, 3C)
    cache.keys[l].slice(0, past, past + n).copy_(qkv.slice(1, C, 2 * C));
    cache.values[l].slice(0, past, past + n).copy_(qkv.slice(1, 2 * C, 3 * C));
    Tensor y = ops::cached_attention(qkv.slice(1, 0, C), cache.keys[l], cache.values[l], past, config_.n_head);
    x = ops::add(x, b.attn.c_proj.forward(y));
    x = ops::add(x, b.mlp.forward(b.ln_2.forward(x)));
  }
  cache.length = past + n;
  Tensor last = ln_f_.forward(x.slice(0, n - 1, n));              // (1, C)
  return ops::matmul(last, wte_.weight, false, true).view({-1});  // (V)
}

// ------------------------------------------------------------------------------------------
// Sampling

namespace {
int32_t sample(const std::vector<float>& logits, const SampleOptions& o, Rng& rng) {
  const int V = static_cast<int>(logits.size());
  if (o.temperature <= 0.0f) return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<float> scaled(logits.size());
  for (int i = 0; i < V; ++i) scaled[size_t(i)] = logits[size_t(i)] / o.temperature;
  if (o.top_k > 0 && o.top_k < V) {
    std::vector<float> sorted = scaled;
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1), sorted.end(), std::greater<>());
    const float cutoff = sorted[size_t(o.top_k - 1)];
    for (float& s : scaled)
      if (s < cutoff) s = -INFINITY;
  }
  const float mx = *std::max_element(scaled.begin(), scaled.end());
  double total = 0.0;
  for (float& s : scaled) total += (s = std::exp(s - mx));
  double u = rng.uniform() * total;
  for (int i = 0; i < V; ++i) {
    u -= scaled[size_t(i)];
    if (u <= 0.0) return i;
  }
  return V - 1;
}
}  // namespace

std::vector<int32_t> generate(const GPT& model, const std::vector<int32_t>& prompt, const SampleOptions& options) {
  TUTTI_CHECK_AS(InvalidArgument, options.max_tokens >= 0, "max_tokens must be >= 0, got ", options.max_tokens);
  TUTTI_CHECK_AS(InvalidArgument, options.temperature >= 0.0f, "temperature must be >= 0, got ", options.temperature);
  TUTTI_CHECK_AS(InvalidArgument, options.top_k >= 0, "top_k must be >= 0, got ", options.top_k);
  const int V = model.config().vocab_size, block = model.config().block_size;
  for (int32_t t : prompt) TUTTI_CHECK_AS(InvalidArgument, t >= 0 && t < V, "prompt token ", t, " outside [0, ", V, ")");
  std::vector<int32_t> history = prompt.empty() ? std::vector<int32_t>{'\n' % V} : prompt;
  Rng rng(options.seed);
  KVCache cache = model.new_cache();
  auto refill = [&](size_t keep) {
    cache.length = 0;
    return model.forward_cached({history.end() - static_cast<std::ptrdiff_t>(keep), history.end()}, cache);
  };
  Tensor logits = refill(std::min<size_t>(history.size(), size_t(block)));
  std::vector<int32_t> out;
  for (int i = 0; i < options.max_tokens; ++i) {
    const int32_t next = sample(logits.to_vector<float>(), options, rng);
    out.push_back(next);
    history.push_back(next);
    if (i + 1 == options.max_tokens) break;
    logits = cache.length < block ? model.forward_cached({next}, cache) : refill(size_t(std::max(1, block / 2)));
  }
  return out;
}

}  // namespace tutti::nn
