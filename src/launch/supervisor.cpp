// `tutti launch`: the restart policy and the event log. One attempt is mpirun watched until it
// ends or a rank dies, hangs or vanishes; after a failure the job restarts from the newest
// checkpoint, on fewer ranks when hosts were lost. The helpers live beside it: processes and
// /proc in process.cpp, hosts in hosts.cpp, the run directory's settings and progress in
// run_state.cpp, mpirun's output in output_scanner.cpp.
#include "tutti/launch/supervisor.hpp"

#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <utility>

#include "launch/hosts.hpp"
#include "launch/output_scanner.hpp"
#include "launch/process.hpp"
#include "launch/run_state.hpp"
#include "tutti/core/error.hpp"

namespace fs = std::filesystem;

namespace tutti::launch {
namespace {

using Env = std::vector<std::pair<std::string, std::string>>;

// ------------------------------------------------------------------------------------------
// One attempt while it runs: mpirun, what its output said, what /proc and the heartbeats show

struct Attempt {
  Attempt(int attempt, int rank_count, fs::path heartbeat_dir, const std::vector<std::string>& cmd, const Env& env)
      : number(attempt), ranks(rank_count), beats(std::move(heartbeat_dir)), mpirun(cmd, env) {}

  fs::path beat_file(int rank) const { return beats / ("rank_" + std::to_string(rank)); }

  // Forwards and scans what mpirun wrote, waiting up to 100 ms for it.
  void pump_output() {
    pollfd fds[2] = {{out_open ? mpirun.out_fd() : -1, POLLIN, 0}, {err_open ? mpirun.err_fd() : -1, POLLIN, 0}};
    ::poll(fds, 2, 100);
    if (fds[0].revents) out_open = scanner.pump(mpirun.out_fd(), STDOUT_FILENO, pending_out);
    if (fds[1].revents) err_open = scanner.pump(mpirun.err_fd(), STDERR_FILENO, pending_err);
  }

  // After mpirun ended: whether its output is read to the end. Ranks it orphaned may hold the
  // pipes, so after 2 s it counts as read.
  bool output_drained() {
    if (!out_open && !err_open) return true;
    if (!ended) ended = Clock::now();
    return seconds_since(*ended) > 2;
  }

  // Whether the heartbeats and /proc are due for another look (every 0.25 s).
  bool check_due() {
    if (seconds_since(last_check) < 0.25) return false;
    last_check = Clock::now();
    return true;
  }

  const int number, ranks;
  const fs::path beats;  // OUT/heartbeats
  AttemptReport report;
  const Clock::time_point t0 = Clock::now();  // mpirun started
  ChildProcess mpirun;
  OutputScanner scanner{report};
  std::string pending_out, pending_err;
  bool out_open = true, err_open = true;
  Clock::time_point last_check = Clock::now() - std::chrono::seconds(1);
  std::optional<Clock::time_point> ended;     // mpirun's end was seen
  std::optional<Clock::time_point> vanished;  // a rank's process was gone (confirmed) since then
  std::map<int, pid_t> rank_pids;             // the ranks' processes seen in /proc
  struct Gone {
    int rank;
    pid_t pid;
    Clock::time_point since;
  };
  std::optional<Gone> gone;  // the first rank seen gone, not yet confirmed
};

// What the heartbeat files of an attempt say at one look.
struct Heartbeats {
  int beating = 0;                          // ranks with a heartbeat file
  int64_t min_step = INT64_MAX;             // the lowest step among them
  std::optional<std::pair<int, Beat>> stale;  // the rank whose heartbeat is oldest past its limit
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
  void clear_for_fresh_start();

  // One attempt, in the order watch() takes the steps.
  AttemptReport watch(int attempt, int ranks, bool resume);
  void announce_start(int attempt, int ranks, bool resume, const std::vector<std::string>& cmd);
  Heartbeats read_heartbeats(Attempt& a) const;
  void announce_training(Attempt& a, int64_t min_step);
  bool stop_if_rank_vanished(Attempt& a);
  bool stop_if_hung(Attempt& a, const Heartbeats& hb);
  void classify_end(Attempt& a) const;
  void clean_up(Attempt& a, std::uintmax_t metrics_offset);

