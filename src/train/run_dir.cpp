// Checkpoint directories of a run: the commit protocol (temporary directory, manifest written
// last, fsync, rename, then `latest`), verification against the manifest, the choice of the newest
// good checkpoint when newer ones are damaged, and the read-only inspection behind `tutti inspect`.
#include "tutti/train/run_dir.hpp"

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "tutti/ckpt/gpt_checkpoint.hpp"
#include "tutti/ckpt/safetensors.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

constexpr const char* kStateFormat = "tutti-trainer-state/1";
// The files every training checkpoint lists in its manifest; the model and optimizer state are
// model.safetensors and optimizer.safetensors, or per pipeline stage model-0000k-of-0000n.safetensors
// (with transformers' model.safetensors.index.json) and optimizer-0000k-of-0000n.safetensors.
const std::vector<std::string> kRequiredFiles = {"config.json", "trainer_state.json"};
constexpr const char* kModelIndex = "model.safetensors.index.json";

std::string shard_marker(int shard) { return "shard-" + std::to_string(shard) + ".done"; }

// The files of `stem` ("model", "optimizer") among a checkpoint's files, in shard order.
std::vector<std::string> files_of(const std::map<std::string, ckpt::FileDigest>& files, const std::string& stem) {
  std::vector<std::string> out;
  for (const auto& [name, digest] : files)
    if (name == stem + ".safetensors" || (name.rfind(stem + "-", 0) == 0 && name.ends_with(".safetensors")))
      out.push_back(name);
  return out;  // std::map: sorted, and the shard numbers are zero-padded
}

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

// The step of a "step_<digits>" name, or -1.
int64_t step_of(const std::string& name) {
  if (name.rfind("step_", 0) != 0 || name.size() == 5 || name.size() > 5 + 18) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(5));
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  TUTTI_CHECK_AS(CheckpointError, in.good(), "cannot read '", path.string(), "'");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void prune(const fs::path& checkpoints, int keep) {
  const std::vector<std::string> done = list_checkpoints(checkpoints.parent_path().string());
  for (size_t i = 0; i + static_cast<size_t>(keep) < done.size(); ++i) fs::remove_all(checkpoints / done[i]);
}

// trainer_state.json of a checkpoint directory; `optimizer_steps` gets its optimizer step count.
TrainerState read_trainer_state(const fs::path& dir, int64_t& optimizer_steps) {
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
    optimizer_steps = j.value("optimizer_steps", s.step);
  } catch (const nlohmann::json::exception& e) {
    TUTTI_FAIL(CheckpointError, "'", state_path, "': ", e.what());
  } catch (const std::logic_error& e) {  // std::stoull
    TUTTI_FAIL(CheckpointError, "'", state_path, "': sample_rng_state is not a number");
  }
  TUTTI_CHECK_AS(CheckpointError, s.step >= 0 && optimizer_steps >= 0, "'", state_path, "': negative step");
  return s;
}

bool is_checkpoint_dir(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p / "model.safetensors", ec) || fs::exists(p / kModelIndex, ec) ||
         fs::exists(p / ckpt::kManifestFile, ec) || fs::exists(p / "trainer_state.json", ec);
}

bool is_run_dir(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p / "latest", ec) || fs::is_directory(p / "checkpoints", ec);
}

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? sep : "") + parts[i];
  return out;
}

