#include "train/run_support.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "tutti/ckpt/safetensors.hpp"
#include "tutti/core/error.hpp"
#include "tutti/core/threads.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

uint64_t fnv1a(const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

std::string format_duration(double seconds) {
  const int s = static_cast<int>(std::max(0.0, seconds));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", s / 3600, s / 60 % 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", s / 60, s % 60);
  return buf;
}

void check_run_dir(const TrainConfig& config, bool resume) {
  const fs::path out(config.out);
  if (resume) {
    TUTTI_CHECK_AS(ConfigError, fs::exists(out / "run.toml"), "cannot resume: '", config.out,
                   "' holds no run (no run.toml)");
    return;
  }
  if (fs::exists(out)) {
    TUTTI_CHECK_AS(ConfigError, fs::is_directory(out), "output path '", config.out, "' exists and is not a directory");
    TUTTI_CHECK_AS(ConfigError, fs::is_empty(out), "output directory '", config.out,
                   "' already holds a run or other files; continue it with --resume ", config.out,
                   " or choose another --out");
  }
}

void create_run_dir(const TrainConfig& config, bool resume) {
  if (resume) return;
  fs::create_directories(config.out);
  ckpt::write_file_atomic((fs::path(config.out) / "run.toml").string(), to_toml(config));
}

int cores_per_rank() {
  if (const char* cores = std::getenv("TUTTI_CORES")) return std::max(1, std::atoi(cores));
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  return std::max(1, hardware_threads() / std::max(1, local ? std::atoi(local) : 1));
}

// "3,7,8" -> {3, 7, 8}
std::set<int64_t> steps_from_env(const char* name) {
  std::set<int64_t> out;
  const char* v = std::getenv(name);
  for (std::stringstream s(v ? v : ""); s.good();) {
    std::string item;
    std::getline(s, item, ',');
    if (!item.empty()) out.insert(std::stoll(item));
  }
  return out;
}

int slow_ms_from_env(int rank) {
  const char* v = std::getenv("TUTTI_INJECT_SLOW_RANK");
  int r = -1, ms = 0;
  if (!v || std::sscanf(v, "%d:%d", &r, &ms) != 2 || r != rank) return 0;
  return ms;
}

std::string bytes_to_text(const std::vector<int32_t>& tokens) {
  std::string s;
  for (int32_t t : tokens) s += static_cast<char>(t);
  return s;
}

void check_trace_path(const std::string& path) {
  const fs::path p(path);
  TUTTI_CHECK_AS(ConfigError, !fs::exists(p), "--trace '", path, "' already exists; remove it or choose another file");
  const fs::path dir = p.parent_path().empty() ? fs::path(".") : p.parent_path();
  TUTTI_CHECK_AS(ConfigError, fs::is_directory(dir), "--trace '", path, "': directory '", dir.string(),
                 "' does not exist");
  TUTTI_CHECK_AS(ConfigError, ::access(dir.c_str(), W_OK) == 0, "--trace '", path, "': directory '", dir.string(),
                 "' is not writable");
}

void check_same_config(comm::Communicator& world, const TrainConfig& config) {
  if (world.size() == 1) return;
  const int64_t mine = static_cast<int64_t>(fnv1a(to_toml(config) + TUTTI_VERSION));
  std::vector<int64_t> all(size_t(world.size()));
  world.all_gather(std::span<const int64_t>(&mine, 1), std::span<int64_t>(all), std::vector<int64_t>(all.size(), 1))
      ->wait();
  for (size_t r = 1; r < all.size(); ++r)
    TUTTI_CHECK_AS(ConfigError, all[r] == all[0], "the configuration or the tutti binary differs between ranks: rank ",
                   r, " has hash ", std::hex, all[r], ", rank 0 has ", all[0]);
}

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / (1 << 20));
  return buf;
}

Device run_device(const TrainConfig& config, const comm::Communicator& world) {
  const Device device = config.compute_device();
  if (!device.is_cuda() || world.size() == 1) return device;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(name)) return Device::cuda(std::atoi(v));
  return Device::cuda(world.rank());
}

}  // namespace tutti::train
