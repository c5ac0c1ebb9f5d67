// Data parallelism: every rank of a dp group holds the whole model, runs forward and backward on
// its slice of the global batch, and the gradients are averaged across the group. Gradients are
// gathered into buckets (in the order backward produces them) and a bucket's reduction starts as
// soon as its last gradient is final, while backward is still running; the communicator's
// progress thread carries it. ZeRO stages shard the optimizer state (1) and the gradients (2)
// over the group: each rank updates its contiguous shard of the flattened parameters and the
// updated parameters are all-gathered.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tutti/comm/communicator.hpp"
#include "tutti/nn/module.hpp"
#include "tutti/optim/adamw.hpp"

namespace tutti::parallel {

struct DataParallelOptions {
  int64_t bucket_bytes = 4ll << 20;  // gradient bytes per bucket (bench/RESULTS.md: 4 MiB hid 97% here)
  int zero = 0;                       // 0: plain, 1: sharded optimizer state, 2: + sharded gradients
};

struct MemoryReport {
  int64_t parameter_bytes = 0, gradient_bytes = 0, optimizer_bytes = 0;  // per rank, persistent
  int64_t bucket_bytes = 0;                                              // communication buffers
};

struct CommStats {
  double backward_seconds = 0;  // from the start of backward to its end
  double exposed_seconds = 0;   // waiting for reductions after backward ended
  double comm_seconds = 0;      // from each bucket's launch to its completion, summed
};

class DataParallel {
 public:
  // Flattens the model's parameters into one buffer (in reverse registration order, the order
  // backward produces gradients) and broadcasts rank 0's values to the group.
  DataParallel(nn::Module& model, comm::Communicator& group, const optim::AdamWOptions& adamw,
               const DataParallelOptions& options);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Call before the backward of the last micro-batch of a step: gradients that become final
  // during that backward are reduced as they appear. Earlier micro-batches just accumulate.
  void begin_sync();
  // After that backward: waits for every bucket; afterwards each rank holds the group's summed
  // gradient (ZeRO 2: of its own shard only; ZeRO 0/1: param.grad() views it). grad_squares and
  // step divide by the group size: the mean without a pass of its own.
  void end_sync();
  // This rank's share of the squared L2 norm of the group's mean gradient, over the parameters `counted`
  // accepts (all when empty): summed over the group it is the squared norm. Model parallelism
  // sums it over the whole mesh, counting each replicated parameter once.
  double grad_squares(const std::function<bool(const std::string&)>& counted = {});
  // The optimizer update with learning rate lr and gradient scale (clipping); ZeRO 1/2 update
  // the local shard and all-gather the parameters. Then the model's compute copies (mixed
  // precision, nn::Module::set_compute_dtype) are re-rounded from the new weights.
  void step(float lr, float grad_scale);
  void zero_grad();

  int64_t steps_taken() const;
  // Optimizer moments in the single-process layout ("<name>.exp_avg", ...), gathered from the
  // shards: collective over the group.
  std::vector<std::pair<std::string, Tensor>> optimizer_state();
  // Restores moments (single-process layout, any dp it was written with) and the step count, and
  // re-rounds the model's compute copies: a resume or roll-back loads the weights just before.
  void load_optimizer_state(const std::vector<std::pair<std::string, Tensor>>& state, int64_t steps_taken);

  MemoryReport memory() const;
  const CommStats& last_stats() const;
  int64_t num_buckets() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tutti::parallel