  // Between attempts, in the order run() takes the steps.
  void report_failure(int attempt, AttemptReport& r);
  bool gives_up(const AttemptReport& r, bool resume, int restarts);
  int ranks_on_remaining_hosts();
  bool prepare_restart(int attempt, const AttemptReport& r, int ranks, int restarts);
  std::string summary_line() const;

  LaunchOptions o_;
  std::ostream& log_;
  Clock::time_point start_;
  std::vector<Host> all_hosts_, hosts_;  // the hostfile's, and those still in use
  fs::path out_, work_;                  // the run directory; the supervisor's own files
  int64_t batch_ = 0, micro_ = 0, micro_batches_ = 0, model_parallel_ = 1, steps_ = 0;
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
      TUTTI_CHECK_AS(InvalidArgument, host_up(h.name, o_), "host '", h.name, "' of ", o_.hostfile,
                     " is unreachable (",
                     o_.host_check.empty() ? "no answer on TCP port " + std::to_string(o_.probe_port)
                                           : "'" + o_.host_check + "' failed",
                     ")");
    hosts_ = all_hosts_;
  }
  batch_ = run_setting(o_.train_args, out_, "batch", 12);
  micro_ = run_setting(o_.train_args, out_, "micro_batch", 0);
  micro_batches_ = run_setting(o_.train_args, out_, "micro_batches", 0);
  model_parallel_ = run_setting(o_.train_args, out_, "pp", 1) * run_setting(o_.train_args, out_, "tp", 1);
  steps_ = run_setting(o_.train_args, out_, "steps", 2000);
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
    args.insert(args.end(), {"--resume", out_.string(), "--dp", std::to_string(ranks / model_parallel_)});
  } else {
    args = without_args(args, {"--out"});
    args.insert(args.end(), {"--out", out_.string()});
  }
  cmd.insert(cmd.end(), args.begin(), args.end());
  return cmd;
}

// A fresh run that failed before its first checkpoint: start it again from nothing. Only what the
// trainer writes is removed, and only when no checkpoint exists.
void Supervisor::clear_for_fresh_start() {
  std::error_code ec;
  for (const char* name : {"run.toml", "metrics.jsonl", "heartbeats", "latest"}) fs::remove_all(out_ / name, ec);
  if (fs::is_directory(out_ / "checkpoints", ec)) fs::remove_all(out_ / "checkpoints", ec);
}

// ------------------------------------------------------------------------------------------
// One attempt

// Runs one attempt until mpirun ends or a rank's heartbeat stands still; every process of the
// attempt is gone when it returns.
AttemptReport Supervisor::watch(int attempt, int ranks, bool resume) {
  const fs::path beats = out_ / "heartbeats";
  std::error_code ec;
  fs::remove_all(beats, ec);  // the previous attempt's; each rank makes the directory again
  const std::uintmax_t metrics_offset = file_size_or_zero(out_ / "metrics.jsonl");
  Env env;
  if (::geteuid() == 0) env = {{"OMPI_ALLOW_RUN_AS_ROOT", "1"}, {"OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"}};
  const std::vector<std::string> cmd = command(ranks, resume);
  announce_start(attempt, ranks, resume, cmd);
  Attempt a(attempt, ranks, beats, cmd, env);
  while (true) {
    a.pump_output();
    if (a.mpirun.poll()) {
      if (a.output_drained()) break;
      continue;
    }
    if (!a.check_due()) continue;
    const Heartbeats hb = read_heartbeats(a);
    if (hb.beating == ranks && !a.report.resumed) announce_training(a, hb.min_step);
    if (stop_if_rank_vanished(a) || stop_if_hung(a, hb)) break;
  }
  if (a.report.kind.empty()) classify_end(a);
  clean_up(a, metrics_offset);
  return a.report;
}

