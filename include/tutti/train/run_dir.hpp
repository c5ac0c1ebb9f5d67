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
#include <string>
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

// Writes checkpoint `state.step` of the run in `run_dir` (weights, AdamW moments in the
// single-process layout, trainer state) and prunes all but the newest `keep`. Returns the
// checkpoint directory.
std::string save_checkpoint(const std::string& run_dir, const nn::GPT& model, const NamedTensors& optimizer_state,
                            int64_t optimizer_steps, const TrainerState& state, int keep);

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
