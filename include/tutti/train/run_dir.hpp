// The directory of a training run:
//   run.toml                 every setting of the run (written once at the start)
//   metrics.jsonl            one JSON object per step and per evaluation
//   checkpoints/step_NNNNNNNN/ config.json, model.safetensors (Hugging Face GPT-2),
//                            optimizer.safetensors (AdamW moments), trainer_state.json,
//                            manifest.json (written last: step, layout, size + XXH3-64 per file)
//   latest                   the name of the newest complete checkpoint
// A checkpoint directory is written beside its final name and renamed into place, then `latest`
// is replaced atomically, so a crash at any point leaves the previous checkpoint intact. Every
// load verifies the manifest; a damaged checkpoint of a run is skipped for the newest good one.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tutti/ckpt/manifest.hpp"
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
// Under pipeline parallelism every stage writes its own shard (shard of shards) of the weights and
// optimizer state, whole tensors in the single-process layout, into the same directory at once;
// shard 0 commits the checkpoint when every shard is there.
struct CheckpointSnapshot {
  nn::GPTConfig config;
  NamedTensors weights;          // GPT::named_parameters() names, copies on the CPU
  NamedTensors optimizer_state;  // AdamW moments in the single-process layout
  int64_t optimizer_steps = 0;
  TrainerState state;
  ckpt::CheckpointLayout layout;  // the job that writes it, recorded in the manifest
  int shard = 0, shards = 1;      // this writer's pipeline stage, and the number of stages
  double shard_wait_seconds = 600;  // shard 0 waits this long for the others' files
};
CheckpointSnapshot snapshot(const nn::GPT& model, NamedTensors optimizer_state, int64_t optimizer_steps,
                            const TrainerState& state, const ckpt::CheckpointLayout& layout = {});

// "xxh3_64:<16 hex>" of the model shape (layers, heads, width, context, vocabulary, epsilon): equal
// exactly when two configurations build the same parameters.
std::string config_hash(const nn::GPTConfig& config);

// Writes checkpoint `snapshot.state.step` of the run in `run_dir` and prunes all but the newest
// `keep`. Returns the checkpoint directory. On failure (a full disk, say) the temporary directory
// is removed, the previous checkpoints and `latest` are left as they were, and CheckpointError
// says what failed.
std::string save_checkpoint(const std::string& run_dir, const CheckpointSnapshot& snapshot, int keep);

// Before a sharded save (shards > 1) of checkpoint `step`, on the writer of shard 0 and before any
// other writer starts: an empty temporary directory for the shards (a leftover is removed).
void prepare_sharded_save(const std::string& run_dir, int64_t step);

// ============================================================================================
// Verification and choice of a checkpoint
// ============================================================================================

// What is wrong with a checkpoint directory, if anything: manifest.json present and valid, listing
// config.json, model.safetensors, optimizer.safetensors and trainer_state.json, every listed file
// present with its size and checksum, and the step matching a step_N directory name.
struct CheckpointCheck {
  std::string dir;
  std::optional<ckpt::Manifest> manifest;  // absent when missing or unreadable
  std::vector<ckpt::FileCheck> files;      // one per file the manifest lists
  std::vector<std::string> problems;       // "model.safetensors: checksum mismatch (...)", ...
  bool ok() const { return problems.empty(); }
  std::string summary() const;  // the problems joined by "; "
};
CheckpointCheck verify_checkpoint(const std::string& checkpoint_dir);

// The checkpoints of a run, "step_NNNNNNNN" directory names by ascending step; leftovers of
// interrupted saves (step_N.tmp, step_N.old) are not checkpoints.
std::vector<std::string> list_checkpoints(const std::string& run_dir);

struct CheckpointChoice {
  std::string dir;   // the checkpoint directory to load
  std::string note;  // "" or one line: which newer checkpoints were skipped and why
};
// The checkpoint `dir` names, verified:
// - a checkpoint directory (it holds model.safetensors, manifest.json or trainer_state.json):
//   itself if good, else CheckpointError naming every problem; no fallback. A directory with
//   neither manifest.json nor trainer_state.json is a plain model directory (ckpt::save_gpt,
//   transformers' save_pretrained): it has no checksums and is returned as it is.
// - a run directory (it holds `latest` or checkpoints/): the checkpoint `latest` names if good,
//   else the newest good one among checkpoints/step_*, with a note saying which and why. When none
//   is good, CheckpointError naming what is wrong with each. Nothing is deleted.
CheckpointChoice choose_checkpoint(const std::string& dir);
// choose_checkpoint(dir).dir; a note is printed on stderr as "tutti: warning: <note>".
std::string resolve_checkpoint(const std::string& dir);

struct LoadedCheckpoint {
  TrainerState state;
  NamedTensors optimizer_state;  // to hand to the optimizer (any data-parallel layout)
  int64_t optimizer_steps = 0;
  ckpt::Manifest manifest;       // step, the layout that wrote it, config hash, files
};

// Loads the weights into `model` and reads the trainer state and optimizer moments of a
// checkpoint directory; verifies the manifest and validates everything before changing the
// model. A checkpoint without a manifest is refused.
LoadedCheckpoint load_checkpoint(const std::string& checkpoint_dir, nn::GPT& model);

// ============================================================================================
// Inspection (tutti inspect)
// ============================================================================================

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  uint64_t bytes = 0;
};
struct TensorFileInfo {
  std::string file;  // "model.safetensors", "optimizer.safetensors"
  std::vector<TensorInfo> tensors;
};
// Everything a checkpoint holds, read without a model, and every problem found on the way.
struct CheckpointReport {
  CheckpointCheck check;
  std::optional<nn::GPTConfig> config;
  std::optional<TrainerState> state;
  int64_t optimizer_steps = 0;
  std::vector<TensorFileInfo> tensor_files;
  std::vector<std::string> problems;  // check.problems and those of reading the files
};
CheckpointReport inspect_checkpoint(const std::string& checkpoint_dir);

}  // namespace tutti::train
