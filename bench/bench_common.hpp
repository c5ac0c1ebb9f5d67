// What the benchmarks share with each other and with their PyTorch peers.
#pragma once
#include "tutti/optim/adamw.hpp"

// torch.optim.AdamW's defaults (tutti's beta2 default is 0.99), weight decay 0.1, as the PyTorch
// peers (bench/torch_peer.py, bench/torch_ddp_peer.py) use.
inline tutti::optim::AdamWOptions torch_adamw_options() {
  tutti::optim::AdamWOptions o;
  o.lr = 1e-3f;
  o.beta1 = 0.9f;
  o.beta2 = 0.999f;
  o.eps = 1e-8f;
  o.weight_decay = 0.1f;
  return o;
}
