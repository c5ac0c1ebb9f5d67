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

  // Mixed precision: under bf16 the matrix products read bf16 copies of the weight matrices
  // ("compute copies"), while the parameters, their gradients and the optimizer stay fp32. The
  // copies are made and re-rounded by refresh_compute_copies, which whoever changes the weights
  // calls afterwards (parallel::DataParallel after each update and each load); until the first
  // refresh, and under f32 (the default), the products read the fp32 weights (so a model that is
  // never refreshed, on the CPU say, computes in fp32). Children included.
  void set_compute_dtype(DType dtype);  // f32 or bf16
  DType compute_dtype() const { return compute_dtype_; }
  void refresh_compute_copies();
  // Under bf16, each (fp32 weight, compute copy) pair, children included; a copy is undefined until
  // the first refresh (and after the weight moved to another device, until the next). An
  // optimizer may write the copies in the pass that updates the weights (AdamWTensor::copy)
  // instead of calling refresh_compute_copies after it: a refresh rounds into the copies in place
  // once they exist, so the tensors stay the same.
  std::vector<std::pair<Tensor, Tensor>> compute_copies() const;

 protected:
  Tensor& register_parameter(const std::string& name, Tensor value);
  // `child` must live as long as this module (a member, or owned by one).
  void register_module(const std::string& name, Module& child);
  // Declares `copy` (a member of this module) the compute copy of parameter `weight`.
  void register_compute_copy(const Tensor& weight, Tensor& copy);

 private:
  std::vector<std::pair<std::string, Tensor>> params_;
  std::vector<std::pair<std::string, Module*>> children_;
  std::vector<std::pair<Tensor, Tensor*>> compute_copies_;  // (fp32 weight, its copy)
  DType compute_dtype_ = DType::f32;
};

// Initialisers (in place, on the CPU values; reproducible from the generator).
void normal_(Tensor& t, float stddev, Rng& rng);
void uniform_(Tensor& t, float low, float high, Rng& rng);

// y = x W + b with W stored (in, out), as Hugging Face's Conv1D.
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true);
  // out bf16: y rounded to bf16 for the product that reads it next (mixed precision only).
  Tensor forward(const Tensor& x, DType out = DType::f32) const;
  Tensor weight, bias;
  Tensor weight_bf16;  // compute copy under mixed precision (see Module), else undefined
};

class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t features, float eps = 1e-5f);
  // out bf16: the output rounded to bf16, for a mixed-precision product that reads it (GPU only).
  Tensor forward(const Tensor& x, DType out = DType::f32) const;
  Tensor weight, bias;
  float eps;
};

class Embedding : public Module {
 public:
  Embedding(int64_t count, int64_t dim);
  Tensor forward(const Tensor& indices) const;
  Tensor weight;
  Tensor weight_bf16;  // compute copy under mixed precision, for a tied output layer
};

}  // namespace tutti::nn
