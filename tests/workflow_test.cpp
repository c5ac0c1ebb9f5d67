// Task parallelism: the concurrent workflow (batches prepared ahead, evaluation on a snapshot,
// checkpoints written in the background) computes what the serial one does; --trace writes a
// timeline that `tutti inspect trace` summarises; bad input fails before training.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>

#include "train_runs.hpp"

using namespace tutti::test;
using nlohmann::json;

namespace {

const std::string kTiny =
    " train --layers 1 --heads 2 --dim 16 --context 16 --batch 4 --eval-batches 2 --sample-tokens 20 ";

std::vector<json> metrics(const fs::path& run) {
  std::vector<json> out;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) out.push_back(json::parse(line));
  return out;
}

// step -> (train loss, val loss, sample) of each evaluation.
std::map<int, std::tuple<double, double, std::string>> evaluations(const fs::path& run) {
  std::map<int, std::tuple<double, double, std::string>> out;
  for (const json& j : metrics(run))
    if (j.contains("val_loss"))
      out[j["step"].get<int>()] = {j["train_loss"].get<double>(), j["val_loss"].get<double>(), j.value("sample", "")};
  return out;
}

// Complete spans of one thread either nest or follow each other.
void expect_nested(std::vector<const json*> spans, const std::string& where) {
  std::sort(spans.begin(), spans.end(), [](const json* a, const json* b) {
    const double ta = (*a)["ts"], tb = (*b)["ts"];
    return ta != tb ? ta < tb : (*a)["dur"].get<double>() > (*b)["dur"].get<double>();
  });
  std::vector<double> ends;  // of the open spans
  for (const json* s : spans) {
    const double ts = (*s)["ts"], end = ts + (*s)["dur"].get<double>();
    while (!ends.empty() && ts >= ends.back() - 1.0) ends.pop_back();
    if (!ends.empty()) EXPECT_LE(end, ends.back() + 1.0) << where << ": '" << (*s)["name"] << "' crosses its parent";
    ends.push_back(end);
  }
}

}  // namespace

TEST(Workflow, ConcurrentComputesWhatSerialDoes) {
  const fs::path a = scratch() / "concurrent", b = scratch() / "serial";
  const std::string common = kTiny + "--steps 12 --eval-interval 3 --checkpoint-interval 4 --keep-checkpoints 3 --threads 1 ";
  Result ra = run_tutti(0, common + "--out " + a.string());
  ASSERT_EQ(ra.code, 0) << ra.err;
  Result rb = run_tutti(0, common + "--workflow serial --out " + b.string());
  ASSERT_EQ(rb.code, 0) << rb.err;
  expect_same_losses(a, b, 1, 0.0);
  const auto ea = evaluations(a), eb = evaluations(b);
  EXPECT_EQ(ea.size(), 5u) << "steps 0, 3, 6, 9 and 12";
  EXPECT_EQ(ea, eb) << "the same weights evaluated, reported against their step";
  EXPECT_FALSE(std::get<2>(ea.at(12)).empty()) << "a sample with each evaluation";
  for (int step : {4, 8, 12}) expect_same_weights(a, b, step, -1, 0.0);
  // ... and what was evaluated is the step's weights: `tutti eval` of its checkpoint agrees.
  Result e = run_tutti(0, " eval --checkpoint " + checkpoint_of(a, 12).string() + " --batches 2 --batch 4 --seed 1337");
  ASSERT_EQ(e.code, 0) << e.err;
  EXPECT_NEAR(std::stod(e.out.substr(e.out.find("val loss ") + 9)), std::get<1>(ea.at(12)), 1e-5) << e.out;
  EXPECT_NE(ra.out.find("(written in the background)"), std::string::npos) << ra.out;
}

