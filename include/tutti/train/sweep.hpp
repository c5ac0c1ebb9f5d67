// `tutti sweep`: many small training runs (a grid or a random search over train settings) as
// independent `tutti train` child processes, at most `workers` at once (a oneTBB flow graph: a
// trial starts as soon as another ends), with asynchronous successive halving stopping the trials
// that fall behind at the rungs. docs/sweep.md describes the config file and the rules.
#pragma once
#include <cstdint>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace tutti::train {

// ============================================================================================
// The sweep file
// ============================================================================================

// A setting's value as text, as `tutti train --KEY VALUE` takes it.
using SettingValues = std::vector<std::pair<std::string, std::string>>;

// One searched setting: a list of values (grid, or a uniform choice in a random search) or a range
// sampled uniformly (log = true: uniformly in log space); an integer setting's samples are rounded.
struct SearchSpace {
  std::string key;
  std::vector<std::string> values;  // the list, each value checked by the setting's parser
  bool is_range = false;
  double min = 0, max = 0;
  bool log = false;
};

struct SweepConfig {
  std::string path;                 // the file it came from
  SettingValues base;               // [base]: settings every trial shares
  std::vector<SearchSpace> search;  // [search], by key (TOML tables are unordered)
  // [sweep]
  int trials = 0;                   // random search: how many trials (0: a grid, every combination)
  int64_t seed = 0;                 // of the random search and of the trials' seeds
  int workers = 0;                  // trials at once (0: the cores / threads_per_trial, at least 1)
  int threads_per_trial = 1;        // compute threads of each trial (`train --threads`)
  std::string out = "runs/sweep";   // the sweep's directory: trial_NNN/, sweep.jsonl, sweep.svg
  std::string metric = "val_loss";  // val_loss or train_loss of the evaluations; lower is better
  double eta = 3;                   // halving factor: the top 1/eta at a rung continue
  std::vector<int64_t> rungs;       // steps at which trials are compared (evaluation steps)
  bool rungs_given = false;         // false: eval_interval x eta^k below the trials' steps
};

// Reads and checks a sweep file: unknown tables or keys, values a setting's parser refuses, empty
// lists, repeated values, ranges with min > max (or min <= 0 with log), keys the sweep sets itself
// (out, threads) or that need several processes (dp, pp, tp, eval_rank). Throws ConfigError naming
// the file, key and value.
SweepConfig load_sweep_config(const std::string& path);

// ============================================================================================
// Trials
// ============================================================================================

struct Trial {
  int index = 0;
  std::string name;        // "trial_007"
  SettingValues searched;  // this trial's values of the searched settings
  int64_t seed = 0;        // `train --seed` (the base's seed when it sets one, else derived)
  std::string out;         // <sweep out>/trial_NNN
  int64_t steps = 0, eval_interval = 0;
  std::vector<std::string> argv;  // the exact command: binary train --KEY VALUE ... --out DIR
  std::string command() const;    // argv as one shell-quoted line
};

// Every trial of the sweep, each built into a TrainConfig and validated (so a bad combination
// fails before anything runs), with the rungs resolved and checked against every trial's
// evaluation grid. Throws ConfigError.
std::vector<Trial> plan_trials(SweepConfig& config, const std::string& binary);

// What a sweep would run (--dry-run): the trials, their settings and commands, and the rungs.
std::string format_plan(const SweepConfig& config, const std::vector<Trial>& trials);

// Asynchronous successive halving: a trial reporting its metric at rung k continues when it ranks
// within the top max(1, ceil(n / eta)) of the n trials that have reported at rung k so far, itself
// included (ties rank alike; NaN ranks last). So the best trial at every rung always continues.
// Thread-safe.
class SuccessiveHalving {
 public:
  SuccessiveHalving(std::vector<int64_t> rungs, double eta);
  const std::vector<int64_t>& rungs() const { return rungs_; }
  // Records `value` of `trial` at rung `rung` (an index into rungs()); true when it continues.
  bool report(size_t rung, int trial, double value);

 private:
  std::vector<int64_t> rungs_;
  double eta_;
  std::mutex mutex_;
  std::vector<std::vector<double>> reported_;  // per rung, in arrival order
};

// ============================================================================================
// Running a sweep
// ============================================================================================

struct TrialResult {
  Trial trial;
  enum class Status { completed, stopped, failed } status = Status::failed;
  double metric = 0;          // the last evaluation's (completed), the stopping rung's (stopped); NaN: none
  int64_t steps = 0;          // the last step in its metrics.jsonl
  int stopped_rung = 0;       // stopped: the rung it lost at, counted from 1 (0: none)
  int64_t stopped_step = -1;  // stopped: that rung's step
  std::string failure;        // failed: its exit status and last line of output
  double wall_seconds = 0;
  std::vector<std::pair<int64_t, double>> curve;  // (step, metric) of every evaluation
  std::string status_text() const;                // "completed", "stopped at rung 1 (step 20)", "failed: ..."
};

struct SweepResult {
  std::vector<TrialResult> trials;  // ranked: completed by metric, then stopped by rung (deepest
                                    // first) and metric, then failed
  double wall_seconds = 0;
  int workers = 0;
  double busy_fraction = 0;  // trial seconds / (workers x wall seconds)
};

struct SweepOptions {
  std::string binary;           // the tutti program the trials run (usually /proc/self/exe)
  std::ostream* log = nullptr;  // progress lines (default std::cout)
};

// Refuses an output directory that holds anything (a previous sweep is never overwritten), then
// writes <out>/sweep.toml (the file), commands.sh (every trial's command), runs the trials and
// writes <out>/sweep.jsonl (a line per trial as it ends), sweep.svg (the metric curves of every
// trial) and each trial's plot.svg. A failed trial does not stop the sweep. Throws ConfigError
// before anything is written when the plan or the directory is bad. SIGINT or SIGTERM during the
// sweep stops the running trials (recorded as failed: interrupted), starts no more, and throws
// Error.
SweepResult run_sweep(SweepConfig config, const SweepOptions& options);

// The ranked table (rank, trial, searched settings, metric, steps, wall time, status), then a
// summary: counts, wall time, workers busy, trials per hour, and the best trial's command.
std::string format_table(const SweepResult& result, const std::string& metric);

}  // namespace tutti::train
