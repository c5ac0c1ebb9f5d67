// Running a sweep: each trial a `tutti train` child process (its own OpenMP thread count, and a
// crash cannot take the sweep down), at most `workers` at once through a oneTBB flow graph, its
// metrics.jsonl read as it grows so that successive halving can stop it at a rung.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include <tbb/flow_graph.h>
#include <tbb/global_control.h>
#include <tbb/task_arena.h>

#include "tutti/core/error.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/train/plot.hpp"
#include "tutti/train/sweep.hpp"

extern char** environ;

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kPollInterval = std::chrono::milliseconds(20);
constexpr double kStopGraceSeconds = 10;  // SIGTERM, then SIGKILL after this long

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// ============================================================================================
// Interruption: SIGINT or SIGTERM to the sweep stops its trials
// ============================================================================================

// The signal that interrupted the running sweep (0: none). A global because a signal handler
// can reach nothing else; only StopSignals' handler writes it.
std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) { g_stop_signal.store(sig); }

// While alive, SIGINT and SIGTERM set g_stop_signal instead of ending the sweep at once, so that
// the trials (which a SIGTERM to the sweep alone would leave running) are stopped and recorded.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
  }
  ~StopSignals() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  static int received() { return g_stop_signal.load(); }

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

// ============================================================================================
// A trial's process
// ============================================================================================

// `argv` started with posix_spawn, stdin from /dev/null, stdout and stderr into `log_path`. It
// stays in the sweep's process group, so a Ctrl-C of the sweep ends the trials too. Variables of
// an MPI launch are not passed on: a trial is a world of one even when the sweep runs under mpirun.
// TUTTI_CORES tells it the cores it has (its threads), not the machine's: with none to spare, its
// evaluations run in turn rather than on a core another trial is using (docs/tasks.md).
class TrialProcess {
 public:
  TrialProcess(const std::vector<std::string>& argv, const std::string& log_path, int cores) {
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    std::vector<char*> env;
    for (char** e = environ; *e; ++e)
      if (std::strncmp(*e, "OMPI_", 5) != 0 && std::strncmp(*e, "PMIX_", 5) != 0 && std::strncmp(*e, "PMI_", 4) != 0 &&
          std::strncmp(*e, "TUTTI_CORES=", 12) != 0)
        env.push_back(*e);
    std::string cores_var = "TUTTI_CORES=" + std::to_string(cores);
    env.push_back(cores_var.data());
    env.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    const int rc = ::posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), env.data());
    posix_spawn_file_actions_destroy(&actions);
    TUTTI_CHECK(rc == 0, "cannot start '", argv[0], "': ", std::strerror(rc));
  }
  TrialProcess(const TrialProcess&) = delete;
  TrialProcess& operator=(const TrialProcess&) = delete;
  ~TrialProcess() {
    if (!status_) stop(0);
  }

  // The wait status once the process has ended; never blocks.
  const std::optional<int>& poll() {
    int st = 0;
    if (!status_ && ::waitpid(pid_, &st, WNOHANG) == pid_) status_ = st;
    return status_;
  }

  // SIGTERM, up to `grace_s` to end, then SIGKILL; returns the wait status.
  int stop(double grace_s) {
    if (poll()) return *status_;
    ::kill(pid_, SIGTERM);
    const auto t0 = Clock::now();
    while (!poll() && seconds_since(t0) < grace_s) std::this_thread::sleep_for(kPollInterval);
    if (!status_) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      if (::waitpid(pid_, &st, 0) == pid_) status_ = st;
    }
    return status_.value_or(-1);
  }

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
};

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return "signal " + std::to_string(WTERMSIG(status)) + " (" + ::strsignal(WTERMSIG(status)) + ")";
  return "wait status " + std::to_string(status);
}

