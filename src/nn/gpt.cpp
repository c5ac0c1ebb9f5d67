// GPT-2. Letters: B batch, T time, C channels (n_embd), V vocabulary, L layers.
#include "tutti/nn/gpt.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <string_view>

#include "tutti/autograd/node.hpp"
#include "tutti/ops/ops.hpp"
#include "tutti/parallel/tensor_parallel.hpp"

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
  TUTTI_CHECK_AS(ConfigError, compute == DType::f32 || compute == DType::bf16, "compute dtype must be f32 or bf16, got ",
                 dtype_name(compute));
}

int64_t GPTConfig::num_parameters() const {
  const int64_t C = n_embd, L = n_layer;
  const int64_t per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C);
  return int64_t{vocab_size} * C + int64_t{block_size} * C + L * per_block + 2 * C;
}

double GPTConfig::block_flops_per_token(int T) const {
  const double C = n_embd;
  return 6.0 * 12.0 * C * C + 12.0 * C * T;  // matrices (6 flops per parameter) + attention (PaLM, appendix B)
}

double GPTConfig::head_flops_per_token() const { return 6.0 * double(vocab_size) * n_embd; }  // tied LM head

double GPTConfig::flops_per_token(int T) const { return n_layer * block_flops_per_token(T) + head_flops_per_token(); }

// ------------------------------------------------------------------------------------------
// Block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))
// Under tensor parallelism over P ranks the block holds n_head / P heads (c_attn column-parallel,
// attn.c_proj row-parallel) and 4C / P hidden units (c_fc column-parallel, mlp.c_proj
// row-parallel); the row-parallel biases are added once, after the partial sums are reduced.

struct Attention : Module {
  Attention(int64_t C, int P) : c_attn(C, 3 * C / P), c_proj(C / P, C) {
    register_module("c_attn", c_attn);
    register_module("c_proj", c_proj);
  }
  Linear c_attn, c_proj;
};

struct Mlp : Module {
  Mlp(int64_t C, int P) : c_fc(C, 4 * C / P), c_proj(4 * C / P, C) {
    register_module("c_fc", c_fc);
    register_module("c_proj", c_proj);
  }
  Linear c_fc, c_proj;
};

namespace {
// A row-parallel linear layer: partial products summed over the group, then the bias.
Tensor row_parallel(const Linear& lin, const Tensor& x, comm::Communicator& tp) {
  return ops::add(parallel::reduce_from_group(ops::linear(x, lin.weight, Tensor(), lin.weight_bf16), tp), lin.bias);
}
}  // namespace

struct GPT::Block : Module {
  Block(const GPTConfig& cfg, comm::Communicator& tp_group)
      : ln_1(cfg.n_embd, cfg.layer_norm_epsilon), attn(cfg.n_embd, tp_group.size()),
        ln_2(cfg.n_embd, cfg.layer_norm_epsilon), mlp(cfg.n_embd, tp_group.size()),
        n_head(cfg.n_head / tp_group.size()), tp(tp_group) {
    register_module("ln_1", ln_1);
    register_module("attn", attn);
    register_module("ln_2", ln_2);
    register_module("mlp", mlp);
  }
  Tensor forward(const Tensor& x) const {  // (B, T, C)
    // Attention in bf16 once the compute copies exist, as the linear layers (see Module): a model
    // never refreshed (an evaluating rank's, a sample's on the CPU) computes in fp32.
    // The LayerNorms and c_attn then write bf16: their outputs only feed products.
    const DType compute = attn.c_attn.weight_bf16.defined() ? DType::bf16 : DType::f32;
    Tensor qkv = attn.c_attn.forward(parallel::copy_to_group(ln_1.forward(x, compute), tp),
                                     compute);  // (B, T, 3C / P)
    // Unsplit, attention and c_proj are one op (flash attention then reads c_proj's dx in bf16),
    // and each branch's last product adds the residual stream itself (in its epilogue on CUDA); a
    // row-parallel product is summed over the group first, then the bias and the residual.
    const bool whole = tp.size() == 1;
    Tensor h = whole ? ops::attention(qkv, n_head, attn.c_proj.weight, attn.c_proj.bias, attn.c_proj.weight_bf16, x)
                     : ops::add(x, row_parallel(attn.c_proj, ops::causal_attention(qkv, n_head, compute), tp));
    // The MLP as one op (4C / P hidden units here).
    Tensor m = ops::mlp(parallel::copy_to_group(ln_2.forward(h, compute), tp), mlp.c_fc.weight, mlp.c_fc.bias,
                        mlp.c_proj.weight, whole ? mlp.c_proj.bias : Tensor(), mlp.c_fc.weight_bf16,
                        mlp.c_proj.weight_bf16, whole ? h : Tensor());
    if (whole) return m;
    return ops::add(h, ops::add(parallel::reduce_from_group(m, tp), mlp.c_proj.bias));
  }
  LayerNorm ln_1;
  Attention attn;
  LayerNorm ln_2;
  Mlp mlp;
  int n_head;  // on this rank
  comm::Communicator& tp;
};

