#include "launch/run_state.hpp"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <regex>

namespace fs = std::filesystem;

namespace tutti::launch {
namespace {

// An integer key of a flat TOML file (run.toml, a --config file); nullopt when absent.
std::optional<int64_t> toml_int(const fs::path& file, const std::string& key) {
  std::ifstream in(file);
  std::string line;
  const std::regex re("^\\s*" + key + "\\s*=\\s*(-?[0-9]+)\\s*(#.*)?$");
  std::optional<int64_t> v;
  std::smatch m;
  while (std::getline(in, line))
    if (std::regex_match(line, m, re)) v = std::stoll(m[1]);
  return v;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Train arguments and settings

std::optional<std::string> arg_value(const std::vector<std::string>& args, const std::set<std::string>& names) {
  std::optional<std::string> v;
  for (size_t i = 0; i < args.size(); ++i) {
    for (const std::string& n : names) {
      if (args[i] == n && i + 1 < args.size()) v = args[i + 1];
      else if (args[i].rfind(n + "=", 0) == 0) v = args[i].substr(n.size() + 1);
    }
  }
  return v;
}

std::vector<std::string> without_args(const std::vector<std::string>& args, const std::set<std::string>& names) {
  std::vector<std::string> kept;
  for (size_t i = 0; i < args.size(); ++i) {
    bool drop = false;
    for (const std::string& n : names) {
      if (args[i] == n) {
        drop = true;
        ++i;  // its value
        break;
      }
      if (args[i].rfind(n + "=", 0) == 0) drop = true;
    }
    if (!drop) kept.push_back(args[i]);
  }
  return kept;
}

int64_t run_setting(const std::vector<std::string>& args, const fs::path& out, const std::string& key,
                    int64_t fallback) {
  std::string flag = "--" + key;
  std::replace(flag.begin(), flag.end(), '_', '-');
  std::set<std::string> flags{flag};
  if (key == "batch") flags.insert("--global-batch");
  if (auto v = arg_value(args, flags)) return std::stoll(*v);
  if (auto v = toml_int(out / "run.toml", key)) return *v;
  if (auto cfg = arg_value(args, {"--config"}))
    if (auto v = toml_int(*cfg, key)) return *v;
  return fallback;
}

// ------------------------------------------------------------------------------------------
// Progress: checkpoints, metrics, heartbeats

std::optional<int64_t> latest_checkpoint_step(const fs::path& out) {
  std::ifstream in(out / "latest");
  std::string name;
  if (!(in >> name)) return std::nullopt;
  const std::string leaf = fs::path(name).filename().string();
  if (leaf.rfind("step_", 0) != 0) return std::nullopt;
  const fs::path dir = fs::exists(out / "checkpoints" / leaf) ? out / "checkpoints" / leaf : fs::path(name);
  if (!fs::exists(dir / "manifest.json") && !fs::exists(dir / "model.safetensors")) return std::nullopt;
  return std::stoll(leaf.substr(5));
}

// Tolerant: a line cut by a kill (and what a resumed run appended to it) is skipped.
int64_t max_metrics_step(const fs::path& out, std::uintmax_t offset) {
  std::ifstream in(out / "metrics.jsonl", std::ios::binary);
  if (!in) return -1;
  in.seekg(static_cast<std::streamoff>(offset));
  static const std::regex re("^\\{\"step\":([0-9]+),\"loss\":");
  int64_t best = -1;
  std::string line;
  std::smatch m;
  while (std::getline(in, line))
    if (std::regex_search(line, m, re) && line.back() == '}') best = std::max<int64_t>(best, std::stoll(m[1]));
  return best;
}

std::uintmax_t file_size_or_zero(const fs::path& p) {
  std::error_code ec;
  const auto n = fs::file_size(p, ec);
  return ec ? 0 : n;
}

Beat read_heartbeat(const fs::path& file) {
  Beat b;
  std::error_code ec;
  const auto written = fs::last_write_time(file, ec);
  if (ec) return b;
  std::ifstream in(file);
  if (!(in >> b.step)) return b;  // being rewritten: count it next time
  b.present = true;
  b.age = std::chrono::duration<double>(fs::file_time_type::clock::now() - written).count();
  return b;
}

}  // namespace tutti::launch