// The complete lines appended to a file since the last call (none until it exists); a torn last
// line waits for its end.
class LineTail {
 public:
  explicit LineTail(fs::path path) : path_(std::move(path)) {}
  std::vector<std::string> read() {
    std::vector<std::string> lines;
    if (!in_.is_open()) {
      in_.open(path_, std::ios::binary);
      if (!in_.is_open()) return lines;
    }
    char buf[65536];
    for (;;) {
      in_.read(buf, sizeof buf);
      const std::streamsize n = in_.gcount();
      if (n <= 0) break;
      pending_.append(buf, size_t(n));
    }
    in_.clear();  // at the end of the file for now; later reads continue from here
    size_t start = 0;
    for (size_t nl; (nl = pending_.find('\n', start)) != std::string::npos; start = nl + 1)
      lines.push_back(pending_.substr(start, nl - start));
    pending_.erase(0, start);
    return lines;
  }

 private:
  fs::path path_;
  std::ifstream in_;
  std::string pending_;
};

std::string last_line_of(const fs::path& path) {
  std::ifstream in(path);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty() && line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  return last;
}

// ============================================================================================
// The sweep's shared state
// ============================================================================================

struct SweepState {
  const SweepConfig& config;
  std::ostream& log;
  SuccessiveHalving halving;
  std::mutex mutex;  // everything below, and the log
  std::ofstream jsonl;
  std::vector<TrialResult> finished;
  size_t total = 0;

  void say(const std::string& line) {
    std::lock_guard lock(mutex);
    log << line << "\n" << std::flush;
  }
};

std::string format_metric(double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, s < 100 ? "%.1fs" : "%.0fs", s);
  return buf;
}

nlohmann::json result_json(const TrialResult& r) {
  nlohmann::json settings = nlohmann::json::object();
  for (const auto& [key, value] : r.trial.searched) settings[key] = value;
  const char* status = r.status == TrialResult::Status::completed ? "completed"
                       : r.status == TrialResult::Status::stopped ? "stopped"
                                                                  : "failed";
  nlohmann::json j = {{"trial", r.trial.name},   {"index", r.trial.index},     {"settings", settings},
                      {"seed", r.trial.seed},   {"status", status},           {"steps", r.steps},
                      {"wall_s", r.wall_seconds}, {"command", r.trial.command()}};
  j["metric"] = std::isfinite(r.metric) ? nlohmann::json(r.metric) : nlohmann::json(nullptr);
  if (r.status == TrialResult::Status::stopped) j["stopped_rung"] = r.stopped_rung, j["stopped_step"] = r.stopped_step;
  if (r.status == TrialResult::Status::failed) j["failure"] = r.failure;
  return j;
}

// The metric curve of every finished trial; a stopped trial's ends in a cross.
void write_sweep_plot(const std::string& path, const std::vector<TrialResult>& results, const std::string& metric) {
  Chart chart{"sweep: " + metric + " of every trial", "step", metric, {}};
  std::vector<const TrialResult*> by_index;
  for (const TrialResult& r : results) by_index.push_back(&r);
  std::sort(by_index.begin(), by_index.end(), [](auto* a, auto* b) { return a->trial.index < b->trial.index; });
  for (const TrialResult* r : by_index) {
    Series s;
    s.name = r->trial.name;
    for (const auto& [key, value] : r->trial.searched) s.name += " " + key + "=" + value;
    if (r->status != TrialResult::Status::completed)
      s.name += r->status == TrialResult::Status::stopped ? " (stopped)" : " (failed)";
    for (const auto& [step, v] : r->curve) s.x.push_back(double(step)), s.y.push_back(v);
    s.markers = s.x.size() <= 40;
    s.end_marker = r->status == TrialResult::Status::stopped;
    chart.series.push_back(std::move(s));
  }
  write_svg(path, {chart});
}

// ============================================================================================
// One trial
// ============================================================================================