TEST(Workflow, BatchesArePreparedAhead) {
  const fs::path run = scratch() / "loading";
  Result r = run_tutti(0, kTiny + "--steps 40 --eval-interval 40 --threads 1 --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<double> waits;
  for (const json& j : metrics(run))
    if (j.contains("loss")) waits.push_back(j.at("data_wait_ms").get<double>());
  ASSERT_EQ(waits.size(), 40u);
  std::sort(waits.begin(), waits.end());
  EXPECT_LT(waits[waits.size() / 2], 0.1) << "the median step found its batches ready";
}

TEST(Workflow, TraceNestsAndItsSummaryAddsUp) {
  const fs::path run = scratch() / "traced", file = scratch() / "traced.json";
  Result r = run_tutti(0, kTiny + "--steps 8 --eval-interval 4 --checkpoint-interval 4 --threads 1 --trace " +
                              file.string() + " --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const json doc = json::parse(slurp(file));
  std::map<std::pair<int, int>, std::vector<const json*>> threads;
  std::map<std::string, int> categories;
  for (const json& e : doc.at("traceEvents")) {
    if (e.at("ph") != "X") continue;
    threads[{e.at("pid"), e.at("tid")}].push_back(&e);
    ++categories[e.at("cat").get<std::string>()];
  }
  for (const auto& [key, spans] : threads) expect_nested(spans, "thread " + std::to_string(key.second));
  EXPECT_EQ(categories["step"], 8);
  for (const char* c : {"compute", "data", "checkpoint", "eval"}) EXPECT_GT(categories[c], 0) << c;

  Result s = run_tutti(0, " inspect trace " + file.string());
  ASSERT_EQ(s.code, 0) << s.out << s.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(s.out, m, std::regex(R"(rank 0 \(dp 0, pp 0, tp 0\)\s+[0-9.]+\s+7\s+[0-9.]+((\s+[0-9.]+%)+))")))
      << s.out;
  double total = 0.0, last = 0.0;
  std::string cells = m[1];
  const std::regex percent(R"(([0-9.]+)%)");
  for (std::sregex_iterator it(cells.begin(), cells.end(), percent), end; it != end; ++it)
    total += last = std::stod((*it)[1]);
  EXPECT_NEAR(total - last, 100.0, 0.5) << "the parts add up to the step time: " << s.out;
  EXPECT_NEAR(last, 100.0, 0.05) << s.out;
}

TEST_F(MpirunTest, TraceNamesTheSlowRank) {
  const fs::path run = scratch() / "slow", file = scratch() / "slow.json";
  Result r = shell("TUTTI_INJECT_SLOW_RANK=1:20 " + kMpirun + "-np 2 " + std::string(TUTTI_CLI) + kTiny +
                   "--steps 6 --threads 1 --trace " + file.string() + " --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string text = slurp(file);
  EXPECT_NE(text.find("wait all_reduce"), std::string::npos) << "exposed communication is traced";
  EXPECT_NE(text.find("\"ph\":\"b\""), std::string::npos) << "collectives in flight are traced";
  Result s = run_tutti(0, " inspect trace " + file.string());
  ASSERT_EQ(s.code, 0) << s.out << s.err;
  EXPECT_NE(s.out.find("slowest rank: rank 1"), std::string::npos) << s.out;
}

TEST(Workflow, BadInputFailsBeforeTraining) {
  const fs::path run = scratch() / "never";
  Result r = run_tutti(0, kTiny + "--steps 2 --trace /nonexistent/dir/t.json --out " + run.string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("/nonexistent/dir"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(run)) << "nothing started";

  const fs::path existing = scratch() / "existing.json";
  std::ofstream(existing) << "keep me";
  r = run_tutti(0, kTiny + "--steps 2 --trace " + existing.string() + " --out " + run.string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("already exists"), std::string::npos) << r.err;
  EXPECT_EQ(slurp(existing), "keep me");

  r = run_tutti(0, kTiny + "--steps 2 --workflow sometimes --out " + run.string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("sometimes"), std::string::npos) << r.err;

  r = run_tutti(0, kTiny + "--steps 2 --eval-rank 3 --out " + run.string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("eval rank 3"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(run));

  r = run_tutti(0, " inspect trace " + existing.string());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("not valid JSON"), std::string::npos) << r.err;
}

TEST_F(MpirunTest, EvalRankEvaluatesWhatTheTrainingRanksWouldHave) {
  const fs::path one = scratch() / "eval_one", ranked = scratch() / "eval_ranked";
  const std::string common = kTiny + "--layers 2 --steps 9 --eval-interval 3 --threads 1 ";
  Result r1 = run_tutti(0, common + "--out " + one.string());
  ASSERT_EQ(r1.code, 0) << r1.err;
  // Rank 0 evaluates; ranks 1 and 2 train as two pipeline stages (gathered for each snapshot),
  // rank 1 leading.
  Result r3 = run_tutti(3, common + "--eval-rank 0 --pp 2 --out " + ranked.string());
  ASSERT_EQ(r3.code, 0) << r3.err;
  EXPECT_NE(r3.out.find("done: 9 steps"), std::string::npos) << r3.out;
  expect_same_losses(one, ranked, 1, 1e-5);
  const auto a = evaluations(one), b = evaluations(ranked);
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 4u) << "steps 0, 3, 6 and 9";
  for (const auto& [step, e] : a) {
    EXPECT_NEAR(std::get<1>(b.at(step)), std::get<1>(e), 1e-5) << step;
    EXPECT_EQ(std::get<2>(b.at(step)), std::get<2>(e)) << "the same sample from the same weights, step " << step;
  }
}