// ------------------------------------------------------------------------------------------
// GPT

namespace {
const GPTConfig& checked(const GPTConfig& config, const GPTPartition& part) {
  config.validate();
  const int end = part.end_layer < 0 ? config.n_layer : part.end_layer;
  TUTTI_CHECK_AS(ConfigError, part.first_layer >= 0 && part.first_layer < end && end <= config.n_layer,
                 "layers [", part.first_layer, ", ", end, ") are not a non-empty range of the model's ", config.n_layer,
                 " layers");
  const int P = part.tp ? part.tp->size() : 1;
  TUTTI_CHECK_AS(ConfigError, config.n_head % P == 0, "tp ", P, " does not divide the ", config.n_head, " heads");
  TUTTI_CHECK_AS(ConfigError, config.vocab_size % P == 0, "tp ", P, " does not divide the vocabulary of ",
                 config.vocab_size);
  return config;
}

GPTPartition resolved(const GPTConfig& config, GPTPartition part) {
  if (part.end_layer < 0) part.end_layer = config.n_layer;
  return part;
}
}  // namespace

GPT::GPT(const GPTConfig& config, const GPTPartition& partition)
    : config_(checked(config, partition)), partition_(resolved(config, partition)) {
  if (!partition_.tp) own_tp_ = comm::make_local();
  const int P = tp_size();
  if (partition_.embedding || partition_.head) {
    wte_ = std::make_unique<Embedding>(config.vocab_size / P, config.n_embd);
    register_module("wte", *wte_);
  }
  if (partition_.embedding) {
    wpe_ = std::make_unique<Embedding>(config.block_size, config.n_embd);
    register_module("wpe", *wpe_);
  }
  for (int l = partition_.first_layer; l < partition_.end_layer; ++l) {
    blocks_.push_back(std::make_unique<Block>(config, tp_group()));
    register_module("h." + std::to_string(l), *blocks_.back());
  }
  if (partition_.head) {
    ln_f_ = std::make_unique<LayerNorm>(config.n_embd, config.layer_norm_epsilon);
    register_module("ln_f", *ln_f_);
  }
  set_compute_dtype(config.compute);
}

GPT::~GPT() = default;

comm::Communicator& GPT::tp_group() const { return partition_.tp ? *partition_.tp : *own_tp_; }

bool GPT::whole() const {
  return tp_size() == 1 && partition_.embedding && partition_.head && partition_.first_layer == 0 &&
         partition_.end_layer == config_.n_layer;
}

std::vector<std::pair<std::string, Shape>> GPT::full_parameter_shapes(const GPTConfig& c) {
  const int64_t C = c.n_embd;
  std::vector<std::pair<std::string, Shape>> out{{"wte.weight", {c.vocab_size, C}}, {"wpe.weight", {c.block_size, C}}};
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    for (auto& [name, shape] : std::vector<std::pair<std::string, Shape>>{
             {"ln_1.weight", {C}}, {"ln_1.bias", {C}}, {"attn.c_attn.weight", {C, 3 * C}}, {"attn.c_attn.bias", {3 * C}},
             {"attn.c_proj.weight", {C, C}}, {"attn.c_proj.bias", {C}}, {"ln_2.weight", {C}}, {"ln_2.bias", {C}},
             {"mlp.c_fc.weight", {C, 4 * C}}, {"mlp.c_fc.bias", {4 * C}}, {"mlp.c_proj.weight", {4 * C, C}},
             {"mlp.c_proj.bias", {C}}})
      out.emplace_back(h + name, shape);
  }
  out.emplace_back("ln_f.weight", Shape{C});
  out.emplace_back("ln_f.bias", Shape{C});
  return out;
}