// Reads what the trial has written since the last call: its curve and steps, and (while `report`)
// its metric at the rungs. Returns false when halving says it stops (the rung recorded in `r`).
bool follow(LineTail& metrics, TrialResult& r, size_t& next_rung, SweepState& state, bool report) {
  const std::vector<int64_t>& rungs = state.halving.rungs();
  bool keep_going = report;
  for (const std::string& line : metrics.read()) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) continue;
    const int64_t step = j["step"].get<int64_t>();
    r.steps = std::max(r.steps, step);
    auto m = j.find(state.config.metric);
    if (m == j.end()) continue;
    const double value = m->is_number() ? m->get<double>() : NAN;
    r.curve.emplace_back(step, value);
    while (next_rung < rungs.size() && rungs[next_rung] < step) ++next_rung;  // not an evaluation step here
    if (keep_going && next_rung < rungs.size() && rungs[next_rung] == step) {
      if (!state.halving.report(next_rung, r.trial.index, value)) {
        keep_going = false;
        r.metric = value;
        r.stopped_rung = int(next_rung) + 1;
        r.stopped_step = step;
      }
      ++next_rung;
    }
  }
  return keep_going || !report;
}

TrialResult run_trial(const Trial& trial, SweepState& state) {
  TrialResult r;
  r.trial = trial;
  r.metric = NAN;
  const auto t0 = Clock::now();
  const fs::path log_path = fs::path(state.config.out) / "logs" / (trial.name + ".log");
  state.say("start " + trial.name + ": " + trial.command());
  TrialProcess process(trial.argv, log_path.string(), state.config.threads_per_trial);
  LineTail metrics(fs::path(trial.out) / "metrics.jsonl");
  size_t next_rung = 0;
  bool stopped = false;
  for (;;) {
    const bool ended = process.poll().has_value();
    if (!follow(metrics, r, next_rung, state, true)) stopped = true;  // binding even if it ended meanwhile
    if (ended || stopped || StopSignals::received()) break;
    std::this_thread::sleep_for(kPollInterval);
  }
  const int status = process.stop(kStopGraceSeconds);
  if (!follow(metrics, r, next_rung, state, /*report=*/!stopped)) stopped = true;  // lines written before it ended
  r.wall_seconds = seconds_since(t0);
  std::stable_sort(r.curve.begin(), r.curve.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  if (stopped) {
    r.status = TrialResult::Status::stopped;
  } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    r.status = TrialResult::Status::completed;
    r.metric = r.curve.empty() ? NAN : r.curve.back().second;
  } else if (StopSignals::received()) {  // stopped by the sweep's SIGTERM, or Ctrl-C reached it too
    r.status = TrialResult::Status::failed;
    r.failure = "interrupted: the sweep received signal " + std::to_string(StopSignals::received());
  } else {
    r.status = TrialResult::Status::failed;
    r.failure = describe_status(status);
    const std::string last = last_line_of(log_path);
    if (!last.empty()) r.failure += ": " + last;
  }
  if (fs::exists(fs::path(trial.out) / "metrics.jsonl")) {
    try {
      plot_run(trial.out);
    } catch (const std::exception& e) {
      state.say("tutti: warning: no plot of " + trial.name + ": " + e.what());
    }
  }
  return r;
}

// A trial has ended: its line in sweep.jsonl, the sweep's plot redrawn, a progress line.
void record(TrialResult r, SweepState& state) {
  std::lock_guard lock(state.mutex);
  state.jsonl << result_json(r).dump() << "\n" << std::flush;
  state.finished.push_back(std::move(r));
  const TrialResult& last = state.finished.back();
  try {
    write_sweep_plot((fs::path(state.config.out) / "sweep.svg").string(), state.finished, state.config.metric);
  } catch (const std::exception& e) {
    state.log << "tutti: warning: no sweep plot: " << e.what() << "\n";
  }
  state.log << "[" << state.finished.size() << "/" << state.total << "] " << last.trial.name << " "
            << last.status_text() << ": " << state.config.metric << " " << format_metric(last.metric) << ", "
            << last.steps << " steps, " << format_seconds(last.wall_seconds) << "\n"
            << std::flush;
}

// ============================================================================================
// Ranking
// ============================================================================================

void rank(std::vector<TrialResult>& results) {
  auto group = [](const TrialResult& r) {
    return r.status == TrialResult::Status::completed ? 0 : r.status == TrialResult::Status::stopped ? 1 : 2;
  };
  auto key = [](double v) { return std::isfinite(v) ? v : INFINITY; };
  std::stable_sort(results.begin(), results.end(), [&](const TrialResult& a, const TrialResult& b) {
    if (group(a) != group(b)) return group(a) < group(b);
    if (a.stopped_rung != b.stopped_rung) return a.stopped_rung > b.stopped_rung;  // deeper rungs first
    if (key(a.metric) != key(b.metric)) return key(a.metric) < key(b.metric);
    return a.trial.index < b.trial.index;
  });
}

