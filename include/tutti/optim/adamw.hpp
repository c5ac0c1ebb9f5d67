// AdamW (decoupled weight decay, as torch.optim.AdamW), fused into one pass per parameter, with
// global-norm gradient clipping folded into the same pass.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "tutti/core/tensor.hpp"

namespace tutti::optim {

struct AdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
};

class AdamW {
 public:
  // Weight decay applies to parameters of two or more dimensions (matrices and embeddings),
  // not to biases and LayerNorm weights, as in nanoGPT and GPT-2 practice.
  AdamW(std::vector<std::pair<std::string, Tensor>> named_params, const AdamWOptions& options);

  // One update with learning rate `lr`; gradients are multiplied by `grad_scale` first.
  void step(float lr, float grad_scale = 1.0f);
  void zero_grad();
  int64_t steps_taken() const { return t_; }

  const AdamWOptions& options() const { return options_; }
  // Moments by parameter name ("<name>.exp_avg", "<name>.exp_avg_sq") for checkpoints.
  std::vector<std::pair<std::string, Tensor>> state() const;
  // Restores moments and the step count; throws CheckpointError on a missing or mis-shaped entry.
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state, int64_t steps_taken);

 private:
  struct Slot {
    std::string name;
    Tensor param, exp_avg, exp_avg_sq;
    bool decay;
  };
  std::vector<Slot> slots_;
  AdamWOptions options_;
  int64_t t_ = 0;
};

// The global L2 norm of the gradients (parameters without a gradient count as zero).
double grad_norm(const std::vector<Tensor>& params);
// The scale that brings the norm down to max_norm (1 when already below, or max_norm <= 0).
float clip_scale(double norm, float max_norm);

// Linear warmup from 0, then cosine decay to min_lr at decay_steps; min_lr after.
struct LrSchedule {
  float lr = 1e-3f;
  float min_lr = 1e-4f;
  int warmup_steps = 100;
  int decay_steps = 2000;
  bool cosine = true;  // false: constant lr after warmup
  float at(int64_t step) const;
};

}  // namespace tutti::optim