void Supervisor::announce_start(int attempt, int ranks, bool resume, const std::vector<std::string>& cmd) {
  std::string cmd_text;
  for (const std::string& w : cmd) cmd_text += (cmd_text.empty() ? "" : " ") + w;
  event("started attempt " + std::to_string(attempt) + ": " + std::to_string(ranks) + " rank(s) on " +
        describe_hosts(hosts_) + (resume ? ", resuming" : ", fresh run") + " (" + cmd_text + ")");
}

Heartbeats Supervisor::read_heartbeats(Attempt& a) const {
  Heartbeats hb;
  for (int r = 0; r < a.ranks; ++r) {
    const Beat b = read_heartbeat(a.beat_file(r));
    if (!b.present) continue;
    ++hb.beating;
    hb.min_step = std::min(hb.min_step, b.step);
    a.report.max_step = std::max(a.report.max_step, b.step);
    // After its last step a rank stops beating while rank 0 evaluates and writes the final checkpoint.
    const double limit = b.step + 1 >= steps_ ? std::max(o_.heartbeat_timeout, o_.startup_timeout) : o_.heartbeat_timeout;
    if (b.age > limit && (!hb.stale || b.age > hb.stale->second.age)) hb.stale = {r, b};
  }
  return hb;
}

// Every rank has beaten: the attempt is training, and a recovery in progress is complete.
void Supervisor::announce_training(Attempt& a, int64_t min_step) {
  a.report.resumed = true;
  a.report.first_step = min_step;
  std::string text = std::string(a.number == 1 ? "training" : "resumed") + " at step " + std::to_string(min_step) +
                     " (attempt " + std::to_string(a.number) + ", every rank has sent a heartbeat)";
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
// (and cannot see ranks on hosts that vanished); record the moment here and end the job.
// Returns whether it did.
bool Supervisor::stop_if_rank_vanished(Attempt& a) {
  for (const RankProcess& p : find_rank_processes(o_.tutti_binary, out_.string()))
    if (p.rank >= 0 && p.state != 'Z' && p.state != 'X') a.rank_pids[p.rank] = p.pid;
  for (const auto& [rank, pid] : a.rank_pids) {
    // Only ranks in the training loop (an error before it is every rank's, reported by mpirun),
    // not after the last step (ranks exit one by one), not one that printed an error, and only
    // on this machine's ranks (on namespace hosts a rank's /proc entry has been seen to vanish
    // early; there mpirun and the heartbeats decide).
    const bool alive = process_alive(pid);
    const bool in_loop = read_heartbeat(a.beat_file(rank)).present;
    if (alive || !in_loop || a.report.max_step >= steps_ || !a.scanner.rank_error.empty() || !hosts_.empty())
      continue;
    if (!a.gone) a.gone = Attempt::Gone{rank, pid, Clock::now()};
    // Confirmed after 0.3 s: the progress line of the last step may still be on its way.
    if (seconds_since(a.gone->since) < 0.3) return false;
    a.vanished = a.gone->since;
    a.report.detected = *a.vanished;
    a.report.announced = true;
    const Beat b = read_heartbeat(a.beat_file(rank));
    char ago[32];
    std::snprintf(ago, sizeof ago, "%.2f s ago", seconds_since(a.gone->since));
    event("failure detected (attempt " + std::to_string(a.number) + "): rank " + std::to_string(rank) + " (pid " +
          std::to_string(pid) + ") is gone (noticed " + ago + "), last heartbeat at step " +
          std::to_string(std::max<int64_t>(0, b.step)) + "; stopping the job");
    // The survivors wait in a collective, and mpirun takes a second of its own to end the job
    // (longer when the rank's host is gone): end it now.
    kill_stray_ranks(o_.tutti_binary, out_.string());
    a.report.status = a.mpirun.stop(0.5);
    return true;
  }
  return false;
}

// A heartbeat that stands still, or ranks that never beat within --startup-timeout: the attempt
// hangs; end it. Returns whether it did.
bool Supervisor::stop_if_hung(Attempt& a, const Heartbeats& hb) {
  std::string hang;
  if (hb.stale) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "heartbeat of rank %d is %.1f s old (limit %.0f s), at step %lld", hb.stale->first,
                  hb.stale->second.age, o_.heartbeat_timeout, static_cast<long long>(hb.stale->second.step));
    hang = buf;
  } else if (hb.beating < a.ranks && seconds_since(a.t0) > o_.startup_timeout) {
    hang = std::to_string(a.ranks - hb.beating) + " rank(s) sent no heartbeat within --startup-timeout " +
           std::to_string(int(o_.startup_timeout)) + " s";
  }
  if (hang.empty()) return false;
  a.report.detected = Clock::now();
  a.report.kind = "hung";
  for (const RankProcess& p : find_rank_processes(o_.tutti_binary, out_.string()))
    if (p.state == 'T' || p.state == 't')
      hang += "; rank " + std::to_string(p.rank) + " (pid " + std::to_string(p.pid) + ") is stopped";
  a.report.detail = hang;
  a.report.announced = true;
  event("failure detected (attempt " + std::to_string(a.number) + "): " + hang + "; stopping the job");
  kill_stray_ranks(o_.tutti_binary, out_.string());  // first the ranks: a stopped one must not wake up
  a.report.status = a.mpirun.stop(o_.kill_grace);
  return true;
}

