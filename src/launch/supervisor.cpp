#include "tutti/launch/supervisor.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "tutti/core/error.hpp"

namespace fs = std::filesystem;

namespace tutti::launch {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// ------------------------------------------------------------------------------------------
// Processes: file descriptors, a child in its own process group, the ranks of a run

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
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  UniqueFd read, write;
};

Pipe make_pipe() {
  int fds[2];
  TUTTI_CHECK(::pipe2(fds, O_CLOEXEC) == 0, "pipe2: ", std::strerror(errno));
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return "signal " + std::to_string(sig) + " (" + ::strsignal(sig) + ")";
  }
  return "status " + std::to_string(status);
}

// A program started in a process group of its own (so that the whole tree it starts can be
// signalled at once), stdin from /dev/null, stdout and stderr on pipes. The destructor kills the
// group and reaps the child if it is still running.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::vector<std::pair<std::string, std::string>>& env) {
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
  const std::optional<int>& poll() {
    int st = 0;
    if (!status_ && ::waitpid(pid_, &st, WNOHANG) == pid_) status_ = st;
    return status_;
  }

  // SIGTERM to the group, up to `grace_s` for the child to end, then SIGKILL to the group (which
  // also ends stopped members). Returns the child's wait status.
  int stop(double grace_s) {
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

 private:
  pid_t pid_ = -1;
  UniqueFd out_, err_;
  std::optional<int> status_;
};

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// argv of a process as its words ("" when it is gone or unreadable).
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

// A rank of the run: a `tutti train` process (same binary) that names the run directory.
struct RankProcess {
  pid_t pid;
  int rank;      // from OMPI_COMM_WORLD_RANK; -1 unknown
  char state;    // from /proc/PID/stat: R, S, T (stopped), ...
};

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
    const std::string stat = read_text(entry.path() / "stat");
    const size_t paren = stat.rfind(')');
    if (paren != std::string::npos && paren + 2 < stat.size()) r.state = stat[paren + 2];
    found.push_back(r);
  }
  return found;
}

// Ranks that outlived mpirun (started by a daemon in another process group or namespace):
// SIGKILL, then wait until they are gone.
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

// ------------------------------------------------------------------------------------------
// The run: its directory, settings and progress

// The value of `--name V` / `--name=V` in args (the last one), if any.
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

// args without `--name V` / `--name=V` for the given names.
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

// A training setting: the train arguments first, then run.toml (a resumed run), then the --config
// file, then the trainer's default.
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

// The step of the checkpoint `latest` names; nullopt when there is none.
std::optional<int64_t> latest_checkpoint_step(const fs::path& out) {
  std::ifstream in(out / "latest");
  std::string name;
  if (!(in >> name)) return std::nullopt;
  const std::string leaf = fs::path(name).filename().string();
  if (leaf.rfind("step_", 0) != 0) return std::nullopt;
  if (!fs::exists(out / "checkpoints" / leaf / "model.safetensors") && !fs::exists(fs::path(name) / "model.safetensors"))
    return std::nullopt;
  return std::stoll(leaf.substr(5));
}

// The highest completed step among metrics.jsonl lines from byte `offset` on. Tolerant: a line cut
// by a kill (and what a resumed run appended to it) is skipped.
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

struct Beat {
  bool present = false;
  int64_t step = 0;   // the step the rank was starting: that many steps are complete
  double age = 0.0;   // seconds since it was written
};

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

// ------------------------------------------------------------------------------------------
// Output of mpirun: forwarded as it comes, scanned line by line for what it says about the ranks

struct AttemptReport {
  std::string kind;         // "" (ran to the end) | killed | exited | hung | host lost
  std::string detail;       // one line: which rank/host, signal/status, heartbeat age
  int status = 0;           // mpirun's wait status
  int64_t max_step = -1;    // the most steps the attempt is known to have completed
  int64_t first_step = -1;  // the step it started from (its first heartbeats)
  bool resumed = false;     // every rank beat at least once
  bool announced = false;   // "failure detected" already logged (at the moment of detection)
  Clock::time_point detected;
};

class OutputScanner {
 public:
  explicit OutputScanner(AttemptReport& report) : report_(report) {}