parallel::TensorSplit GPT::split_of(const std::string& name) {
  auto ends = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends("attn.c_attn.weight")) return {1, 3};
  if (ends("attn.c_attn.bias")) return {0, 3};
  if (ends("mlp.c_fc.weight")) return {1, 1};
  if (ends("mlp.c_fc.bias")) return {0, 1};
  if (ends("attn.c_proj.weight") || ends("mlp.c_proj.weight") || name == "wte.weight") return {0, 1};
  return {};  // LayerNorms, wpe, the row-parallel biases
}

void GPT::init_weights(Rng& rng) {
  NoGradGuard no_grad;
  const float std = 0.02f, proj_std = 0.02f / std::sqrt(2.0f * static_cast<float>(config_.n_layer));
  std::map<std::string, Tensor> mine;
  for (auto& [name, t] : named_parameters()) mine.emplace(name, t);
  const int P = tp_size(), rank = tp_group().rank();
  // Every rank draws the whole model's random values in one order and keeps what it holds.
  for (const auto& [name, shape] : full_parameter_shapes(config_)) {
    const bool matrix = shape.ndim() == 2, residual = name.find("c_proj.weight") != std::string::npos;
    Tensor full;
    if (matrix) {
      full = Tensor::empty(shape, DType::f32, Device::cpu());
      normal_(full, residual ? proj_std : std, rng);
    }
    auto it = mine.find(name);
    if (it == mine.end()) continue;
    Tensor& param = it->second;
    if (!matrix) param.fill_(name.find("ln_") != std::string::npos && name.ends_with(".weight") ? 1.0f : 0.0f);
    else param.copy_(parallel::take_shard(full, split_of(name), rank, P));
  }
}

namespace {
Tensor positions(int64_t start, int64_t count, Device device) {
  std::vector<int32_t> p(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) p[static_cast<size_t>(i)] = static_cast<int32_t>(start + i);
  return Tensor::from_vector({count}, p).to(device);
}
}  // namespace

Tensor GPT::embed(const Tensor& idx) const {
  TUTTI_CHECK_AS(InvalidArgument, idx.ndim() == 2 && idx.dtype() == DType::i32, "GPT input must be (B, T) i32, got ",
                 idx.str());
  const int64_t T = idx.size(1);
  TUTTI_CHECK_AS(InvalidArgument, T <= config_.block_size, "sequence of ", T, " tokens exceeds the context of ",
                 config_.block_size);
  const int64_t first_row = int64_t{tp_group().rank()} * wte_->weight.size(0);
  return ops::add(parallel::vocab_parallel_embedding(idx, wte_->weight, first_row, tp_group()),
                  wpe_->forward(positions(0, T, idx.device())));  // (B, T, C)
}

Tensor GPT::head_loss(const Tensor& x, const Tensor& targets) const {
  TUTTI_CHECK_AS(InvalidArgument, targets.ndim() == 2 && targets.size(0) == x.size(0) && targets.size(1) == x.size(1),
                 "targets ", targets.str(), " do not match the activations ", x.str());
  const int64_t N = x.size(0) * x.size(1);
  // Mixed precision writes ln_f's output in bf16 (the head's product reads it), and on one rank
  // the logits too, as autocast does: the loss reads half the bytes and its gradient comes back in
  // bf16, which the head's products read as it is.
  const DType compute = wte_->weight_bf16.defined() ? DType::bf16 : DType::f32;
  Tensor h = parallel::copy_to_group(ops::reshape(ln_f_->forward(x, compute), {N, config_.n_embd}), tp_group());
  const bool half = compute == DType::bf16 && tp_size() == 1 && ops::fused_cross_entropy(x.device());
  Tensor logits = ops::matmul(h, wte_->weight, false, true, wte_->weight_bf16,
                              half ? DType::bf16 : DType::f32);  // (N, V / P): tied to wte
  const int64_t first_col = int64_t{tp_group().rank()} * wte_->weight.size(0);
  return parallel::vocab_parallel_cross_entropy(logits, targets.contiguous().view({-1}), first_col, tp_group());
}