// Waits until every other shard's writer has left its marker in `tmp`; throws after `seconds`.
void wait_for_shards(const fs::path& tmp, int shards, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (int k = 1; k < shards; ++k) {
    std::error_code ec;
    while (!fs::exists(tmp / shard_marker(k), ec)) {
      TUTTI_CHECK_AS(CheckpointError, std::chrono::steady_clock::now() < deadline, "shard ", k, " of ", shards,
                     " was not written within ", seconds, " s");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  for (int k = 1; k < shards; ++k) fs::remove(tmp / shard_marker(k));
}

// The writing half of save_checkpoint: this shard's files into `tmp`; shard 0 also the config,
// the trainer state and, once every shard is there, the index and the manifest, last, fsynced.
void write_checkpoint_files(const fs::path& tmp, const CheckpointSnapshot& snap) {
  const TrainerState& state = snap.state;
  fs::create_directories(tmp);
  const std::string model = ckpt::shard_file_name("model", snap.shard, snap.shards),
                    optimizer = ckpt::shard_file_name("optimizer", snap.shard, snap.shards);
  ckpt::write_gpt_tensors((tmp / model).string(), snap.weights);
  ckpt::write_safetensors((tmp / optimizer).string(), snap.optimizer_state);
  if (snap.shard > 0) {  // shard 0 commits: tell it this shard is complete
    ckpt::write_file_atomic((tmp / shard_marker(snap.shard)).string(), "done\n");
    return;
  }
  ckpt::save_gpt_config(tmp.string(), snap.config);
  nlohmann::json j = {{"format", kStateFormat},
                      {"step", state.step},
                      {"optimizer_steps", snap.optimizer_steps},
                      {"seed", state.seed},
                      {"data", {{"path", state.data_path}, {"position", state.data_position}}},
                      {"sample_rng_state", std::to_string(state.sample_rng_state)},
                      {"last_loss", state.last_loss}};
  ckpt::write_file_atomic((tmp / "trainer_state.json").string(), j.dump(2) + "\n");
  std::vector<std::string> files = kRequiredFiles;
  if (snap.shards > 1) {
    wait_for_shards(tmp, snap.shards, snap.shard_wait_seconds);
    std::vector<std::string> models;
    for (int k = 0; k < snap.shards; ++k) {
      models.push_back(ckpt::shard_file_name("model", k, snap.shards));
      files.push_back(models.back());
      files.push_back(ckpt::shard_file_name("optimizer", k, snap.shards));
    }
    ckpt::write_gpt_index(tmp.string(), models);
    files.push_back(kModelIndex);
  } else {
    files.insert(files.end(), {model, optimizer});
  }
  ckpt::write_manifest(tmp.string(), state.step, snap.layout, config_hash(snap.config), files);
  ckpt::fsync_directory(tmp.string());
}

}  // namespace

// ============================================================================================
// Saving
// ============================================================================================

CheckpointSnapshot snapshot(const nn::GPT& model, NamedTensors optimizer_state, int64_t optimizer_steps,
                            const TrainerState& state, const ckpt::CheckpointLayout& layout) {
  CheckpointSnapshot s{model.config(), {}, std::move(optimizer_state), optimizer_steps, state, layout};
  for (auto& [name, t] : model.named_parameters()) s.weights.emplace_back(name, t.to(Device::cpu()).clone());
  return s;
}

std::string config_hash(const nn::GPTConfig& c) {
  char text[256];
  std::snprintf(text, sizeof text, "gpt2 n_layer=%d n_head=%d n_embd=%d n_positions=%d vocab_size=%d eps=%.9g",
                c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, double(c.layer_norm_epsilon));
  return "xxh3_64:" + ckpt::hex64(ckpt::xxh3_64(text));
}

void prepare_sharded_save(const std::string& run_dir, int64_t step) {
  const fs::path tmp = fs::path(run_dir) / "checkpoints" / (step_name(step) + ".tmp");
  fs::remove_all(tmp);  // a leftover of an interrupted save
  fs::create_directories(tmp);
}

std::string save_checkpoint(const std::string& run_dir, const CheckpointSnapshot& snap, int keep) {
  const fs::path checkpoints = fs::path(run_dir) / "checkpoints";
  const std::string name = step_name(snap.state.step);
  const fs::path final_dir = checkpoints / name, tmp = checkpoints / (name + ".tmp"), old = checkpoints / (name + ".old");
  const std::string what = "cannot save checkpoint " + name + " of run '" + run_dir + "': ";
  const std::string unchanged = "; the previous checkpoints and 'latest' are unchanged";
  try {
    fs::create_directories(checkpoints);
    if (snap.shards == 1) fs::remove_all(tmp);  // a leftover of an interrupted save (sharded: prepare_sharded_save)
    write_checkpoint_files(tmp, snap);
    if (snap.shard > 0) return tmp.string();  // shard 0 commits
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);  // frees the space a full disk needs back; nothing else to do on error
    TUTTI_FAIL(CheckpointError, what, e.what(), unchanged);
  }
  try {
    std::error_code ec;
    if (fs::exists(final_dir)) fs::rename(final_dir, old);  // the same step saved again
    fs::rename(tmp, final_dir, ec);
    if (ec) {
      if (fs::exists(old)) fs::rename(old, final_dir);
      fs::remove_all(tmp);
      TUTTI_FAIL(CheckpointError, what, "rename of ", tmp.string(), " failed: ", ec.message(), unchanged);
    }
    ckpt::fsync_directory(checkpoints.string());
  } catch (const fs::filesystem_error& e) {
    TUTTI_FAIL(CheckpointError, what, e.what());
  }
  try {
    ckpt::write_file_atomic((fs::path(run_dir) / "latest").string(), name + "\n");
  } catch (const std::exception& e) {
    TUTTI_FAIL(CheckpointError, "checkpoint ", final_dir.string(), " is complete but 'latest' was not updated: ",
               e.what(), "; 'latest' still names the previous checkpoint");
  }
  try {
    fs::remove_all(old);
    prune(checkpoints, keep);
  } catch (const fs::filesystem_error& e) {
    TUTTI_FAIL(CheckpointError, "checkpoint ", final_dir.string(), " is saved, but pruning old ones failed: ", e.what());
  }
  return final_dir.string();
}

