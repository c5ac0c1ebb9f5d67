// The run as `tutti launch` sees it from outside the ranks: its train arguments, its settings, and
// what the trainer writes into the run directory (checkpoints, metrics.jsonl, heartbeats).
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace tutti::launch {

// The value of `--name V` / `--name=V` in args (the last one), if any.
std::optional<std::string> arg_value(const std::vector<std::string>& args, const std::set<std::string>& names);

// args without `--name V` / `--name=V` for the given names.
std::vector<std::string> without_args(const std::vector<std::string>& args, const std::set<std::string>& names);

// A training setting: the train arguments first, then run.toml (a resumed run), then the --config
// file, then the trainer's default.
int64_t run_setting(const std::vector<std::string>& args, const std::filesystem::path& out, const std::string& key,
                    int64_t fallback);

// The step of the checkpoint `latest` names; nullopt when there is none.
std::optional<int64_t> latest_checkpoint_step(const std::filesystem::path& out);

// The highest completed step among metrics.jsonl lines from byte `offset` on; -1 when none.
int64_t max_metrics_step(const std::filesystem::path& out, std::uintmax_t offset);

std::uintmax_t file_size_or_zero(const std::filesystem::path& p);

// A rank's heartbeat file (OUT/heartbeats/rank_R): the step it was starting, rewritten every step.
struct Beat {
  bool present = false;
  int64_t step = 0;  // the step the rank was starting: that many steps are complete
  double age = 0.0;  // seconds since it was written
};

Beat read_heartbeat(const std::filesystem::path& file);

}  // namespace tutti::launch
