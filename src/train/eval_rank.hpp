// --eval-rank R: one rank of the launch only evaluates. At each evaluation the training ranks'
// lead sends it a snapshot of the whole weights (gathered first under model parallelism); it
// computes the train and validation losses and a sample on the CPU with all its cores and sends
// them back, and the lead reports them against the step whose weights they used. Training never
// waits for it, unless the previous snapshot's report is still out when the next is due.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tutti/comm/communicator.hpp"
#include "tutti/data/token_dataset.hpp"
#include "tutti/nn/gpt.hpp"
#include "tutti/train/config.hpp"
#include "tutti/train/run_dir.hpp"

namespace tutti::train {

// Evaluation batches come from their own stream of the run's seed.
inline constexpr uint64_t kEvalStream = 0x5EEDE7A1ull;

// The losses of evaluation batches first, first + stride, ... < batches of `split` (batch_size
// sequences each, from the run seed's evaluation stream), summed.
double eval_loss_sum(const nn::GPT& model, const data::TokenDataset& data, data::Split split, int batches,
                     int batch_size, int64_t seed, int first = 0, int stride = 1);

// The losses of this replica's share of the evaluation batches (i = replica, replica + replicas,
// ... < eval_batches) summed, train split then validation, and a sample when `sample`.
struct EvalShare {
  std::array<double, 2> sums{};
  double seconds = 0.0;
  std::string sample;
};
EvalShare evaluate_share(const nn::GPT& model, const data::TokenDataset& data, const TrainConfig& config,
                         int64_t step, int replica, int replicas, bool sample);

struct EvalReport {
  int64_t step = 0;  // whose weights
  double train_loss = 0.0, val_loss = 0.0, seconds = 0.0;
  std::string sample;
};

// On the training ranks' lead: `world` is the whole launch, the evaluating rank among it.
class EvalRankClient {
 public:
  EvalRankClient(comm::Communicator& world, int eval_rank);
  ~EvalRankClient();  // tells the evaluating rank to stop
  EvalRankClient(const EvalRankClient&) = delete;
  EvalRankClient& operator=(const EvalRankClient&) = delete;

  // Sends a snapshot (the whole model's weights, single-process order); the previous one's
  // report must have been taken.
  void send(int64_t step, NamedTensors weights);
  bool pending() const { return pending_; }
  // The report, when it has arrived (never blocks).
  std::optional<EvalReport> poll();
  EvalReport wait();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  bool pending_ = false;
};

// On the evaluating rank: serves snapshots from `lead` until told to stop.
void serve_evaluations(const TrainConfig& config, comm::Communicator& world, int lead);

}  // namespace tutti::train