  // Reads what is available on fd, writes it to to_fd unchanged, scans complete lines.
  // Returns false at end of file.
  bool pump(int fd, int to_fd, std::string& pending) {
    char buf[65536];
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return n < 0 && errno == EINTR;
    for (ssize_t off = 0; off < n;) {
      const ssize_t w = ::write(to_fd, buf + off, size_t(n - off));
      if (w <= 0) break;
      off += w;
    }
    pending.append(buf, size_t(n));
    size_t start = 0;
    for (size_t nl; (nl = pending.find_first_of("\r\n", start)) != std::string::npos; start = nl + 1)
      scan(pending.substr(start, nl - start));
    pending.erase(0, start);
    return true;
  }

  std::string rank_failure;  // what mpirun said about the first rank that failed
  std::string host_failure;  // what it said about a lost daemon

 private:
  void scan(const std::string& line) {
    static const std::regex progress("^step +([0-9]+)/[0-9]+ \\|");
    static const std::regex died("process rank ([0-9]+) with PID ([0-9]+) on node (\\S+) exited on signal ([0-9]+)");
    static const std::regex aborted("MPI_ABORT was invoked on rank ([0-9]+)");
    static const std::regex error("^tutti: error.*");
    static const std::regex daemon("(lost communication with a remote daemon|daemon .*failed|unable to reliably start)");
    std::smatch m;
    if (std::regex_search(line, m, progress)) report_.max_step = std::max<int64_t>(report_.max_step, std::stoll(m[1]));
    if (rank_failure.empty() && std::regex_search(line, m, died))
      rank_failure = "rank " + m[1].str() + (m[2] == "0" ? "" : " (pid " + m[2].str() + ")") + " on host " + m[3].str() + " killed by signal " +
                     m[4].str() + " (" + ::strsignal(std::stoi(m[4])) + ")";
    if (rank_failure.empty() && std::regex_search(line, m, aborted)) rank_failure = "rank " + m[1].str() + " aborted the job";
    if (rank_error.empty() && std::regex_search(line, m, error)) rank_error = line;
    if (host_failure.empty() && std::regex_search(line, m, daemon)) host_failure = "mpirun: " + line;
  }

 public:
  std::string rank_error;  // the first "tutti: error ..." line

 private:
  AttemptReport& report_;
};

// ------------------------------------------------------------------------------------------
// The supervisor

class Supervisor {
 public:
  explicit Supervisor(const LaunchOptions& o) : o_(o), log_(o.log ? *o.log : std::cerr), start_(Clock::now()) {}

  LaunchSummary run();

 private:
  void event(const std::string& text) {
    char stamp[32];
    std::snprintf(stamp, sizeof stamp, "launch: [%7.2fs] ", seconds_since(start_));
    log_ << (stamp + text + "\n") << std::flush;  // one write per event
  }
  void validate();
  std::vector<std::string> command(int ranks, bool resume) const;
  AttemptReport watch(int attempt, int ranks, bool resume);
  std::vector<std::string> reachable_hosts();
  bool host_up(const std::string& host);
  void clear_for_fresh_start();
  std::string hosts_text() const;

  LaunchOptions o_;
  std::ostream& log_;
  Clock::time_point start_;
  std::vector<Host> all_hosts_, hosts_;  // the hostfile's, and those still in use
  fs::path out_, work_;                  // the run directory; the supervisor's own files
  int64_t batch_ = 0, micro_ = 0, steps_ = 0;
  bool user_resume_ = false;
  std::optional<Clock::time_point> pending_detection_;
  LaunchSummary summary_;
};