// mpirun ended (or was ended for a vanished rank): what kind of end it was, from its status and
// what it printed.
void Supervisor::classify_end(Attempt& a) const {
  AttemptReport& report = a.report;
  const OutputScanner& scanner = a.scanner;
  if (!a.vanished) report.detected = Clock::now();
  report.status = a.mpirun.status() ? *a.mpirun.status() : report.status;
  if (WIFEXITED(report.status) && WEXITSTATUS(report.status) == 0) {
    report.kind = "";
    return;
  }
  const bool signalled = scanner.rank_failure.find("signal") != std::string::npos;
  report.kind = !scanner.host_failure.empty() && !signalled ? "host lost"
                : signalled || a.vanished                   ? "killed"
                                                            : "exited";
  report.detail = !scanner.rank_failure.empty() ? scanner.rank_failure
                  : !scanner.host_failure.empty() ? scanner.host_failure
                  : !scanner.rank_error.empty()   ? scanner.rank_error
                                                  : "a rank failed";
  report.detail += "; mpirun ended with " + describe_status(report.status);
  if (!scanner.rank_error.empty() && report.detail.find(scanner.rank_error) == std::string::npos)
    report.detail += " (" + scanner.rank_error + ")";
}

// Every process of the attempt gone; the steps it completed counted from metrics.jsonl too.
void Supervisor::clean_up(Attempt& a, std::uintmax_t metrics_offset) {
  a.mpirun.stop(0.0);
  const int strays = kill_stray_ranks(o_.tutti_binary, out_.string());
  if (strays > 0) event("killed " + std::to_string(strays) + " rank process(es) left after mpirun ended");
  a.report.max_step = std::max(a.report.max_step, max_metrics_step(out_, metrics_offset));
}

// ------------------------------------------------------------------------------------------
// The job: attempts and restarts

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
    report_failure(attempt, r);
    if (gives_up(r, resume, restarts)) break;
    if (!all_hosts_.empty()) {
      ranks = ranks_on_remaining_hosts();
      if (ranks == 0) break;
    }
    resume = prepare_restart(attempt, r, ranks, ++restarts);
  }
  summary_.wall_seconds = seconds_since(start_);
  event(summary_line());
  std::error_code ec;
  fs::remove_all(work_, ec);
  return summary_;
}

// A failure: what, where (hosts that no longer answer make it "host lost"); counted and logged.
void Supervisor::report_failure(int attempt, AttemptReport& r) {
  const std::vector<std::string> lost = hosts_.empty() ? std::vector<std::string>{} : drop_unreachable(hosts_, o_);
  if (!lost.empty()) r.kind = "host lost";
  ++summary_.failures[r.kind];
  std::string lost_text;
  for (const std::string& h : lost) lost_text += (lost_text.empty() ? "" : ", ") + h;
  event((r.announced ? "attempt " + std::to_string(attempt) + " stopped (" + r.kind + "): "
                     : "failure detected (attempt " + std::to_string(attempt) + ", " + r.kind + "): ") +
        r.detail + (lost.empty() ? "" : "; unreachable: " + lost_text));
}

