// The kernel arguments of AdamW update number t (1-based), shared by optim::AdamW and the sharded
// update of data parallelism so both run the very same arithmetic. Each tensor says whether its
// weight decay applies (AdamWTensor::decay).
#pragma once
#include <cmath>

#include "backend/backend.hpp"
#include "tutti/optim/adamw.hpp"

namespace tutti::optim {

inline AdamWStep adamw_step(const AdamWOptions& o, int64_t t, float lr, float grad_scale) {
  AdamWStep s{};
  s.lr = lr;
  s.beta1 = o.beta1;
  s.beta2 = o.beta2;
  s.eps = o.eps;
  s.weight_decay = o.weight_decay;
  s.bias_correction1 = 1.0f - static_cast<float>(std::pow(double(o.beta1), double(t)));
  s.bias_correction2 = 1.0f - static_cast<float>(std::pow(double(o.beta2), double(t)));
  s.grad_scale = grad_scale;
  return s;
}

}  // namespace tutti::optim