// ============================================================================================
// Verification and choice
// ============================================================================================

std::string CheckpointCheck::summary() const { return join(problems, "; "); }

CheckpointCheck verify_checkpoint(const std::string& checkpoint_dir) {
  CheckpointCheck c;
  c.dir = checkpoint_dir;
  const fs::path dir(checkpoint_dir);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    c.problems.push_back("not a directory");
    return c;
  }
  if (!fs::exists(dir / ckpt::kManifestFile, ec)) {
    c.problems.push_back(std::string(ckpt::kManifestFile) +
                         ": missing (the save did not finish, or this is not a tutti training checkpoint)");
    return c;
  }
  try {
    c.manifest = ckpt::read_manifest(checkpoint_dir);
  } catch (const CheckpointError& e) {
    // read_manifest names the path; keep the file name only, the caller names the directory
    std::string msg = e.what();
    const std::string path = (dir / ckpt::kManifestFile).string();
    if (msg.rfind(path, 0) == 0) msg = std::string(ckpt::kManifestFile) + msg.substr(path.size());
    c.problems.push_back(msg);
    return c;
  }
  for (const std::string& required : kRequiredFiles)
    if (!c.manifest->files.count(required))
      c.problems.push_back(std::string(ckpt::kManifestFile) + " does not list " + required);
  for (const char* stem : {"model", "optimizer"})
    if (files_of(c.manifest->files, stem).empty())
      c.problems.push_back(std::string(ckpt::kManifestFile) + " does not list " + stem + ".safetensors");
  if (files_of(c.manifest->files, "model").size() > 1 && !c.manifest->files.count(kModelIndex))
    c.problems.push_back(std::string(ckpt::kManifestFile) + " does not list " + kModelIndex);
  const int64_t named_step = step_of(dir.filename().string());
  if (named_step >= 0 && named_step != c.manifest->step)
    c.problems.push_back(std::string(ckpt::kManifestFile) + " is of step " + std::to_string(c.manifest->step) +
                         " but the directory is " + dir.filename().string());
  c.files = ckpt::check_files(checkpoint_dir, *c.manifest);
  for (const ckpt::FileCheck& f : c.files)
    if (!f.problem.empty()) c.problems.push_back(f.name + ": " + f.problem);
  return c;
}

std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  const fs::path checkpoints = fs::path(run_dir) / "checkpoints";
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(checkpoints, ec)) return {};
  for (const auto& e : fs::directory_iterator(checkpoints)) {
    const std::string name = e.path().filename().string();
    const int64_t step = step_of(name);
    if (step >= 0 && e.is_directory()) found.emplace_back(step, name);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> names;
  for (auto& [step, name] : found) names.push_back(std::move(name));
  return names;
}

