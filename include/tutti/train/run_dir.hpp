// The directory of a training run:
//   run.toml                 every setting of the run (written once at the start)
//   metrics.jsonl            one JSON object per step and per evaluation
//   checkpoints/step_NNNNNNNN/ config.json, model.safetensors (Hugging Face GPT-2),
//                            optimizer.safetensors (AdamW moments), trainer_state.json
//   latest                   the name of the newest complete checkpoint
// A checkpoint directory is written beside its final name and renamed into place, then `latest`
// is replaced atomically, so a crash at any point leaves the previous checkpoint intact.
#pragma once
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tutti/nn/gpt.hpp"

namespace tutti::train {

struct TrainerState {
  int64_t step = 0;            // optimizer steps completed
  int64_t seed = 0;
  std::string data_path;
  int64_t data_position = 0;   // the next batch index (batches depend only on seed and index)
  uint64_t sample_rng_state = 0;
  double last_loss = 0.0;
};

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Everything a checkpoint holds, copied out of the training state so that it can be written while
// training goes on.
struct CheckpointSnapshot {
  nn::GPTConfig config;
  NamedTensors weights;          // GPT::named_parameters() names, copies on the CPU
  NamedTensors optimizer_state;  // AdamW moments in the single-process layout
  int64_t optimizer_steps = 0;
  TrainerState state;
};
CheckpointSnapshot snapshot(const nn::GPT& model, NamedTensors optimizer_state, int64_t optimizer_steps,
                            const TrainerState& state);

// Writes checkpoint `snapshot.state.step` of the run in `run_dir` and prunes all but the newest
// `keep`. Returns the checkpoint directory.
std::string save_checkpoint(const std::string& run_dir, const CheckpointSnapshot& snapshot, int keep);

// Writes checkpoints on a background thread, one at a time: submit() waits for the previous
// write (rethrowing its error) and starts the next. The destructor waits too.
class CheckpointWriter {
 public:
  CheckpointWriter(std::string run_dir, int keep);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  void submit(CheckpointSnapshot snapshot);
  // Waits for the write in flight; returns the newest checkpoint written ("" when none).
  std::string wait();

 private:
  std::string run_dir_;
  int keep_;
  std::thread thread_;
  std::exception_ptr error_;
  std::string last_;
};

// The checkpoint directory `dir` names: itself when it holds model.safetensors, else the one
// its `latest` file points to. Throws CheckpointError when neither.
std::string resolve_checkpoint(const std::string& dir);

struct LoadedCheckpoint {
  TrainerState state;
  NamedTensors optimizer_state;  // to hand to the optimizer (any data-parallel layout)
  int64_t optimizer_steps = 0;
};

// Loads the weights into `model` and reads the trainer state and optimizer moments of a
// checkpoint directory; validates everything before changing the model.
LoadedCheckpoint load_checkpoint(const std::string& checkpoint_dir, nn::GPT& model);

}  // namespace tutti::train
