// Modules own parameters (tensors that require grad) and child modules, each under a name, so a
// model's parameters have stable dotted names ("h.0.attn.c_attn.weight") for checkpoints.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"

namespace tutti::nn {

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter with its dotted name, in registration order, children included.
  std::vector<std::pair<std::string, Tensor>> named_parameters() const;
  std::vector<Tensor> parameters() const;
  int64_t num_parameters() const;
  void zero_grad();
  // Moves every parameter to `device` (parameters keep their names and requires_grad).
  void to(Device device);

 protected:
  Tensor& register_parameter(const std::string& name, Tensor value);
  // `child` must live as long as this module (a member, or owned by one).
  void register_module(const std::string& name, Module& child);

 private:
  std::vector<std::pair<std::string, Tensor>> params_;
  std::vector<std::pair<std::string, Module*>> children_;
};

// Initialisers (in place, on the CPU values; reproducible from the generator).
void normal_(Tensor& t, float stddev, Rng& rng);
void uniform_(Tensor& t, float low, float high, Rng& rng);

// y = x W + b with W stored (in, out), as Hugging Face's Conv1D.
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true);
  Tensor forward(const Tensor& x) const;
  Tensor weight, bias;
};

class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t features, float eps = 1e-5f);
  Tensor forward(const Tensor& x) const;
  Tensor weight, bias;
  float eps;
};

class Embedding : public Module {
 public:
  Embedding(int64_t count, int64_t dim);
  Tensor forward(const Tensor& indices) const;
  Tensor weight;
};

}  // namespace tutti::nn
