// What a training run needs around its loop: the progress line, the heartbeat, the checks of
// its output directory, trace path and ranks, and small helpers (src/train/trainer.cpp).
#pragma once
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tutti/comm/communicator.hpp"
#include "tutti/core/device.hpp"
#include "tutti/train/config.hpp"

namespace tutti::train {

std::string format_duration(double seconds);  // "3m07s", "1h02m"

// Refuses to start a new run in a directory that holds anything; for a resume, needs a run.
// Every rank checks (so all fail alike); only rank 0 creates.
void check_run_dir(const TrainConfig& config, bool resume);
void create_run_dir(const TrainConfig& config, bool resume);
// --trace FILE: a file that can be created, and none that exists (it would be overwritten).
void check_trace_path(const std::string& path);
// Every rank must run the same binary with the same settings.
void check_same_config(comm::Communicator& world, const TrainConfig& config);
// The device this rank trains on: --device cuda under a launcher is one GPU per rank, the rank's
// index among the ranks of its host (Open MPI's and Slurm's local rank).
Device run_device(const TrainConfig& config, const comm::Communicator& world);
// The cores this rank may use: TUTTI_CORES when set (a sweep's trials), else the cores of this
// host divided among its ranks (Open MPI says how many share it).
int cores_per_rank();
// Fault injection (tests): "3,7,8" in variable `name` -> {3, 7, 8}; TUTTI_INJECT_SLOW_RANK="RANK:MS"
// -> MS for that rank, else 0.
std::set<int64_t> steps_from_env(const char* name);
int slow_ms_from_env(int rank);
std::string bytes_to_text(const std::vector<int32_t>& tokens);
std::string mib(int64_t bytes);  // "12.5 MiB"

class Progress {
 public:
  Progress(std::ostream& out, bool live, int64_t first, int64_t last, int log_interval)
      : out_(out), live_(live), first_(first), last_(last), log_interval_(log_interval), start_(std::chrono::steady_clock::now()) {}

  void step(int64_t step, double loss, float lr, double tokens_per_second) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double eta = step > first_ ? elapsed / double(step - first_) * double(last_ - step) : 0.0;
    char line[160];
    std::snprintf(line, sizeof line, "step %6lld/%lld | loss %.4f | lr %.2e | %8.0f tok/s | ETA %s",
                  static_cast<long long>(step), static_cast<long long>(last_), loss, lr, tokens_per_second,
                  format_duration(eta).c_str());
    if (live_) {
      out_ << "\r" << line << "\033[K" << std::flush;
      dirty_ = true;
    } else if (step % log_interval_ == 0 || step == last_) {
      out_ << line << "\n" << std::flush;
    }
  }
  // A line that stays (evaluation, checkpoint): clears the live line first.
  std::ostream& line() {
    if (dirty_) out_ << "\r\033[K";
    dirty_ = false;
    return out_;
  }

 private:
  std::ostream& out_;
  bool live_;
  int64_t first_, last_;
  int log_interval_;
  std::chrono::steady_clock::time_point start_;
  bool dirty_ = false;
};

// Each rank rewrites <out>/heartbeats/rank_<r> ("<step> <unix time ns>") once a second from its
// own thread, through evaluation, checkpoints and sampling too, so a supervisor can tell a frozen
// process (SIGSTOP, a dead host: no beats) from a slow step. Hangs inside a collective are caught
// by the collective timeout instead.
class Heartbeat {
 public:
  Heartbeat(const std::string& out, int rank) : path_(std::filesystem::path(out) / "heartbeats" / ("rank_" + std::to_string(rank))) {
    std::filesystem::create_directories(path_.parent_path());
    thread_ = std::thread([this] {
      std::unique_lock lock(mutex_);
      do {
        std::ofstream(path_, std::ios::trunc)
            << step_.load() << " " << std::chrono::system_clock::now().time_since_epoch().count() << "\n";
      } while (!stop_.wait_for(lock, std::chrono::seconds(1), [this] { return stopping_; }));
    });
  }
  ~Heartbeat() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    stop_.notify_one();
    thread_.join();
  }
  void set_step(int64_t step) { step_ = step; }

 private:
  std::filesystem::path path_;
  std::atomic<int64_t> step_{0};
  std::mutex mutex_;
  std::condition_variable stop_;
  bool stopping_ = false;
  std::thread thread_;
};


}  // namespace tutti::train
