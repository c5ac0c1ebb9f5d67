// The training loop of `tutti train`: next batch -> forward -> zero grads -> backward -> clip ->
// update, with evaluation, metrics, progress and checkpoints at their intervals.
#pragma once
#include <ostream>
#include <string>

#include "tutti/comm/communicator.hpp"
#include "tutti/data/token_dataset.hpp"
#include "tutti/train/config.hpp"

namespace tutti::train {

struct TrainResult {
  int64_t steps = 0;
  double train_loss = 0.0;  // last evaluation (or last step when no evaluation ran)
  double val_loss = 0.0;
  double tokens_per_second = 0.0;       // over the whole run (evaluations and checkpoint waits included)
  double step_tokens_per_second = 0.0;  // at the median step, the first left out (0 with fewer than 2 steps)
  double energy_joules = -1.0;          // the hardware's counters over every rank; -1: none to read
  std::string checkpoint;   // the last checkpoint written
  std::string sample;       // generated at the end (sample_tokens bytes)
  int64_t skipped_steps = 0;  // updates skipped for a non-finite loss or gradient
  int64_t rollbacks = 0;      // returns to the last checkpoint after max_bad_steps of them in a row
  bool lead = false;          // this rank reports the run (training rank 0)
};

struct TrainOptions {
  bool resume = false;       // continue the run in config.out from its latest checkpoint
  comm::Communicator* world = nullptr;  // the ranks of the run (default: a world of one)
  std::ostream* log = nullptr;  // progress and log lines (default std::cout)
  bool live_progress = false;   // redraw one progress line (a terminal) instead of printing lines
  std::string trace;            // a Chrome trace / Perfetto JSON file of every rank's timeline ("": none)
};

TrainResult run_training(const TrainConfig& config, const TrainOptions& options);

// Reads a run directory's run.toml (for --resume); throws ConfigError when it has none.
TrainConfig load_run_config(const std::string& run_dir);

// Mean loss over `batches` fixed batches of a split (no autograd).
double evaluate(const nn::GPT& model, const data::TokenDataset& dataset, data::Split split, int batches,
                int batch_size, int64_t seed);

}  // namespace tutti::train
