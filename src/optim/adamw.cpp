#include "tutti/optim/adamw.hpp"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "backend/backend.hpp"
#include "optim/adamw_step.hpp"
#include "tutti/autograd/node.hpp"

namespace tutti::optim {

AdamW::AdamW(std::vector<std::pair<std::string, Tensor>> named_params, const AdamWOptions& options)
    : options_(options) {
  TUTTI_CHECK_AS(InvalidArgument, options.lr >= 0, "lr must be >= 0, got ", options.lr);
  TUTTI_CHECK_AS(InvalidArgument, options.beta1 >= 0 && options.beta1 < 1, "beta1 must be in [0, 1), got ", options.beta1);
  TUTTI_CHECK_AS(InvalidArgument, options.beta2 >= 0 && options.beta2 < 1, "beta2 must be in [0, 1), got ", options.beta2);
  TUTTI_CHECK_AS(InvalidArgument, options.weight_decay >= 0, "weight_decay must be >= 0, got ", options.weight_decay);
  std::unordered_set<const void*> starts;  // one update per element: the step is one launch on CUDA
  for (auto& [name, p] : named_params) {
    TUTTI_CHECK_AS(InvalidArgument, p.dtype() == DType::f32 && p.is_contiguous(), "AdamW: parameter '", name,
                   "' must be contiguous f32, got ", p.str());
    TUTTI_CHECK_AS(InvalidArgument, p.numel() == 0 || starts.insert(p.raw_data()).second, "AdamW: parameter '", name,
                   "' is given twice (its memory is another parameter's)");
    slots_.push_back({name, p, Tensor::zeros(p.shape(), DType::f32, p.device()),
                      Tensor::zeros(p.shape(), DType::f32, p.device()), p.ndim() >= 2});
  }
}

void AdamW::step(float lr, float grad_scale) {
  NoGradGuard no_grad;
  ++t_;
  const AdamWStep s = adamw_step(options_, t_, lr, grad_scale);
  // One call per device (the parameters may live on several); gradients kept alive until then.
  std::vector<Tensor> grads;
  std::vector<std::pair<Device, std::vector<AdamWTensor>>> per_device;
  for (Slot& slot : slots_) {
    Tensor g = slot.param.grad();
    if (!g.defined()) continue;  // a parameter that took no part in this step keeps its value
    grads.push_back(g.contiguous());
    const Device d = slot.param.device();
    auto it = std::find_if(per_device.begin(), per_device.end(), [&](const auto& e) { return e.first == d; });
    if (it == per_device.end()) it = per_device.insert(per_device.end(), {d, {}});
    it->second.push_back({slot.param.data<float>(), grads.back().data<float>(), slot.exp_avg.data<float>(),
                          slot.exp_avg_sq.data<float>(), slot.param.numel(), slot.decay});
  }
  for (const auto& [device, tensors] : per_device) backend_for(device).adamw(tensors, s);
}

void AdamW::zero_grad() {
  for (Slot& slot : slots_) slot.param.zero_grad();
}

std::vector<std::pair<std::string, Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const Slot& slot : slots_) {
    out.emplace_back(slot.name + ".exp_avg", slot.exp_avg);
    out.emplace_back(slot.name + ".exp_avg_sq", slot.exp_avg_sq);
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, Tensor>>& state, int64_t steps_taken) {
  TUTTI_CHECK_AS(CheckpointError, steps_taken >= 0, "optimizer step count ", steps_taken, " is negative");
  auto find = [&](const std::string& name, const Tensor& like) {
    for (const auto& [n, t] : state) {
      if (n != name) continue;
      TUTTI_CHECK_AS(CheckpointError, t.shape() == like.shape() && t.dtype() == DType::f32, "optimizer state '", name,
                     "' is ", t.str(), ", expected f32", like.shape().str());
      return t;
    }
    TUTTI_FAIL(CheckpointError, "optimizer state '", name, "' is missing");
  };
  // Validate everything before touching any slot, so a bad file changes nothing.
  std::vector<std::pair<Tensor, Tensor>> found;
  for (const Slot& slot : slots_)
    found.emplace_back(find(slot.name + ".exp_avg", slot.exp_avg), find(slot.name + ".exp_avg_sq", slot.exp_avg_sq));
  TUTTI_CHECK_AS(CheckpointError, state.size() == 2 * slots_.size(), "optimizer state has ", state.size(),
                 " tensors, expected ", 2 * slots_.size());
  for (size_t i = 0; i < slots_.size(); ++i) {
    slots_[i].exp_avg.copy_(found[i].first);
    slots_[i].exp_avg_sq.copy_(found[i].second);
  }
  t_ = steps_taken;
}

double grad_norm(const std::vector<Tensor>& params) {
  double total = 0.0;
  for (const Tensor& p : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    Tensor c = g.contiguous();
    total += backend_for(c.device()).sum_squares(c.data<float>(), c.numel());
  }
  return std::sqrt(total);
}

float clip_scale(double norm, float max_norm) {
  if (max_norm <= 0.0f || !(norm > max_norm)) return 1.0f;
  return static_cast<float>(max_norm / (norm + 1e-6));
}

float LrSchedule::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) return lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
  if (!cosine) return lr;
  if (step >= decay_steps) return min_lr;
  const double span = std::max(1, decay_steps - warmup_steps);
  const double ratio = static_cast<double>(step - warmup_steps) / span;
  const double coeff = 0.5 * (1.0 + std::cos(3.14159265358979323846 * ratio));
  return min_lr + static_cast<float>(coeff) * (lr - min_lr);
}

}  // namespace tutti::optim
