// Processes for `tutti launch`: file descriptors, a child in a process group of its own (so the
// whole tree it starts can be signalled at once), and the rank processes of a run found in /proc.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace tutti::launch {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t);

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    reset();
    fd_ = std::exchange(o.fd_, -1);
    return *this;
  }
  ~UniqueFd() { reset(); }
  int get() const { return fd_; }
  void reset();

 private:
  int fd_ = -1;
};

// "exit status N" or "signal N (name)" for a wait status.
std::string describe_status(int status);

// A program started in a process group of its own, stdin from /dev/null, stdout and stderr on
// pipes. The destructor kills the group and reaps the child if it is still running.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::vector<std::pair<std::string, std::string>>& env);
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() {
    if (!status_) stop(0.0);
  }

  pid_t pid() const { return pid_; }
  int out_fd() const { return out_.get(); }
  int err_fd() const { return err_.get(); }
  const std::optional<int>& status() const { return status_; }

  // The wait status once the child has ended; never blocks.
  const std::optional<int>& poll();

  // SIGTERM to the group, up to `grace_s` for the child to end, then SIGKILL to the group (which
  // also ends stopped members). Returns the child's wait status.
  int stop(double grace_s);

 private:
  pid_t pid_ = -1;
  UniqueFd out_, err_;
  std::optional<int> status_;
};

// The whole file ("" when it cannot be read).
std::string read_text(const std::filesystem::path& p);

// Whether process `pid` exists and is not a zombie.
bool process_alive(pid_t pid);

// A rank of the run: a `tutti train` process (same binary) that names the run directory.
struct RankProcess {
  pid_t pid;
  int rank;    // from OMPI_COMM_WORLD_RANK; -1 unknown
  char state;  // from /proc/PID/stat: R, S, T (stopped), ...
};

std::vector<RankProcess> find_rank_processes(const std::string& binary, const std::string& out);

// Ranks that outlived mpirun (started by a daemon in another process group or namespace):
// SIGKILL, then wait until they are gone (10 s at most). Returns how many signals were sent.
int kill_stray_ranks(const std::string& binary, const std::string& out);

}  // namespace tutti::launch
