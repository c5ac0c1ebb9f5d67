// GPT-2 as in Hugging Face transformers: pre-LayerNorm blocks, learned positions, biases, GELU
// (tanh), LayerNorm eps 1e-5, LM head tied to the token embedding, GPT-2 initialisation.
// Parameter names match GPT2LMHeadModel's state dict without the "transformer." prefix.
#pragma once
#include <memory>
#include <vector>

#include "tutti/nn/module.hpp"

namespace tutti::nn {

struct GPTConfig {
  int n_layer = 4;
  int n_head = 4;
  int n_embd = 128;
  int block_size = 64;   // n_positions: the longest context
  int vocab_size = 256;
  float layer_norm_epsilon = 1e-5f;
  void validate() const;  // throws ConfigError naming the bad value
  int64_t num_parameters() const;
  // Training FLOPs per token (forward + backward) at context T, as in the PaLM appendix.
  double flops_per_token(int T) const;
};

// Key/value cache of one sequence for incremental decoding: per layer (block_size, C) each.
struct KVCache {
  std::vector<Tensor> keys, values;
  int64_t length = 0;  // positions filled
};

class GPT : public Module {
 public:
  explicit GPT(const GPTConfig& config);
  ~GPT() override;
  const GPTConfig& config() const { return config_; }

  // GPT-2 initialisation: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer),
  // biases zero, LayerNorm weights one.
  void init_weights(Rng& rng);

  // idx (B, T) i32 -> logits (B, T, V)
  Tensor forward(const Tensor& idx) const;
  // Mean cross-entropy of the next-token predictions: idx, targets (B, T) i32 -> ()
  Tensor loss(const Tensor& idx, const Tensor& targets) const;

  // Inference without autograd: appends `tokens` (n) at cache.length and returns the logits of
  // the last one (V). The cache must have room (see new_cache).
  Tensor forward_cached(const std::vector<int32_t>& tokens, KVCache& cache) const;
  KVCache new_cache() const;

  struct Block;
 private:
  GPTConfig config_;
  Embedding wte_, wpe_;
  std::vector<std::unique_ptr<Block>> blocks_;
  LayerNorm ln_f_;
};

// Sampling settings for generate().
struct SampleOptions {
  int max_tokens = 200;
  float temperature = 1.0f;  // 0: greedy (argmax), deterministic
  int top_k = 0;             // 0: no top-k filter
  uint64_t seed = 0;
};

// Continues `prompt` with the KV cache; returns only the new tokens. When the context is full it
// keeps the most recent half and re-fills the cache.
std::vector<int32_t> generate(const GPT& model, const std::vector<int32_t>& prompt, const SampleOptions& options);

}  // namespace tutti::nn
