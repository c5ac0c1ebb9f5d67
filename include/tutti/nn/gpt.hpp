// GPT-2 as in Hugging Face transformers: pre-LayerNorm blocks, learned positions, biases, GELU
// (tanh), LayerNorm eps 1e-5, LM head tied to the token embedding, GPT-2 initialisation.
// Parameter names match GPT2LMHeadModel's state dict without the "transformer." prefix.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tutti/comm/communicator.hpp"
#include "tutti/nn/module.hpp"
#include "tutti/parallel/tensor_parallel.hpp"

namespace tutti::nn {

struct GPTConfig {
  int n_layer = 4;
  int n_head = 4;
  int n_embd = 128;
  int block_size = 64;   // n_positions: the longest context
  int vocab_size = 256;
  float layer_norm_epsilon = 1e-5f;
  // The matrix products' operands: f32, or bf16 (mixed precision: fp32 weights, gradients and
  // optimizer, bf16 copies of the weights and activations for the products; GPU only).
  DType compute = DType::f32;
  void validate() const;  // throws ConfigError naming the bad value
  int64_t num_parameters() const;
  // Training FLOPs per token (forward + backward) at context T, as in the PaLM appendix: the
  // blocks and the LM head (what pipeline stages are balanced by).
  double flops_per_token(int T) const;
  double block_flops_per_token(int T) const;
  double head_flops_per_token() const;
};

// The part of the model a rank holds under model parallelism; the default is the whole model.
// A pipeline stage holds blocks [first_layer, end_layer); the first stage the embeddings, the last
// the final LayerNorm and the LM head, which is tied to wte: a last stage that is not also the first
// holds its own copy of wte, kept equal by summing the two copies' gradients. Under tensor
// parallelism (tp: the group, null for none) every block's matrices and the vocabulary rows of
// wte are split over the group (Megatron: attention by heads, the MLP by its hidden units).
struct GPTPartition {
  int first_layer = 0;
  int end_layer = -1;     // one past the last block held; -1: n_layer
  bool embedding = true;  // wte and wpe: the first pipeline stage
  bool head = true;       // ln_f and the LM head (wte): the last pipeline stage
  comm::Communicator* tp = nullptr;
};

// Key/value cache of one sequence for incremental decoding: per layer (block_size, C) each.
struct KVCache {
  std::vector<Tensor> keys, values;
  int64_t length = 0;  // positions filled
};

class GPT : public Module {
 public:
  // Throws ConfigError when the partition does not fit the model (layers out of range, heads or
  // vocabulary not divisible by the tensor-parallel size), naming the numbers.
  explicit GPT(const GPTConfig& config, const GPTPartition& partition = {});
  ~GPT() override;
  const GPTConfig& config() const { return config_; }
  const GPTPartition& partition() const { return partition_; }
  // The whole model in one process: no pipeline stages, no tensor parallelism.
  bool whole() const;

  // The parameters of the whole model, names and shapes, in registration order.
  static std::vector<std::pair<std::string, Shape>> full_parameter_shapes(const GPTConfig& config);
  // How the parameter `name` (a GPT parameter name) is split under tensor parallelism.
  static parallel::TensorSplit split_of(const std::string& name);

  // GPT-2 initialisation: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer),
  // biases zero, LayerNorm weights one. A part draws the whole model's values in the same order
  // and keeps its shards, so every layout starts from the same weights.
  void init_weights(Rng& rng);

  // This part's forward: `input` is idx (B, T) i32 on the first stage, else the activation
  // (B, T, C) from the previous stage. Returns the activation for the next stage, or on the last
  // stage the mean cross-entropy against `targets` (B, T) i32.
  Tensor forward_part(const Tensor& input, const Tensor& targets) const;

  // idx (B, T) i32 -> logits (B, T, V). The whole model only (as forward_cached).
  Tensor forward(const Tensor& idx) const;
  // Mean cross-entropy of the next-token predictions: idx, targets (B, T) i32 -> (). Any part
  // that holds every layer (tensor parallelism included).
  Tensor loss(const Tensor& idx, const Tensor& targets) const;

  // Inference without autograd: appends `tokens` (n) at cache.length and returns the logits of
  // the last one (V). The cache must have room (see new_cache).
  Tensor forward_cached(const std::vector<int32_t>& tokens, KVCache& cache) const;
  KVCache new_cache() const;

  struct Block;
 private:
  int tp_size() const { return partition_.tp ? partition_.tp->size() : 1; }
  comm::Communicator& tp_group() const;
  Tensor embed(const Tensor& idx) const;                      // (B, T) -> (B, T, C)
  Tensor head_loss(const Tensor& x, const Tensor& targets) const;  // (B, T, C) -> ()

  GPTConfig config_;
  GPTPartition partition_;
  std::unique_ptr<comm::Communicator> own_tp_;  // a world of one when partition.tp is null
  std::unique_ptr<Embedding> wte_, wpe_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::unique_ptr<LayerNorm> ln_f_;
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