CheckpointChoice choose_checkpoint(const std::string& dir) {
  const fs::path p(dir);
  std::error_code ec;
  TUTTI_CHECK_AS(CheckpointError, fs::is_directory(p, ec), "checkpoint '", dir, "' is not a directory");
  if (is_checkpoint_dir(p)) {
    if (!fs::exists(p / ckpt::kManifestFile, ec) && !fs::exists(p / "trainer_state.json", ec))
      return {p.string(), ""};  // a plain model directory: no checksums to verify
    const CheckpointCheck check = verify_checkpoint(p.string());
    TUTTI_CHECK_AS(CheckpointError, check.ok(), "checkpoint '", dir, "' is damaged: ", check.summary());
    return {p.string(), ""};
  }
  TUTTI_CHECK_AS(CheckpointError, is_run_dir(p), "'", dir,
                 "' is neither a checkpoint (no model.safetensors) nor a run directory (no 'latest' file)");

  // Candidates: the one `latest` names, then every checkpoint, newest first.
  std::vector<std::string> reasons;  // why candidates were passed over, for the note
  std::vector<std::string> candidates;
  const fs::path latest_file = p / "latest";
  if (fs::exists(latest_file, ec)) {
    std::string name;
    try {
      name = read_text(latest_file);
    } catch (const CheckpointError&) {
      reasons.push_back("'latest' cannot be read");
    }
    while (!name.empty() && (name.back() == '\n' || name.back() == '\r' || name.back() == ' ')) name.pop_back();
    if (step_of(name) < 0) {
      if (reasons.empty()) reasons.push_back("'latest' does not name a checkpoint");
    } else if (!fs::is_directory(p / "checkpoints" / name, ec)) {
      reasons.push_back("'latest' names " + name + ", which does not exist");
    } else {
      candidates.push_back(name);
    }
  } else {
    reasons.push_back("'latest' is missing");
  }
  std::vector<std::string> all = list_checkpoints(dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    if (candidates.empty() || *it != candidates.front()) candidates.push_back(*it);

  std::vector<std::string> damaged, damaged_names, damaged_why;  // "step_N (why)", "step_N", "why"
  for (const std::string& name : candidates) {
    const CheckpointCheck check = verify_checkpoint((p / "checkpoints" / name).string());
    if (!check.ok()) {
      damaged.push_back(name + " (" + check.summary() + ")");
      damaged_names.push_back(name);
      damaged_why.push_back(check.summary());
      continue;
    }
    if (damaged.size() == 1) reasons.push_back("checkpoint " + damaged_names[0] + " is damaged (" + damaged_why[0] + ")");
    if (damaged.size() > 1) reasons.push_back("checkpoints " + join(damaged, ", ") + " are damaged");
    const std::string note = reasons.empty() ? "" : join(reasons, "; ") + "; using " + name;
    return {(p / "checkpoints" / name).string(), note};
  }
  TUTTI_CHECK_AS(CheckpointError, !candidates.empty(), "run '", dir, "' has no checkpoint",
                 reasons.empty() ? "" : " (" + join(reasons, "; ") + ")");
  TUTTI_FAIL(CheckpointError, "run '", dir, "' has no good checkpoint: ", join(damaged, "; "));
}

std::string resolve_checkpoint(const std::string& dir) {
  const CheckpointChoice choice = choose_checkpoint(dir);
  if (!choice.note.empty()) {
    const std::string line = "tutti: warning: " + choice.note + "\n";
    std::fputs(line.c_str(), stderr);  // one write, so lines of several ranks do not interleave
  }
  return choice.dir;
}

// ============================================================================================
// Loading
// ============================================================================================

LoadedCheckpoint load_checkpoint(const std::string& checkpoint_dir, nn::GPT& model) {
  const fs::path dir(checkpoint_dir);
  const CheckpointCheck check = verify_checkpoint(checkpoint_dir);
  TUTTI_CHECK_AS(CheckpointError, check.ok(), "checkpoint '", checkpoint_dir, "' is damaged: ", check.summary());
  const ckpt::Manifest& manifest = *check.manifest;
  int64_t opt_steps = 0;
  const TrainerState s = read_trainer_state(dir, opt_steps);
  TUTTI_CHECK_AS(CheckpointError, s.step == manifest.step, "checkpoint '", checkpoint_dir, "': trainer_state.json is of step ",
                 s.step, " but manifest.json of step ", manifest.step);
  // Read and check everything, then apply.
  const nn::GPTConfig cfg = ckpt::load_gpt_config(checkpoint_dir);
  TUTTI_CHECK_AS(CheckpointError, manifest.config_hash.empty() || manifest.config_hash == config_hash(cfg),
                 "checkpoint '", checkpoint_dir, "': config.json does not match the manifest's config hash");
  const nn::GPTConfig& want = model.config();
  TUTTI_CHECK_AS(CheckpointError,
                 cfg.n_layer == want.n_layer && cfg.n_head == want.n_head && cfg.n_embd == want.n_embd &&
                     cfg.block_size == want.block_size && cfg.vocab_size == want.vocab_size,
                 "checkpoint '", checkpoint_dir, "' holds a model of ", cfg.n_layer, " layers, ", cfg.n_head,
                 " heads, dim ", cfg.n_embd, ", context ", cfg.block_size, "; the run expects ", want.n_layer,
                 " layers, ", want.n_head, " heads, dim ", want.n_embd, ", context ", want.block_size);
  LoadedCheckpoint loaded{s, {}, opt_steps, manifest};
  for (const std::string& file : files_of(manifest.files, "optimizer"))
    for (auto& named : ckpt::read_safetensors((dir / file).string()).tensors)
      loaded.optimizer_state.push_back(std::move(named));
  ckpt::load_gpt_weights(checkpoint_dir, model);
  return loaded;
}

// ============================================================================================
// Inspection
// ============================================================================================

CheckpointReport inspect_checkpoint(const std::string& checkpoint_dir) {
  CheckpointReport r;
  r.check = verify_checkpoint(checkpoint_dir);
  r.problems = r.check.problems;
  const fs::path dir(checkpoint_dir);
  // A file is read only when it exists and its checksum (if listed) matched: a damaged file has
  // its problem reported once, by the check.
  auto readable = [&](const std::string& name) {
    std::error_code ec;
    if (!fs::exists(dir / name, ec)) {
      if (!r.check.manifest) r.problems.push_back(name + ": missing");
      return false;
    }
    for (const ckpt::FileCheck& f : r.check.files)
      if (f.name == name) return f.problem.empty();
    return true;
  };
  auto attempt = [&](const std::string& name, auto&& read) {
    if (!readable(name)) return;
    try {
      read();
    } catch (const std::exception& e) {
      std::string msg = e.what();
      const std::string path = (dir / name).string();
      for (const std::string& prefix : {path + ": ", "'" + path + "': "})
        if (msg.rfind(prefix, 0) == 0) msg = msg.substr(prefix.size());
      r.problems.push_back(name + ": " + msg);
    }
  };
  attempt("config.json", [&] {
    r.config = ckpt::load_gpt_config(checkpoint_dir);
    if (r.check.manifest && !r.check.manifest->config_hash.empty() && r.check.manifest->config_hash != config_hash(*r.config))
      r.problems.push_back("config.json: does not match the manifest's config hash");
  });
  attempt("trainer_state.json", [&] { r.state = read_trainer_state(dir, r.optimizer_steps); });
  std::vector<std::string> tensor_files = {"model.safetensors", "optimizer.safetensors"};
  if (r.check.manifest) {
    tensor_files = files_of(r.check.manifest->files, "model");
    for (const std::string& f : files_of(r.check.manifest->files, "optimizer")) tensor_files.push_back(f);
  }
  for (const std::string& file : tensor_files) {
    attempt(file, [&] {
      TensorFileInfo info{file, {}};
      for (auto& [name, t] : ckpt::read_safetensors((dir / file).string()).tensors)
        info.tensors.push_back({name, t.dtype(), t.shape(), static_cast<uint64_t>(t.nbytes())});
      r.tensor_files.push_back(std::move(info));
    });
  }
  return r;
}

}  // namespace tutti::train
