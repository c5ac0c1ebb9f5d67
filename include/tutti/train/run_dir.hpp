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

#include "tutti/nn/gpt.hpp"
#include "tutti/optim/adamw.hpp"

namespace tutti::train {

struct TrainerState {
  int64_t step = 0;            // optimizer steps completed
  int64_t seed = 0;
  std::string data_path;
  int64_t data_position = 0;   // the next batch index (batches depend only on seed and index)
  uint64_t sample_rng_state = 0;
  double last_loss = 0.0;
};

// Writes checkpoint `step` of the run in `run_dir` and prunes all but the newest `keep`.
// Returns the checkpoint directory.
std::string save_checkpoint(const std::string& run_dir, const nn::GPT& model, const optim::AdamW& optimizer,
                            const TrainerState& state, int keep);

// The checkpoint directory `dir` names: itself when it holds model.safetensors, else the one
// its `latest` file points to. Throws CheckpointError when neither.
std::string resolve_checkpoint(const std::string& dir);

// Loads weights, optimizer moments and trainer state from a checkpoint directory; validates
// everything before changing the model or the optimizer.
TrainerState load_checkpoint(const std::string& checkpoint_dir, nn::GPT& model, optim::AdamW& optimizer);

}  // namespace tutti::train
