// tutti sweep: the halving rule, bad sweep files (one error line, nothing written), trials that
// reproduce alone from their printed command, halving that stops the losers and never the best,
// and a crashing trial that does not stop the sweep.
#include "tutti/train/sweep.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "process_util.hpp"
#include "test_util.hpp"

using namespace tutti;
using namespace tutti::test;

namespace {

const std::string kData = std::string(TUTTI_SOURCE_DIR) + "/data/tinyshakespeare.txt";

// A tiny model that trains in well under a second; the large learning rate wins clearly. `searched`:
// keys left out (the [search] table sets them).
std::string tiny_base(int steps = 40, const std::set<std::string>& searched = {}) {
  const std::pair<std::string, std::string> settings[] = {{"layers", "1"},
                                                          {"heads", "2"},
                                                          {"dim", "16"},
                                                          {"context", "16"},
                                                          {"batch", "2"},
                                                          {"steps", std::to_string(steps)},
                                                          {"eval_interval", "10"},
                                                          {"eval_batches", "1"},
                                                          {"sample_tokens", "0"},
                                                          {"warmup", "0"},
                                                          {"decay", "\"constant\""},
                                                          {"data", "\"" + kData + "\""}};
  std::string text = "[base]\n";
  for (const auto& [key, value] : settings)
    if (!searched.count(key)) text += key + " = " + value + "\n";
  return text;
}

fs::path write_config(const std::string& name, const std::string& text) {
  const fs::path p = scratch() / (name + ".toml");
  std::ofstream(p) << text;
  return p;
}

Result sweep(const fs::path& config, const std::string& args) {
  return shell(std::string(TUTTI_CLI) + " sweep " + config.string() + " " + args);
}

int lines(const std::string& s) { return int(std::count(s.begin(), s.end(), '\n')); }

// sweep.jsonl: trial name -> its result line.
std::map<std::string, nlohmann::json> results(const fs::path& out) {
  std::map<std::string, nlohmann::json> by_name;
  std::ifstream in(out / "sweep.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    by_name[j["trial"].get<std::string>()] = j;
  }
  return by_name;
}

// The exact text of every training loss in a run's metrics.jsonl, by step.
std::map<int, std::string> loss_texts(const fs::path& run) {
  std::map<int, std::string> out;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("loss")) out[j["step"].get<int>()] = j["loss"].dump();
  }
  return out;
}

}  // namespace

// ============================================================================================
// The halving rule
// ============================================================================================

TEST(SuccessiveHalving, KeepsTheTopOneOverEta) {
  train::SuccessiveHalving h({10, 20}, 3);
  EXPECT_TRUE(h.report(0, 0, 5.0)) << "the first at a rung is the best so far";
  EXPECT_FALSE(h.report(0, 1, 6.0)) << "2 reported: keep ceil(2/3) = 1";
  EXPECT_TRUE(h.report(0, 2, 4.0)) << "a new best continues";
  EXPECT_TRUE(h.report(0, 3, 4.5)) << "4 reported: keep 2, and it ranks second";
  EXPECT_FALSE(h.report(0, 4, NAN)) << "NaN ranks last";
  EXPECT_TRUE(h.report(1, 1, 9.0)) << "rungs are counted apart";
  train::SuccessiveHalving ties({10}, 2);
  EXPECT_TRUE(ties.report(0, 0, 1.0));
  EXPECT_TRUE(ties.report(0, 1, 1.0)) << "a tie shares the better rank";
}

TEST(SuccessiveHalving, NeverStopsTheBestAtARung) {
  std::mt19937 gen(7);
  for (int round = 0; round < 200; ++round) {
    const int n = 2 + int(gen() % 30);
    const double eta = 2 + (gen() % 3);
    std::vector<double> values(n);
    for (double& v : values) v = std::uniform_real_distribution<double>(0, 10)(gen);
    const double best = *std::min_element(values.begin(), values.end());
    train::SuccessiveHalving h({100}, eta);
    for (int i = 0; i < n; ++i) {
      const bool keep = h.report(0, i, values[i]);
      if (values[i] == best) EXPECT_TRUE(keep) << "round " << round << ": the best was stopped";
      // The rule, counted directly: its place among the i + 1 reported so far.
      const int place =
          1 + int(std::count_if(values.begin(), values.begin() + i, [&](double v) { return v < values[i]; }));
      EXPECT_EQ(keep, place <= std::max(1, int(std::ceil((i + 1) / eta)))) << "round " << round << ", trial " << i;
    }
  }
}

// ============================================================================================
// Bad sweep files: one error line naming the problem, a non-zero exit, nothing written
// ============================================================================================

