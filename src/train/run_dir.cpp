#include "tutti/train/run_dir.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "tutti/ckpt/gpt_checkpoint.hpp"
#include "tutti/ckpt/safetensors.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

constexpr const char* kStateFormat = "tutti-trainer-state/1";

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  TUTTI_CHECK_AS(CheckpointError, in.good(), "cannot read '", path.string(), "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void prune(const fs::path& checkpoints, int keep) {
  std::vector<fs::path> done;
  for (const auto& e : fs::directory_iterator(checkpoints)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.rfind("step_", 0) == 0 && name.find('.') == std::string::npos) done.push_back(e.path());
  }
  std::sort(done.begin(), done.end());
  for (size_t i = 0; i + static_cast<size_t>(keep) < done.size(); ++i) fs::remove_all(done[i]);
}

}  // namespace

CheckpointSnapshot snapshot(const nn::GPT& model, NamedTensors optimizer_state, int64_t optimizer_steps,
                            const TrainerState& state) {
  CheckpointSnapshot s{model.config(), {}, std::move(optimizer_state), optimizer_steps, state};
  for (auto& [name, t] : model.named_parameters()) s.weights.emplace_back(name, t.to(Device::cpu()).clone());
  return s;
}

CheckpointWriter::CheckpointWriter(std::string run_dir, int keep) : run_dir_(std::move(run_dir)), keep_(keep) {}

CheckpointWriter::~CheckpointWriter() {
  if (thread_.joinable()) thread_.join();
}

void CheckpointWriter::submit(CheckpointSnapshot snap) {
  wait();
  thread_ = std::thread([this, snap = std::move(snap)] {
    try {
      last_ = save_checkpoint(run_dir_, snap, keep_);
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

std::string CheckpointWriter::wait() {
  if (thread_.joinable()) thread_.join();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return last_;
}

std::string save_checkpoint(const std::string& run_dir, const CheckpointSnapshot& snap, int keep) {
  const TrainerState& state = snap.state;
  const fs::path checkpoints = fs::path(run_dir) / "checkpoints";
  fs::create_directories(checkpoints);
  const std::string name = step_name(state.step);
  const fs::path final_dir = checkpoints / name, tmp = checkpoints / (name + ".tmp"), old = checkpoints / (name + ".old");
  fs::remove_all(tmp);  // a leftover of an interrupted save
  fs::create_directories(tmp);
  ckpt::save_gpt(tmp.string(), snap.config, snap.weights);
  ckpt::write_safetensors((tmp / "optimizer.safetensors").string(), snap.optimizer_state);
  nlohmann::json j = {{"format", kStateFormat},
                      {"step", state.step},
                      {"optimizer_steps", snap.optimizer_steps},
                      {"seed", state.seed},
                      {"data", {{"path", state.data_path}, {"position", state.data_position}}},
                      {"sample_rng_state", std::to_string(state.sample_rng_state)},
                      {"last_loss", state.last_loss}};
  ckpt::write_file_atomic((tmp / "trainer_state.json").string(), j.dump(2) + "\n");
  ckpt::fsync_directory(tmp.string());
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(tmp, final_dir);
  ckpt::fsync_directory(checkpoints.string());
  ckpt::write_file_atomic((fs::path(run_dir) / "latest").string(), name + "\n");
  fs::remove_all(old);
  prune(checkpoints, keep);
  return final_dir.string();
}

std::string resolve_checkpoint(const std::string& dir) {
  const fs::path p(dir);
  TUTTI_CHECK_AS(CheckpointError, fs::is_directory(p), "checkpoint '", dir, "' is not a directory");
  if (fs::exists(p / "model.safetensors")) return p.string();
  TUTTI_CHECK_AS(CheckpointError, fs::exists(p / "latest"), "'", dir,
                 "' is neither a checkpoint (no model.safetensors) nor a run directory (no 'latest' file)");
  std::string name = read_text(p / "latest");
  while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
  TUTTI_CHECK_AS(CheckpointError, !name.empty() && name.find('/') == std::string::npos && name.find("..") == std::string::npos,
                 "'", (p / "latest").string(), "' does not name a checkpoint: '", name, "'");
  const fs::path ckpt = p / "checkpoints" / name;
  TUTTI_CHECK_AS(CheckpointError, fs::exists(ckpt / "model.safetensors"), "latest checkpoint '", ckpt.string(),
                 "' of run '", dir, "' is missing");
  return ckpt.string();
}

LoadedCheckpoint load_checkpoint(const std::string& checkpoint_dir, nn::GPT& model) {
  const fs::path dir(checkpoint_dir);
  const std::string state_path = (dir / "trainer_state.json").string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text(state_path));
  } catch (const nlohmann::json::exception& e) {
    TUTTI_FAIL(CheckpointError, "'", state_path, "' is not valid JSON: ", e.what());
  }
  TrainerState s;
  try {
    TUTTI_CHECK_AS(CheckpointError, j.at("format") == kStateFormat, "'", state_path, "' has an unknown format");
    s.step = j.at("step").get<int64_t>();
    s.seed = j.at("seed").get<int64_t>();
    s.data_path = j.at("data").at("path").get<std::string>();
    s.data_position = j.at("data").at("position").get<int64_t>();
    s.sample_rng_state = std::stoull(j.at("sample_rng_state").get<std::string>());
    s.last_loss = j.at("last_loss").get<double>();
  } catch (const nlohmann::json::exception& e) {
    TUTTI_FAIL(CheckpointError, "'", state_path, "': ", e.what());
  }
  const int64_t opt_steps = j.value("optimizer_steps", s.step);
  TUTTI_CHECK_AS(CheckpointError, s.step >= 0 && opt_steps >= 0, "'", state_path, "': negative step");
  // Read and check everything, then apply.
  const nn::GPTConfig cfg = ckpt::load_gpt_config(checkpoint_dir);
  const nn::GPTConfig& want = model.config();
  TUTTI_CHECK_AS(CheckpointError,
                 cfg.n_layer == want.n_layer && cfg.n_head == want.n_head && cfg.n_embd == want.n_embd &&
                     cfg.block_size == want.block_size && cfg.vocab_size == want.vocab_size,
                 "checkpoint '", checkpoint_dir, "' holds a model of ", cfg.n_layer, " layers, ", cfg.n_head,
                 " heads, dim ", cfg.n_embd, ", context ", cfg.block_size, "; the run expects ", want.n_layer,
                 " layers, ", want.n_head, " heads, dim ", want.n_embd, ", context ", want.block_size);
  LoadedCheckpoint loaded{s, ckpt::read_safetensors((dir / "optimizer.safetensors").string()).tensors, opt_steps};
  ckpt::load_gpt_weights(checkpoint_dir, model);
  return loaded;
}

}  // namespace tutti::train
