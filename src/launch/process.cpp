#include "launch/process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "tutti/core/error.hpp"

namespace fs = std::filesystem;

namespace tutti::launch {
namespace {

struct Pipe {
  UniqueFd read, write;
};

Pipe make_pipe() {
  int fds[2];
  TUTTI_CHECK(::pipe2(fds, O_CLOEXEC) == 0, "pipe2: ", std::strerror(errno));
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

// The words of a NUL-separated file (/proc/PID/cmdline, environ); none when it is gone or unreadable.
std::vector<std::string> read_nul_list(const fs::path& p) {
  std::vector<std::string> words;
  std::string text = read_text(p), word;
  for (char c : text) {
    if (c == '\0') {
      words.push_back(word);
      word.clear();
    } else {
      word += c;
    }
  }
  return words;
}

// The state letter of /proc/PID/stat (after the parenthesised command name); '?' when unreadable.
char stat_state(const std::string& stat) {
  const size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() ? stat[paren + 2] : '?';
}

}  // namespace

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void UniqueFd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return "signal " + std::to_string(sig) + " (" + ::strsignal(sig) + ")";
  }
  return "status " + std::to_string(status);
}

// ------------------------------------------------------------------------------------------
// ChildProcess

ChildProcess::ChildProcess(const std::vector<std::string>& argv,
                           const std::vector<std::pair<std::string, std::string>>& env) {
  Pipe out = make_pipe(), err = make_pipe();
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_ = ::fork();
  TUTTI_CHECK(pid_ >= 0, "fork: ", std::strerror(errno));
  if (pid_ == 0) {  // the child: only async-signal-safe calls until exec
    ::setpgid(0, 0);
    const int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd >= 0) ::dup2(null_fd, STDIN_FILENO);
    ::dup2(out.write.get(), STDOUT_FILENO);
    ::dup2(err.write.get(), STDERR_FILENO);
    for (const auto& [name, value] : env) ::setenv(name.c_str(), value.c_str(), 1);
    ::execvp(args[0], args.data());
    const char msg[] = "tutti launch: cannot execute the launcher\n";
    [[maybe_unused]] auto n = ::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);  // also here: whichever of the two runs first, the group exists before signals
  out_ = std::move(out.read);
  err_ = std::move(err.read);
}

const std::optional<int>& ChildProcess::poll() {
  int st = 0;
  if (!status_ && ::waitpid(pid_, &st, WNOHANG) == pid_) status_ = st;
  return status_;
}

int ChildProcess::stop(double grace_s) {
  if (poll()) {
    ::kill(-pid_, SIGKILL);  // members the child left behind in its group
    return *status_;
  }
  if (grace_s > 0) {
    ::kill(-pid_, SIGTERM);
    const auto t0 = Clock::now();
    while (!poll() && seconds_since(t0) < grace_s) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(-pid_, SIGKILL);
  int st = 0;
  if (!status_ && ::waitpid(pid_, &st, 0) == pid_) status_ = st;
  return status_.value_or(-1);
}

// ------------------------------------------------------------------------------------------
// /proc: the rank processes of a run

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

bool process_alive(pid_t pid) {
  const char state = stat_state(read_text("/proc/" + std::to_string(pid) + "/stat"));
  return state != '?' && state != 'Z';
}

std::vector<RankProcess> find_rank_processes(const std::string& binary, const std::string& out) {
  std::vector<RankProcess> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    const pid_t pid = std::stoi(name);
    if (pid == ::getpid()) continue;
    const auto argv = read_nul_list(entry.path() / "cmdline");
    if (argv.size() < 2 || argv[1] != "train" || std::find(argv.begin(), argv.end(), out) == argv.end()) continue;
    std::error_code ec2;
    if (fs::read_symlink(entry.path() / "exe", ec2) != fs::path(binary)) continue;
    RankProcess r{pid, -1, '?'};
    for (const std::string& kv : read_nul_list(entry.path() / "environ"))
      if (kv.rfind("OMPI_COMM_WORLD_RANK=", 0) == 0) r.rank = std::atoi(kv.c_str() + 21);
    r.state = stat_state(read_text(entry.path() / "stat"));
    found.push_back(r);
  }
  return found;
}

int kill_stray_ranks(const std::string& binary, const std::string& out) {
  int killed = 0;
  const auto t0 = Clock::now();
  for (;;) {
    auto left = find_rank_processes(binary, out);
    if (left.empty() || seconds_since(t0) > 10) break;
    for (const RankProcess& r : left) killed += ::kill(r.pid, SIGKILL) == 0;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return killed;
}

}  // namespace tutti::launch