TEST(SweepConfig, BadFilesFailBeforeAnythingRuns) {
  const std::string base = tiny_base();
  const struct {
    const char* name;
    std::string text, must_mention;
  } cases[] = {
      {"no_search", base, "search space is empty"},
      {"empty_search", base + "[search]\n", "search space is empty"},
      {"empty_list", base + "[search]\nlr = []\n", "lr: the list of values is empty"},
      {"unknown_base_key", base + "layer_count = 2\n[search]\nlr = [1e-3]\n", "layer_count"},
      {"unknown_search_key", base + "[search]\nlearning_rate = [1e-3]\n", "learning_rate"},
      {"unknown_sweep_key", base + "[search]\nlr = [1e-3]\n[sweep]\nworker = 2\n", "worker"},
      {"unknown_table", base + "[search]\nlr = [1e-3]\n[serach]\n", "serach"},
      {"bad_value", base + "[search]\ndim = [\"wide\"]\n", "dim"},
      {"bad_combination", base + "[search]\nheads = [2, 3]\n", "heads"},
      {"repeated_value", base + "[search]\nlr = [1e-3, 0.001]\n", "0.001 is listed twice"},
      {"min_above_max", base + "[search]\nlr = {min = 0.1, max = 0.01}\n[sweep]\ntrials = 2\n",
       "min 0.1 is greater than max 0.01"},
      {"log_range_at_zero", base + "[search]\nlr = {min = 0, max = 0.01, log = true}\n[sweep]\ntrials = 2\n",
       "min > 0"},
      {"range_without_trials", base + "[search]\nlr = {min = 1e-4, max = 1e-2}\n", "trials"},
      {"rung_off_the_grid", base + "[search]\nlr = [1e-3]\n[sweep]\nrungs = [15]\n", "15 is not an evaluation step"},
      {"rung_at_the_end", base + "[search]\nlr = [1e-3]\n[sweep]\nrungs = [10, 40]\n", "40 is not before the end"},
      {"rungs_decrease", base + "[search]\nlr = [1e-3]\n[sweep]\nrungs = [20, 10]\n", "must increase"},
      {"eta_one", base + "[search]\nlr = [1e-3]\n[sweep]\neta = 1\n", "eta"},
      {"bad_metric", base + "[search]\nlr = [1e-3]\n[sweep]\nmetric = \"accuracy\"\n", "accuracy"},
      {"out_in_base", base + "out = \"x\"\n[search]\nlr = [1e-3]\n", "out"},
      {"threads_searched", base + "[search]\nthreads = [1, 2]\n", "threads_per_trial"},
      {"several_ranks", base + "eval_rank = 1\n[search]\nlr = [1e-3]\n", "eval_rank"},
      {"both_tables", base + "[search]\nsteps = [10, 20]\n", "steps"},
      {"not_toml", "[base\n", "sweep file"},
  };
  for (const auto& c : cases) {
    const fs::path out = scratch() / (std::string("never_") + c.name);
    const Result r = sweep(write_config(c.name, c.text), "--out " + out.string());
    EXPECT_NE(r.code, 0) << c.name;
    EXPECT_EQ(lines(r.err), 1) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find("tutti: error: "), std::string::npos) << c.name << ": " << r.err;
    EXPECT_NE(r.err.find(c.must_mention), std::string::npos)
        << c.name << ": '" << c.must_mention << "' not in " << r.err;
    EXPECT_FALSE(fs::exists(out)) << c.name << ": a refused sweep wrote its directory";
  }
}

TEST(SweepConfig, DryRunListsTrialsAndWritesNothing) {
  const fs::path config =
      write_config("dry", tiny_base(40, {"dim"}) +
                              "[search]\nlr = {min = 1e-4, max = 1e-2, log = true}\ndim = [16, 32]\n"
                              "[sweep]\ntrials = 5\nseed = 3\n");
  const fs::path out = scratch() / "dry_out";
  const Result a = sweep(config, "--dry-run --out " + out.string()),
               b = sweep(config, "--dry-run --out " + out.string());
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(a.out, b.out) << "a random search is drawn from its seed";
  for (const char* name : {"trial_000", "trial_004", "--lr ", "--dim ", "--seed ", "--threads 1", "random search"})
    EXPECT_NE(a.out.find(name), std::string::npos) << name << " in " << a.out;
  EXPECT_EQ(a.out.find("trial_005"), std::string::npos);
  EXPECT_FALSE(fs::exists(out));
}