// Whether the job ends here: a fresh run that failed before its first step (a configuration
// error restarting would only repeat), or the restart budget spent.
bool Supervisor::gives_up(const AttemptReport& r, bool resume, int restarts) {
  if (!resume && r.max_step < 0 && r.kind == "exited") {
    summary_.error = "the run failed before its first step; not restarting (a configuration or data error?)";
    return true;
  }
  if (restarts >= o_.max_restarts) {
    summary_.error = "restart budget spent (" + std::to_string(o_.max_restarts) + " restarts)";
    return true;
  }
  return false;
}

// The rank count the hosts still in use and the batch allow; 0 (and the reason in the summary)
// when there is none.
int Supervisor::ranks_on_remaining_hosts() {
  if (hosts_.empty()) {
    summary_.error = "no reachable host left";
    return 0;
  }
  const int per_host = (o_.ranks + int(all_hosts_.size()) - 1) / int(all_hosts_.size());
  const int available = std::min(o_.ranks, per_host * int(hosts_.size()));
  const int next = choose_ranks(available, o_.min_ranks, batch_, micro_, model_parallel_, micro_batches_);
  if (next == 0)
    summary_.error = std::to_string(available) + " rank(s) available on " + std::to_string(hosts_.size()) +
                     " host(s), and no count from --min-ranks " + std::to_string(o_.min_ranks) + " up " +
                     (model_parallel_ > 1 ? "is a multiple of pp x tp = " + std::to_string(model_parallel_) + " whose replicas divide" : "divides") +
                     " the global batch " + std::to_string(batch_) +
                     (micro_ > 0 ? " into micro-batches of " + std::to_string(micro_) : "") +
                     (micro_batches_ > 0 ? " into " + std::to_string(micro_batches_) + " micro-batches" : "");
  return next;
}

// Restart `restarts` on `ranks` ranks: from the newest checkpoint (or from nothing), the steps
// lost counted and logged. Returns whether the next attempt resumes.
bool Supervisor::prepare_restart(int attempt, const AttemptReport& r, int ranks, int restarts) {
  const std::optional<int64_t> ckpt = latest_checkpoint_step(out_);
  const int64_t from = ckpt.value_or(0);
  const int64_t lost_steps = std::max<int64_t>(0, r.max_step - from);
  summary_.steps_recomputed += lost_steps;
  if (!ckpt && !user_resume_) clear_for_fresh_start();
  const bool resume = ckpt.has_value() || user_resume_;
  event("steps lost: " + std::to_string(lost_steps) + " (attempt " + std::to_string(attempt) + " reached step " +
        std::to_string(std::max<int64_t>(0, r.max_step)) + ", " +
        (ckpt ? "the newest checkpoint is step " + std::to_string(from) : std::string("no checkpoint yet")) + ")");
  event("restart " + std::to_string(restarts) + "/" + std::to_string(o_.max_restarts) + ": " +
        std::to_string(ranks) + " rank(s), " +
        (resume ? "resuming from step " + std::to_string(from) : std::string("starting the run again")));
  summary_.recoveries.push_back({r.kind, from, lost_steps, 0.0, ranks});
  pending_detection_ = r.detected;
  return resume;
}

std::string Supervisor::summary_line() const {
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
  return s.str();
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Public

int choose_ranks(int available, int min_ranks, int64_t batch, int64_t micro_batch, int64_t model_parallel,
                 int64_t micro_batches) {
  for (int n = available; n >= std::max(1, min_ranks); --n) {
    if (n % model_parallel != 0) continue;
    const int64_t dp = n / model_parallel;
    if (batch % dp != 0) continue;
    if (micro_batch > 0 && (batch / dp) % micro_batch != 0) continue;
    if (micro_batches > 0 && (batch / dp) % micro_batches != 0) continue;
    return n;
  }
  return 0;
}

LaunchSummary supervise(const LaunchOptions& options) { return Supervisor(options).run(); }

}  // namespace tutti::launch