void Supervisor::validate() {
  TUTTI_CHECK_AS(InvalidArgument, o_.ranks >= 1, "--ranks must be at least 1, got ", o_.ranks);
  if (o_.min_ranks == 0) o_.min_ranks = o_.ranks;
  TUTTI_CHECK_AS(InvalidArgument, o_.min_ranks >= 1 && o_.min_ranks <= o_.ranks, "--min-ranks ", o_.min_ranks,
                 " must be between 1 and --ranks ", o_.ranks);
  TUTTI_CHECK_AS(InvalidArgument, o_.max_restarts >= 0, "--max-restarts must be >= 0, got ", o_.max_restarts);
  TUTTI_CHECK_AS(InvalidArgument, o_.heartbeat_timeout > 0, "--heartbeat-timeout must be positive");
  TUTTI_CHECK_AS(InvalidArgument, !o_.tutti_binary.empty(), "no tutti binary to launch");
  const auto resume = arg_value(o_.train_args, {"--resume"});
  const auto out = arg_value(o_.train_args, {"--out"});
  TUTTI_CHECK_AS(InvalidArgument, resume || out,
                 "launch needs the run directory among the train arguments: --out DIR (or --resume DIR)");
  user_resume_ = resume.has_value();
  out_ = fs::absolute(resume ? *resume : *out).lexically_normal();
  if (!o_.hostfile.empty()) {
    all_hosts_ = read_hostfile(o_.hostfile);
    for (const Host& h : all_hosts_)
      TUTTI_CHECK_AS(InvalidArgument, host_up(h.name), "host '", h.name, "' of ", o_.hostfile, " is unreachable (",
                     o_.host_check.empty() ? "no answer on TCP port " + std::to_string(o_.probe_port)
                                           : "'" + o_.host_check + "' failed",
                     ")");
    hosts_ = all_hosts_;
  }
  batch_ = run_setting(o_.train_args, out_, "batch", 12);
  micro_ = run_setting(o_.train_args, out_, "micro_batch", 0);
  steps_ = run_setting(o_.train_args, out_, "steps", 2000);
}

std::string Supervisor::hosts_text() const {
  if (hosts_.empty()) return "this machine";
  std::string s = std::to_string(hosts_.size()) + " host(s):";
  for (const Host& h : hosts_) s += " " + h.name;
  return s;
}

// mpirun [-np N --hostfile F] --oversubscribe [user args] TUTTI train ARGS [--resume OUT --dp N]
std::vector<std::string> Supervisor::command(int ranks, bool resume) const {
  std::vector<std::string> cmd{o_.mpirun, "-np", std::to_string(ranks), "--oversubscribe"};
  const auto has = [&](const std::string& flag) {
    return std::find(o_.mpirun_args.begin(), o_.mpirun_args.end(), flag) != o_.mpirun_args.end();
  };
  if (!has("--bind-to")) cmd.insert(cmd.end(), {"--bind-to", "none"});
  if (!hosts_.empty()) {
    const fs::path hostfile = work_ / "hostfile";
    std::ofstream f(hostfile, std::ios::trunc);
    const int per_host = (ranks + int(hosts_.size()) - 1) / int(hosts_.size());
    for (const Host& h : hosts_) f << h.name << " slots=" << per_host << "\n";
    f.close();
    cmd.insert(cmd.end(), {"--hostfile", hostfile.string()});
    if (!has("--map-by")) cmd.insert(cmd.end(), {"--map-by", "node"});  // rank r on host r mod H
  }
  cmd.insert(cmd.end(), o_.mpirun_args.begin(), o_.mpirun_args.end());
  cmd.insert(cmd.end(), {o_.tutti_binary, "train"});
  std::vector<std::string> args = o_.train_args;
  if (resume) {  // the settings come from run.toml; what would contradict the resume goes
    args = without_args(args, {"--out", "--resume", "--config", "--dp"});
    args.insert(args.end(), {"--resume", out_.string(), "--dp", std::to_string(ranks)});
  } else {
    args = without_args(args, {"--out"});
    args.insert(args.end(), {"--out", out_.string()});
  }
  cmd.insert(cmd.end(), args.begin(), args.end());
  return cmd;
}

