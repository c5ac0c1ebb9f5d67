#include "tutti/nn/module.hpp"

#include "backend/backend.hpp"

#include "tutti/autograd/node.hpp"
#include "tutti/ops/ops.hpp"

namespace tutti::nn {

std::vector<std::pair<std::string, Tensor>> Module::named_parameters() const {
  std::vector<std::pair<std::string, Tensor>> out = params_;
  for (const auto& [name, child] : children_)
    for (auto& [sub, t] : child->named_parameters()) out.emplace_back(name + "." + sub, t);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [name, t] : named_parameters()) out.push_back(t);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const Tensor& t : parameters()) n += t.numel();
  return n;
}

void Module::zero_grad() {
  for (Tensor& t : parameters()) t.zero_grad();
}

void Module::to(Device device) {
  for (Tensor& t : parameters()) {
    if (t.device() == device) continue;
    Tensor moved = t.to(device);
    // Rebind the shared impl in place so every handle to this parameter sees the new storage.
    TensorImpl& impl = t.impl();
    impl.storage = moved.impl().storage;
    impl.offset = moved.impl().offset;
    impl.strides = moved.impl().strides;
    impl.grad.reset();
  }
}

void Module::set_compute_dtype(DType dtype) {
  TUTTI_CHECK_AS(InvalidArgument, dtype == DType::f32 || dtype == DType::bf16,
                 "modules compute in f32 or bf16, not ", dtype_name(dtype));
  compute_dtype_ = dtype;
  if (dtype == DType::f32)
    for (auto& [weight, copy] : compute_copies_) *copy = Tensor();
  for (auto& [name, child] : children_) child->set_compute_dtype(dtype);
}

namespace {
// A copy that can be rounded into in place: made for this weight where the weight now lives.
bool current_copy(const Tensor& weight, const Tensor& copy) {
  return copy.defined() && copy.dtype() == DType::bf16 && copy.shape() == weight.shape() &&
         copy.device() == weight.device();
}
}  // namespace

void Module::refresh_compute_copies() {
  NoGradGuard no_grad;
  if (compute_dtype_ == DType::bf16) {
    for (auto& [weight, copy] : compute_copies_) {
      if (current_copy(weight, *copy))
        backend_for(weight.device())
            .to_bf16(weight.contiguous().data<float>(), static_cast<BFloat16*>(copy->raw_data()), weight.numel());
      else
        *copy = ops::to_bf16(weight);  // on the weight's device, wherever to() has moved it
    }
  }
  for (auto& [name, child] : children_) child->refresh_compute_copies();
}

std::vector<std::pair<Tensor, Tensor>> Module::compute_copies() const {
  std::vector<std::pair<Tensor, Tensor>> out;
  if (compute_dtype_ == DType::bf16)
    for (const auto& [weight, copy] : compute_copies_)
      out.emplace_back(weight, current_copy(weight, *copy) ? *copy : Tensor());
  for (const auto& [name, child] : children_) {
    std::vector<std::pair<Tensor, Tensor>> more = child->compute_copies();
    out.insert(out.end(), more.begin(), more.end());
  }
  return out;
}

void Module::register_compute_copy(const Tensor& weight, Tensor& copy) { compute_copies_.emplace_back(weight, &copy); }

Tensor& Module::register_parameter(const std::string& name, Tensor value) {
  value.set_requires_grad(true);
  params_.emplace_back(name, value);
  return params_.back().second;
}

void Module::register_module(const std::string& name, Module& child) { children_.emplace_back(name, &child); }

void normal_(Tensor& t, float stddev, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  for (float& x : v) x = static_cast<float>(rng.normal() * stddev);
  t.copy_(Tensor::from_vector(t.shape(), v).to(t.device()));
}

void uniform_(Tensor& t, float low, float high, Rng& rng) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  for (float& x : v) x = low + static_cast<float>(rng.uniform()) * (high - low);
  t.copy_(Tensor::from_vector(t.shape(), v).to(t.device()));
}

Linear::Linear(int64_t in_features, int64_t out_features, bool with_bias) {
  TUTTI_CHECK_AS(InvalidArgument, in_features > 0 && out_features > 0, "Linear(", in_features, ", ", out_features,
                 "): sizes must be positive");
  weight = register_parameter("weight", Tensor::zeros({in_features, out_features}));
  if (with_bias) bias = register_parameter("bias", Tensor::zeros({out_features}));
  register_compute_copy(weight, weight_bf16);
}
Tensor Linear::forward(const Tensor& x, DType out) const { return ops::linear(x, weight, bias, weight_bf16, out); }

LayerNorm::LayerNorm(int64_t features, float eps_) : eps(eps_) {
  TUTTI_CHECK_AS(InvalidArgument, features > 0, "LayerNorm(", features, "): size must be positive");
  weight = register_parameter("weight", Tensor::full({features}, 1.0f));
  bias = register_parameter("bias", Tensor::zeros({features}));
}
Tensor LayerNorm::forward(const Tensor& x, DType out) const { return ops::layer_norm(x, weight, bias, eps, out); }

Embedding::Embedding(int64_t count, int64_t dim) {
  TUTTI_CHECK_AS(InvalidArgument, count > 0 && dim > 0, "Embedding(", count, ", ", dim, "): sizes must be positive");
  weight = register_parameter("weight", Tensor::zeros({count, dim}));
  register_compute_copy(weight, weight_bf16);
}
Tensor Embedding::forward(const Tensor& indices) const { return ops::embedding(indices, weight); }

}  // namespace tutti::nn