TEST(SweepConfig, Help) {
  const Result r = shell(std::string(TUTTI_CLI) + " sweep --help");
  EXPECT_EQ(r.code, 0);
  for (const char* text : {"--out", "--workers", "--dry-run", "[base]", "[search]", "[sweep]", "trials", "eta", "rungs",
                           "threads_per_trial", "metric", "ceil(n / eta)"})
    EXPECT_NE(r.out.find(text), std::string::npos) << text;
  EXPECT_NE(shell(std::string(TUTTI_CLI) + " sweep").code, 0) << "the sweep file is required";
}

TEST(SweepConfig, ShippedExampleIsValid) {
  const Result r = sweep(fs::path(TUTTI_SOURCE_DIR) / "examples/sweep/shakespeare_lr.toml", "--dry-run");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("12 trials (random search), halving eta 3 on val_loss at steps [50, 150]"), std::string::npos)
      << r.out;
}

// ============================================================================================
// Running sweeps
// ============================================================================================

// Trials are independent: a trial run beside others in the sweep and the same trial re-run alone
// from its printed command give bit-identical losses; and each trial has its own seed.
TEST(Sweep, TrialReproducesAloneFromItsCommand) {
  const fs::path config = write_config("repro", tiny_base(30, {"dim"}) +
                                                    "[search]\nlr = [3e-3, 1e-3]\ndim = [16, 32]\n"
                                                    "[sweep]\nworkers = 2\nrungs = []\n");
  const fs::path out = scratch() / "repro_out";
  const Result r = sweep(config, "--out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const auto all = results(out);
  ASSERT_EQ(all.size(), 4u);
  std::set<int64_t> seeds;
  for (const auto& [name, j] : all) {
    EXPECT_EQ(j["status"], "completed") << j.dump();
    EXPECT_EQ(j["steps"], 30);
    seeds.insert(j["seed"].get<int64_t>());
  }
  EXPECT_EQ(seeds.size(), 4u) << "each trial has its own seed";
  for (const auto& [name, j] : all)
    EXPECT_NE(slurp(out / name / "run.toml").find("seed = " + j["seed"].dump() + "\n"), std::string::npos)
        << name << " did not train with its seed";
  const nlohmann::json& trial = all.at("trial_002");  // the grid in key order, the last key fastest
  EXPECT_EQ(trial["settings"]["dim"], "32");
  EXPECT_EQ(trial["settings"]["lr"], "0.003");
  const std::string command = trial["command"].get<std::string>();
  EXPECT_NE(slurp(out / "commands.sh").find(command), std::string::npos);
  EXPECT_NE(r.out.find(command), std::string::npos) << "the sweep prints every trial's command";
  std::string alone = command;
  const std::string trial_out = (out / "trial_002").string(), alone_out = (scratch() / "repro_alone").string();
  alone.replace(alone.find(trial_out), trial_out.size(), alone_out);
  const Result again = shell(alone);
  ASSERT_EQ(again.code, 0) << again.err;
  const auto in_sweep = loss_texts(out / "trial_002"), by_itself = loss_texts(alone_out);
  ASSERT_EQ(in_sweep.size(), 30u);
  EXPECT_EQ(in_sweep, by_itself) << "the trial's losses differ when it runs alone";
  EXPECT_NE(loss_texts(out / "trial_000"), in_sweep);
  for (const char* file : {"sweep.svg", "sweep.toml", "commands.sh", "trial_002/plot.svg", "logs/trial_002.log"})
    EXPECT_TRUE(fs::exists(out / file)) << file;
  const std::string svg = slurp(out / "sweep.svg");
  for (const char* name : {"trial_000 dim=16 lr=0.003", "trial_003 dim=32 lr=0.001"})
    EXPECT_NE(svg.find(name), std::string::npos) << name;

  // The same directory again: refused, and what is there is left as it was.
  const std::string before = slurp(out / "sweep.jsonl");
  const Result twice = sweep(config, "--out " + out.string());
  EXPECT_NE(twice.code, 0);
  EXPECT_EQ(lines(twice.err), 1) << twice.err;
  EXPECT_NE(twice.err.find("already holds a sweep"), std::string::npos) << twice.err;
  EXPECT_EQ(slurp(out / "sweep.jsonl"), before);
}

// lr 3e-3 beats 1e-4 and 1e-5 clearly on the tiny model. One worker makes the arrival order at
// the rungs the trial order: the best reports first, so each later trial is the second or third
// at rung 1 and is stopped there (keep ceil(2/3) = ceil(3/3) = 1).
TEST(Sweep, HalvingStopsTheLosersNeverTheBest) {
  const fs::path config = write_config("halving", tiny_base(60) +
                                                      "[search]\nlr = [3e-3, 1e-4, 1e-5]\n"
                                                      "[sweep]\nworkers = 1\neta = 3\nrungs = [10, 30]\n");
  const fs::path out = scratch() / "halving_out";
  const Result r = sweep(config, "--out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const auto all = results(out);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all.at("trial_000")["status"], "completed");
  EXPECT_EQ(all.at("trial_000")["steps"], 60);
  for (const char* loser : {"trial_001", "trial_002"}) {
    EXPECT_EQ(all.at(loser)["status"], "stopped") << all.at(loser).dump();
    EXPECT_EQ(all.at(loser)["stopped_rung"], 1);
    EXPECT_EQ(all.at(loser)["stopped_step"], 10);
    EXPECT_GT(all.at(loser)["metric"].get<double>(), all.at("trial_000")["metric"].get<double>());
  }
  // The table ranks the best first, and says how the others ended.
  const size_t table = r.out.find("rank  trial");
  ASSERT_NE(table, std::string::npos) << r.out;
  const std::string first_row = r.out.substr(r.out.find('\n', table) + 1, 60);
  EXPECT_EQ(first_row.rfind("1     trial_000", 0), 0u) << first_row;
  EXPECT_NE(r.out.find("stopped at rung 1 (step 10)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("3 trials: 1 completed, 2 stopped early, 0 failed"), std::string::npos) << r.out;
}

// Two workers: the order the trials reach a rung depends on timing, but the best trial ranks
// first at every rung, so it always finishes, and it is ranked first.
TEST(Sweep, BestTrialFinishesWithTwoWorkers) {
  const fs::path config = write_config("halving2", tiny_base(60) +
                                                       "[search]\nlr = [1e-5, 3e-5, 3e-3, 1e-4]\n"
                                                       "[sweep]\nworkers = 2\neta = 2\nrungs = [10, 30]\n");
  const fs::path out = scratch() / "halving2_out";
  const Result r = sweep(config, "--out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const auto all = results(out);
  ASSERT_EQ(all.size(), 4u);
  EXPECT_EQ(all.at("trial_002")["status"], "completed");
  EXPECT_EQ(all.at("trial_002")["steps"], 60);
  for (const auto& [name, j] : all)
    if (name != "trial_002" && j["status"] == "completed")
      EXPECT_GT(j["metric"].get<double>(), all.at("trial_002")["metric"].get<double>()) << name;
  const size_t table = r.out.find("rank  trial");
  ASSERT_NE(table, std::string::npos) << r.out;
  EXPECT_EQ(r.out.substr(r.out.find('\n', table) + 1, 15), "1     trial_002") << r.out;
}

TEST(Sweep, CrashingTrialIsRecordedAndTheSweepGoesOn) {
  const fs::path config = write_config("crash", tiny_base(20, {"data"}) + "[search]\ndata = [\"" + kData +
                                                    "\", \"/nonexistent/corpus.txt\"]\n[sweep]\nworkers = 2\n");
  const fs::path out = scratch() / "crash_out";
  const Result r = sweep(config, "--out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const auto all = results(out);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all.at("trial_000")["status"], "completed");
  const nlohmann::json& failed = all.at("trial_001");
  EXPECT_EQ(failed["status"], "failed");
  const std::string why = failed["failure"].get<std::string>();
  EXPECT_NE(why.find("exit status 1"), std::string::npos) << why;
  EXPECT_NE(why.find("/nonexistent/corpus.txt"), std::string::npos) << "the trial's own error line: " << why;
  EXPECT_NE(r.out.find("1 completed, 0 stopped early, 1 failed"), std::string::npos) << r.out;
}

// SIGTERM to the sweep alone (a job scheduler's way) must not leave its trials training.
TEST(Sweep, SigtermStopsTheRunningTrials) {
  const fs::path config = write_config(
      "long", tiny_base(1000000) + "[search]\nlr = [1e-3, 2e-3, 3e-3]\n[sweep]\nworkers = 2\nrungs = []\n");
  const fs::path out = scratch() / "interrupted_out";
  const Result r = shell("(" + std::string(TUTTI_CLI) + " sweep " + config.string() + " --out " + out.string() +
                         " >/dev/null 2>&1 & pid=$!; sleep 1.5; kill -TERM $pid; wait $pid; echo $?)");
  EXPECT_EQ(r.out, "1\n") << "the sweep's exit status";
  int left = 0;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string cmdline = slurp(entry.path() / "cmdline");
    left += cmdline.find(out.string() + "/trial_") != std::string::npos;
  }
  EXPECT_EQ(left, 0) << "trials still running after the sweep ended";
  const auto all = results(out);
  EXPECT_EQ(all.size(), 2u) << "the two running trials are recorded; the third never started";
  for (const auto& [name, j] : all) {
    EXPECT_EQ(j["status"], "failed");
    EXPECT_NE(j["failure"].get<std::string>().find("interrupted"), std::string::npos) << j.dump();
  }
}