bool Supervisor::host_up(const std::string& host) {
  if (o_.host_check.empty()) return host_reachable(host, o_.probe_port, o_.probe_timeout);
  std::string cmd = o_.host_check;
  for (size_t at; (at = cmd.find("{host}")) != std::string::npos;) cmd.replace(at, 6, host);
  ChildProcess check({"/bin/sh", "-c", cmd}, {});
  const auto t0 = Clock::now();
  while (!check.poll() && seconds_since(t0) < 10.0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int status = check.stop(0.0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

std::vector<std::string> Supervisor::reachable_hosts() {
  std::vector<std::string> lost;
  std::vector<Host> kept;
  for (const Host& h : hosts_) {
    bool up = false;
    try {
      up = host_up(h.name);
    } catch (const Error&) {
      up = false;  // no longer resolves
    }
    if (up) kept.push_back(h);
    else lost.push_back(h.name);
  }
  hosts_ = kept;
  return lost;
}

// A fresh run that failed before its first checkpoint: start it again from nothing. Only what the
// trainer writes is removed, and only when no checkpoint exists.
void Supervisor::clear_for_fresh_start() {
  std::error_code ec;
  for (const char* name : {"run.toml", "metrics.jsonl", "heartbeats", "latest"}) fs::remove_all(out_ / name, ec);
  if (fs::is_directory(out_ / "checkpoints", ec)) fs::remove_all(out_ / "checkpoints", ec);
}

// Runs one attempt until mpirun ends or a rank's heartbeat stands still; every process of the
// attempt is gone when it returns.
AttemptReport Supervisor::watch(int attempt, int ranks, bool resume) {
  AttemptReport report;
  const fs::path beats = out_ / "heartbeats";
  std::error_code ec;
  fs::remove_all(beats, ec);  // the previous attempt's; each rank makes the directory again
  const std::uintmax_t metrics_offset = file_size_or_zero(out_ / "metrics.jsonl");
  std::vector<std::pair<std::string, std::string>> env;
  if (::geteuid() == 0) env = {{"OMPI_ALLOW_RUN_AS_ROOT", "1"}, {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"}};
  const std::vector<std::string> cmd = command(ranks, resume);
  std::string cmd_text;
  for (const std::string& w : cmd) cmd_text += (cmd_text.empty() ? "" : " ") + w;
  event("started attempt " + std::to_string(attempt) + ": " + std::to_string(ranks) + " rank(s) on " + hosts_text() +
        (resume ? ", resuming" : ", fresh run") + " (" + cmd_text + ")");
  const auto t0 = Clock::now();
  ChildProcess mpirun(cmd, env);
  OutputScanner scanner(report);
  std::string pending_out, pending_err;
  bool out_open = true, err_open = true;
  auto last_check = Clock::now() - std::chrono::seconds(1);
  std::optional<Clock::time_point> ended, vanished;
  std::map<int, pid_t> rank_pids;
  struct Gone {
    int rank;
    pid_t pid;
    Clock::time_point since;
  };
  std::optional<Gone> gone;

  while (true) {
    pollfd fds[2] = {{out_open ? mpirun.out_fd() : -1, POLLIN, 0}, {err_open ? mpirun.err_fd() : -1, POLLIN, 0}};
    ::poll(fds, 2, 100);
    if (fds[0].revents) out_open = scanner.pump(mpirun.out_fd(), STDOUT_FILENO, pending_out);
    if (fds[1].revents) err_open = scanner.pump(mpirun.err_fd(), STDERR_FILENO, pending_err);
    if (mpirun.poll()) {
      // mpirun ended: drain its output; ranks it orphaned may hold the pipes, so not for long
      if (!out_open && !err_open) break;
      if (!ended) ended = Clock::now();
      if (seconds_since(*ended) > 2) break;
      continue;
    }
    if (seconds_since(last_check) < 0.25) continue;
    last_check = Clock::now();

    // ---- heartbeats
    int beating = 0;
    int64_t min_step = INT64_MAX;
    std::optional<std::pair<int, Beat>> stale;
    for (int r = 0; r < ranks; ++r) {
      const Beat b = read_heartbeat(beats / ("rank_" + std::to_string(r)));
      if (!b.present) continue;
      ++beating;
      min_step = std::min(min_step, b.step);
      report.max_step = std::max(report.max_step, b.step);
      // After its last step a rank stops beating while rank 0 evaluates and writes the final checkpoint.
      const double limit = b.step + 1 >= steps_ ? std::max(o_.heartbeat_timeout, o_.startup_timeout) : o_.heartbeat_timeout;
      if (b.age > limit && (!stale || b.age > stale->second.age)) stale = {r, b};
    }
    if (beating == ranks && !report.resumed) {
      report.resumed = true;
      report.first_step = min_step;
      std::string text = std::string(attempt == 1 ? "training" : "resumed") + " at step " + std::to_string(min_step) +
                         " (attempt " + std::to_string(attempt) + ", every rank has sent a heartbeat)";
      if (pending_detection_) {
        const double secs = seconds_since(*pending_detection_);
        summary_.recoveries.back().seconds = secs;
        char buf[64];
        std::snprintf(buf, sizeof buf, ", %.2f s after the failure was detected", secs);
        text += buf;
        pending_detection_.reset();
      }
      event(text);
    }
    // A rank that is gone before its last step: mpirun notices too, but only after its own delay
    // (and cannot see ranks on hosts that vanished); record the moment here.
    for (const RankProcess& p : find_rank_processes(o_.tutti_binary, out_.string()))
      if (p.rank >= 0 && p.state != 'Z' && p.state != 'X') rank_pids[p.rank] = p.pid;
    if (!vanished) {
      for (const auto& [rank, pid] : rank_pids) {
        const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
        const size_t paren = stat.rfind(')');
        const bool alive = paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] != 'Z';
        // Only ranks in the training loop (an error before it is every rank's, reported by mpirun),
        // not after the last step (ranks exit one by one), not one that printed an error, and only
        // on this machine's ranks (on namespace hosts a rank's /proc entry has been seen to vanish
        // early; there mpirun and the heartbeats decide).
        const bool in_loop = read_heartbeat(beats / ("rank_" + std::to_string(rank))).present;
        if (alive || !in_loop || report.max_step >= steps_ || !scanner.rank_error.empty() || !hosts_.empty()) continue;
        if (!gone) gone = {rank, pid, Clock::now()};
        // Confirmed after 0.3 s: the progress line of the last step may still be on its way.
        if (seconds_since(gone->since) < 0.3) break;
        vanished = gone->since;
        report.detected = *vanished;
        report.announced = true;
        const Beat b = read_heartbeat(beats / ("rank_" + std::to_string(rank)));
        char ago[32];
        std::snprintf(ago, sizeof ago, "%.2f s ago", seconds_since(gone->since));
        event("failure detected (attempt " + std::to_string(attempt) + "): rank " + std::to_string(rank) + " (pid " +
              std::to_string(pid) + ") is gone (noticed " + ago + "), last heartbeat at step " +
              std::to_string(std::max<int64_t>(0, b.step)) + "; stopping the job");
        // The survivors wait in a collective, and mpirun takes a second of its own to end the job
        // (longer when the rank's host is gone): end it now.
        kill_stray_ranks(o_.tutti_binary, out_.string());
        report.status = mpirun.stop(0.5);
        break;
      }
      if (vanished) break;
    }
    std::string hang;
    if (stale) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "heartbeat of rank %d is %.1f s old (limit %.0f s), at step %lld", stale->first,
                    stale->second.age, o_.heartbeat_timeout, static_cast<long long>(stale->second.step));
      hang = buf;
    } else if (beating < ranks && seconds_since(t0) > o_.startup_timeout) {
      hang = std::to_string(ranks - beating) + " rank(s) sent no heartbeat within --startup-timeout " +
             std::to_string(int(o_.startup_timeout)) + " s";
    }
    if (!hang.empty()) {
      report.detected = Clock::now();
      report.kind = "hung";
      for (const RankProcess& p : find_rank_processes(o_.tutti_binary, out_.string()))
        if (p.state == 'T' || p.state == 't')
          hang += "; rank " + std::to_string(p.rank) + " (pid " + std::to_string(p.pid) + ") is stopped";
      report.detail = hang;
      report.announced = true;
      event("failure detected (attempt " + std::to_string(attempt) + "): " + hang + "; stopping the job");
      kill_stray_ranks(o_.tutti_binary, out_.string());  // first the ranks: a stopped one must not wake up
      report.status = mpirun.stop(o_.kill_grace);
      break;
    }
  }
  if (report.kind.empty()) {
    if (!vanished) report.detected = Clock::now();
    report.status = mpirun.status() ? *mpirun.status() : report.status;
    if (WIFEXITED(report.status) && WEXITSTATUS(report.status) == 0) {
      report.kind = "";
    } else {
      const bool signalled = scanner.rank_failure.find("signal") != std::string::npos;
      report.kind = !scanner.host_failure.empty() && !signalled ? "host lost"
                    : signalled || vanished                     ? "killed"
                                                                : "exited";
      report.detail = !scanner.rank_failure.empty() ? scanner.rank_failure
                      : !scanner.host_failure.empty() ? scanner.host_failure
                      : !scanner.rank_error.empty()   ? scanner.rank_error
                                                      : "a rank failed";
      report.detail += "; mpirun ended with " + describe_status(report.status);
      if (!scanner.rank_error.empty() && report.detail.find(scanner.rank_error) == std::string::npos)
        report.detail += " (" + scanner.rank_error + ")";
    }
  }
  mpirun.stop(0.0);
  const int strays = kill_stray_ranks(o_.tutti_binary, out_.string());
  if (strays > 0) event("killed " + std::to_string(strays) + " rank process(es) left after mpirun ended");
  report.max_step = std::max(report.max_step, max_metrics_step(out_, metrics_offset));
  return report;
}

LaunchSummary Supervisor::run() {
  validate();
  work_ = out_.parent_path() / ("." + out_.filename().string() + ".launch");
  fs::create_directories(work_);
  int ranks = o_.ranks;
  bool resume = user_resume_;
  int restarts = 0;
  for (int attempt = 1;; ++attempt) {
    summary_.attempts = attempt;
    AttemptReport r = watch(attempt, ranks, resume);
    if (r.kind.empty()) {
      summary_.exit_code = 0;
      event("finished: the run completed (attempt " + std::to_string(attempt) + ")");
      break;
    }
    // ---- a failure: what, where, and can the job go on?
    const std::vector<std::string> lost = hosts_.empty() ? std::vector<std::string>{} : reachable_hosts();
    if (!lost.empty()) r.kind = "host lost";
    ++summary_.failures[r.kind];
    std::string lost_text;
    for (const std::string& h : lost) lost_text += (lost_text.empty() ? "" : ", ") + h;
    event((r.announced ? "attempt " + std::to_string(attempt) + " stopped (" + r.kind + "): "
                       : "failure detected (attempt " + std::to_string(attempt) + ", " + r.kind + "): ") +
          r.detail + (lost.empty() ? "" : "; unreachable: " + lost_text));
    if (!resume && r.max_step < 0 && r.kind == "exited") {
      summary_.error = "the run failed before its first step; not restarting (a configuration or data error?)";
      break;
    }
    if (restarts >= o_.max_restarts) {
      summary_.error = "restart budget spent (" + std::to_string(o_.max_restarts) + " restarts)";
      break;
    }
    if (!all_hosts_.empty()) {
      if (hosts_.empty()) {
        summary_.error = "no reachable host left";
        break;
      }
      const int per_host = (o_.ranks + int(all_hosts_.size()) - 1) / int(all_hosts_.size());
      const int available = std::min(o_.ranks, per_host * int(hosts_.size()));
      const int next = choose_ranks(available, o_.min_ranks, batch_, micro_);
      if (next == 0) {
        summary_.error = std::to_string(available) + " rank(s) available on " + std::to_string(hosts_.size()) +
                         " host(s), and no count from --min-ranks " + std::to_string(o_.min_ranks) +
                         " up divides the global batch " + std::to_string(batch_) +
                         (micro_ > 0 ? " into micro-batches of " + std::to_string(micro_) : "");
        break;
      }
      ranks = next;
    }
    const std::optional<int64_t> ckpt = latest_checkpoint_step(out_);
    const int64_t from = ckpt.value_or(0);
    const int64_t lost_steps = std::max<int64_t>(0, r.max_step - from);
    summary_.steps_recomputed += lost_steps;
    if (!ckpt && !user_resume_) clear_for_fresh_start();
    resume = ckpt.has_value() || user_resume_;
    ++restarts;
    event("steps lost: " + std::to_string(lost_steps) + " (attempt " + std::to_string(attempt) + " reached step " +
          std::to_string(std::max<int64_t>(0, r.max_step)) + ", " +
          (ckpt ? "the newest checkpoint is step " + std::to_string(from) : std::string("no checkpoint yet")) + ")");
    event("restart " + std::to_string(restarts) + "/" + std::to_string(o_.max_restarts) + ": " +
          std::to_string(ranks) + " rank(s), " +
          (resume ? "resuming from step " + std::to_string(from) : std::string("starting the run again")));
    summary_.recoveries.push_back({r.kind, from, lost_steps, 0.0, ranks});
    pending_detection_ = r.detected;
  }
  summary_.wall_seconds = seconds_since(start_);
  std::ostringstream s;
  s << "summary: " << (summary_.exit_code == 0 ? "finished" : "FAILED") << " after " << summary_.attempts
    << " attempt(s); failures:";
  if (summary_.failures.empty()) s << " none";
  for (const auto& [kind, n] : summary_.failures) s << " " << kind << " " << n;
  s << "; steps recomputed " << summary_.steps_recomputed;
  char wall[32];
  std::snprintf(wall, sizeof wall, "; wall %.1f s", summary_.wall_seconds);
  s << wall << "; recoveries (detection -> training resumed):";
  if (summary_.recoveries.empty()) s << " none";
  for (const Recovery& rec : summary_.recoveries) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " %.2f s (%s, %lld steps lost, %d ranks)", rec.seconds, rec.failure.c_str(),
                  static_cast<long long>(rec.steps_lost), rec.ranks);
    s << buf;
  }
  if (summary_.exit_code != 0) s << "; stopped: " << summary_.error;
  event(s.str());
  std::error_code ec;
  fs::remove_all(work_, ec);
  return summary_;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Public helpers

std::vector<Host> read_hostfile(const std::string& path) {
  std::ifstream in(path);
  TUTTI_CHECK_AS(ConfigError, in.good(), "cannot read the hostfile '", path, "'");
  std::vector<Host> hosts;
  std::string line;
  static const std::regex slots_re("^(slots|max_slots)=([0-9]+)$");
  for (int n = 1; std::getline(in, line); ++n) {
    if (const size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    Host h;
    if (!(words >> h.name)) continue;
    for (std::string w; words >> w;) {
      std::smatch m;
      TUTTI_CHECK_AS(InvalidArgument, std::regex_match(w, m, slots_re), path, ":", n, ": '", w,
                     "' is not slots=N (a hostfile line is: HOST [slots=N])");
      if (m[1] == "slots") h.slots = std::stoi(m[2]);
    }
    hosts.push_back(h);
  }
  TUTTI_CHECK_AS(ConfigError, !hosts.empty(), "the hostfile '", path, "' names no host");
  return hosts;
}

bool host_reachable(const std::string& host, int port, double timeout_s) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  TUTTI_CHECK_AS(InvalidArgument, rc == 0, "unknown host '", host, "': ", ::gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, ::freeaddrinfo);
  for (addrinfo* a = list.get(); a; a = a->ai_next) {
    UniqueFd sock(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (sock.get() < 0) continue;
    if (::connect(sock.get(), a->ai_addr, a->ai_addrlen) == 0) return true;
    if (errno == ECONNREFUSED) return true;  // a host that answers, with nothing on the port
    if (errno != EINPROGRESS) continue;
    pollfd p{sock.get(), POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(timeout_s * 1000)) != 1) continue;
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(sock.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err == 0 || err == ECONNREFUSED) return true;
  }
  return false;
}

int choose_ranks(int available, int min_ranks, int64_t batch, int64_t micro_batch) {
  for (int n = available; n >= std::max(1, min_ranks); --n) {
    if (batch % n != 0) continue;
    if (micro_batch > 0 && (batch / n) % micro_batch != 0) continue;
    return n;
  }
  return 0;
}

LaunchSummary supervise(const LaunchOptions& options) { return Supervisor(options).run(); }

}  // namespace tutti::launch