Tensor GPT::forward_part(const Tensor& input, const Tensor& targets) const {
  Tensor x = partition_.embedding ? embed(input) : input;
  TUTTI_CHECK_AS(InvalidArgument, x.ndim() == 3 && x.size(2) == config_.n_embd && x.dtype() == DType::f32,
                 "stage input must be f32 (B, T, ", config_.n_embd, "), got ", x.str());
  for (const auto& block : blocks_) x = block->forward(x);
  return partition_.head ? head_loss(x, targets) : x;
}

Tensor GPT::forward(const Tensor& idx) const {
  TUTTI_CHECK_AS(InvalidArgument, whole(), "GPT::forward needs the whole model in one process");
  const int64_t B = idx.size(0), T = idx.size(1), C = config_.n_embd;
  Tensor x = embed(idx);
  for (const auto& block : blocks_) x = block->forward(x);
  x = ops::reshape(ln_f_->forward(x), {B * T, C});
  Tensor logits = ops::matmul(x, wte_->weight, false, true, wte_->weight_bf16);  // (B*T, V): tied to wte
  return ops::reshape(logits, {B, T, config_.vocab_size});
}

Tensor GPT::loss(const Tensor& idx, const Tensor& targets) const {
  TUTTI_CHECK_AS(InvalidArgument, partition_.embedding && partition_.head, "GPT::loss needs every layer (a pipeline stage holds only some)");
  TUTTI_CHECK_AS(InvalidArgument, targets.shape() == idx.shape(), "targets ", targets.str(), " do not match inputs ",
                 idx.str());
  return forward_part(idx, targets);
}

KVCache GPT::new_cache() const {
  TUTTI_CHECK_AS(InvalidArgument, whole(), "generation needs the whole model in one process");
  KVCache cache;
  const Device device = wte_->weight.device();
  for (int l = 0; l < config_.n_layer; ++l) {
    cache.keys.push_back(Tensor::zeros({config_.block_size, config_.n_embd}, DType::f32, device));
    cache.values.push_back(Tensor::zeros({config_.block_size, config_.n_embd}, DType::f32, device));
  }
  return cache;
}

Tensor GPT::forward_cached(const std::vector<int32_t>& tokens, KVCache& cache) const {
  NoGradGuard no_grad;
  TUTTI_CHECK_AS(InvalidArgument, whole(), "generation needs the whole model in one process");
  const int64_t n = static_cast<int64_t>(tokens.size()), past = cache.length, C = config_.n_embd;
  TUTTI_CHECK_AS(InvalidArgument, n > 0, "forward_cached needs at least one token");
  TUTTI_CHECK_AS(InvalidArgument, past + n <= config_.block_size, "positions up to ", past + n,
                 " exceed the context of ", config_.block_size);
  const Device device = wte_->weight.device();
  Tensor idx = Tensor::from_vector({n}, tokens).to(device);
  Tensor x = ops::add(wte_->forward(idx), wpe_->forward(positions(past, n, device)));  // (n, C)
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Block& b = *blocks_[l];
    Tensor qkv = b.attn.c_attn.forward(b.ln_1.forward(x));  // (n, 3C)
    cache.keys[l].slice(0, past, past + n).copy_(qkv.slice(1, C, 2 * C));
    cache.values[l].slice(0, past, past + n).copy_(qkv.slice(1, 2 * C, 3 * C));
    Tensor y = ops::cached_attention(qkv.slice(1, 0, C), cache.keys[l], cache.values[l], past, config_.n_head);
    x = ops::add(x, b.attn.c_proj.forward(y));
    x = ops::add(x, b.mlp.c_proj.forward(ops::gelu(b.mlp.c_fc.forward(b.ln_2.forward(x)))));
  }
  cache.length = past + n;
  Tensor last = ln_f_->forward(x.slice(0, n - 1, n));              // (1, C)
  return ops::matmul(last, wte_->weight, false, true).view({-1});  // (V)
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