// The output directory: absent or empty, never a previous sweep or other files.
void check_out_dir(const std::string& out) {
  if (!fs::exists(out)) return;
  TUTTI_CHECK_AS(ConfigError, fs::is_directory(out), "sweep output path '", out, "' exists and is not a directory");
  TUTTI_CHECK_AS(ConfigError, !fs::exists(fs::path(out) / "sweep.jsonl"), "sweep output directory '", out,
                 "' already holds a sweep (sweep.jsonl); choose another [sweep] out or --out");
  TUTTI_CHECK_AS(ConfigError, fs::is_empty(out), "sweep output directory '", out,
                 "' already holds other files; choose another [sweep] out or --out");
}

}  // namespace

// ============================================================================================
// Successive halving
// ============================================================================================

SuccessiveHalving::SuccessiveHalving(std::vector<int64_t> rungs, double eta)
    : rungs_(std::move(rungs)), eta_(eta), reported_(rungs_.size()) {
  TUTTI_CHECK_AS(ConfigError, eta > 1, "the halving factor eta must be greater than 1, got ", eta);
}

bool SuccessiveHalving::report(size_t rung, int trial, double value) {
  TUTTI_CHECK(rung < rungs_.size(), "trial ", trial, " reports rung ", rung, " of ", rungs_.size());
  const double v = std::isnan(value) ? INFINITY : value;
  std::lock_guard lock(mutex_);
  std::vector<double>& seen = reported_[rung];
  seen.push_back(v);
  const size_t n = seen.size(), keep = std::max<size_t>(1, size_t(std::ceil(double(n) / eta_ - 1e-9)));
  const size_t better = size_t(std::count_if(seen.begin(), seen.end(), [&](double o) { return o < v; }));
  return better + 1 <= keep;  // its rank (ties share the better rank) is within the kept top
}

std::string TrialResult::status_text() const {
  if (status == Status::completed) return "completed";
  if (status == Status::stopped)
    return "stopped at rung " + std::to_string(stopped_rung) + " (step " + std::to_string(stopped_step) + ")";
  return "failed: " + failure;
}

SweepResult run_sweep(SweepConfig config, const SweepOptions& options) {
  std::ostream& log = options.log ? *options.log : std::cout;
  const std::vector<Trial> trials = plan_trials(config, options.binary);
  check_out_dir(config.out);
  const int workers = config.workers > 0 ? config.workers : std::max(1, hardware_threads() / config.threads_per_trial);
  fs::create_directories(fs::path(config.out) / "logs");
  fs::copy_file(config.path, fs::path(config.out) / "sweep.toml");
  {
    std::ofstream commands(fs::path(config.out) / "commands.sh");
    commands << "#!/bin/sh\n# every trial of the sweep, each reproducible alone (run from the sweep's directory)\n";
    for (const Trial& t : trials) commands << t.command() << "\n";
  }
  SweepState state{config, log, SuccessiveHalving(config.rungs, config.eta), {}, {}, {}, trials.size()};
  state.jsonl.open(fs::path(config.out) / "sweep.jsonl", std::ios::app);
  TUTTI_CHECK(state.jsonl.good(), "cannot write '", (fs::path(config.out) / "sweep.jsonl").string(), "'");
  std::ostringstream halving;
  halving << "halving eta " << config.eta << " on " << config.metric << " at steps";
  for (int64_t r : config.rungs) halving << " " << r;
  log << "sweep: " << trials.size() << " trials, " << workers << " at once (" << config.threads_per_trial << " thread"
      << (config.threads_per_trial > 1 ? "s" : "") << " each), "
      << (config.rungs.empty() ? "no early stopping" : halving.str()) << ", into " << config.out << "\n"
      << std::flush;

  // At most `workers` trials at once; the node's queue is FIFO, so trials start in index order,
  // each as soon as a running one ends. A trial's task blocks on its process, so the arena has a
  // thread for every worker whatever the number of cores.
  const auto t0 = Clock::now();
  tbb::global_control threads(tbb::global_control::max_allowed_parallelism, size_t(workers) + 1);
  tbb::task_arena arena(workers + 1);
  const StopSignals signals;
  arena.execute([&] {
    tbb::flow::graph graph;
    tbb::flow::function_node<size_t> run(graph, size_t(workers), [&](size_t i) {
      if (StopSignals::received()) return tbb::flow::continue_msg();  // interrupted: start no more
      TrialResult r;
      try {
        r = run_trial(trials[i], state);
      } catch (const std::exception& e) {  // it could not start: recorded, the sweep goes on
        r.trial = trials[i];
        r.metric = NAN;
        r.failure = e.what();
      }
      record(std::move(r), state);
      return tbb::flow::continue_msg();
    });
    for (size_t i = 0; i < trials.size(); ++i) run.try_put(i);
    graph.wait_for_all();
  });
  TUTTI_CHECK(!StopSignals::received(), "interrupted by signal ", StopSignals::received(), " (",
              ::strsignal(StopSignals::received()), "): its trials were stopped; ", state.finished.size(), " of ",
              trials.size(), " are recorded in ", (fs::path(config.out) / "sweep.jsonl").string());

  SweepResult result;
  result.trials = std::move(state.finished);
  result.wall_seconds = seconds_since(t0);
  result.workers = workers;
  double busy = 0;
  for (const TrialResult& r : result.trials) busy += r.wall_seconds;
  result.busy_fraction = result.wall_seconds > 0 ? busy / (workers * result.wall_seconds) : 0;
  rank(result.trials);
  return result;
}

std::string format_table(const SweepResult& result, const std::string& metric) {
  std::vector<std::string> header = {"rank", "trial"};
  const std::vector<TrialResult>& rs = result.trials;
  if (!rs.empty())
    for (const auto& [key, value] : rs.front().trial.searched) header.push_back(key);
  for (const char* h : {"", "steps", "wall", "status"}) header.push_back(*h ? h : metric);
  std::vector<std::vector<std::string>> rows = {header};
  for (size_t i = 0; i < rs.size(); ++i) {
    const TrialResult& r = rs[i];
    std::vector<std::string> row = {r.status == TrialResult::Status::failed ? "-" : std::to_string(i + 1),
                                    r.trial.name};
    for (const auto& [key, value] : r.trial.searched) row.push_back(value);
    for (const std::string& cell :
         {format_metric(r.metric), std::to_string(r.steps), format_seconds(r.wall_seconds), r.status_text()})
      row.push_back(cell);
    rows.push_back(std::move(row));
  }
  std::vector<size_t> width(header.size(), 0);
  for (const auto& row : rows)
    for (size_t c = 0; c + 1 < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  std::ostringstream out;
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c)
      out << row[c] << (c + 1 < row.size() ? std::string(width[c] - row[c].size() + 2, ' ') : "\n");
  }
  size_t count[3] = {0, 0, 0};
  for (const TrialResult& r : rs) ++count[int(r.status)];
  char summary[256];
  std::snprintf(summary, sizeof summary,
                "%zu trials: %zu completed, %zu stopped early, %zu failed; %s with %d worker%s (busy %.0f%%): %.0f "
                "trials/hour\n",
                rs.size(), count[0], count[1], count[2], format_seconds(result.wall_seconds).c_str(), result.workers,
                result.workers == 1 ? "" : "s", 100 * result.busy_fraction,
                result.wall_seconds > 0 ? double(rs.size()) * 3600 / result.wall_seconds : 0.0);
  out << "\n" << summary;
  if (!rs.empty() && rs.front().status != TrialResult::Status::failed)
    out << "best: " << rs.front().trial.name << " (" << metric << " " << format_metric(rs.front().metric)
        << "), run alone with:\n  " << rs.front().trial.command() << "\n";
  return out.str();
}

}  // namespace tutti::train
