// Data parallelism end to end: `mpirun -np N tutti train` against the single process, over dp,
// gradient accumulation and ZeRO stages; checkpoints across world sizes; bad launches.
// Ranks are processes on this machine (oversubscribed); needs Open MPI's mpirun on PATH.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "train_runs.hpp"
#include "tutti/ckpt/safetensors.hpp"


using namespace tutti::test;

namespace {

const std::string kTiny =
    " --layers 2 --heads 2 --dim 16 --context 16 --batch 8 --warmup 2 --decay-steps 6 --eval-interval 1000 "
    "--eval-batches 2 --sample-tokens 0 --threads 1 --comm-timeout 120 ";

Result train(int np, const std::string& args) { return run_tutti(np, " train" + kTiny + args); }

const fs::path& reference() {  // the single process, 6 steps
  static const fs::path run = [] {
    fs::path p = scratch() / "single";
    Result r = train(0, "--steps 6 --checkpoint-interval 3 --out " + p.string());
    EXPECT_EQ(r.code, 0) << r.err;
    return p;
  }();
  return run;
}

}  // namespace

class DataParallel : public MpirunTest {};

struct Layout {
  int np, micro, zero;
};

class DataParallelEquivalence : public DataParallel, public ::testing::WithParamInterface<Layout> {};

TEST_P(DataParallelEquivalence, SameLossesAndWeightsAsOneProcess) {
  const Layout l = GetParam();
  const fs::path run = scratch() / ("np" + std::to_string(l.np) + "_mb" + std::to_string(l.micro) + "_z" +
                                    std::to_string(l.zero));
  Result r = train(l.np, "--steps 6 --checkpoint-interval 3 --micro-batch " + std::to_string(l.micro) +
                             " --zero " + std::to_string(l.zero) + " --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  expect_same_losses(reference(), run);
  expect_same_weights(reference(), run, 6);
}

INSTANTIATE_TEST_SUITE_P(Layouts, DataParallelEquivalence,
                         ::testing::Values(Layout{1, 2, 0},                     // one rank, 4 micro-batches
                                           Layout{2, 4, 0}, Layout{2, 2, 0},    // dp 2, with accumulation
                                           Layout{2, 4, 1}, Layout{2, 2, 2},    // ZeRO 1 and 2
                                           Layout{4, 2, 0}, Layout{4, 1, 1},    // dp 4
                                           Layout{4, 2, 2}),
                         [](const auto& info) {
                           return "np" + std::to_string(info.param.np) + "_micro" + std::to_string(info.param.micro) +
                                  "_zero" + std::to_string(info.param.zero);
                         });

TEST_F(DataParallel, CheckpointsMoveBetweenWorldSizes) {
  // Written at dp 4 (ZeRO 1), resumed at dp 2 and at dp 1; written at dp 1, resumed at dp 4 (ZeRO 2).
  const fs::path four = scratch() / "ckpt_dp4";
  ASSERT_EQ(train(4, "--steps 3 --checkpoint-interval 3 --zero 1 --out " + four.string()).code, 0);
  for (int np : {2, 0}) {
    const fs::path run = scratch() / ("ckpt_dp4_to_" + std::to_string(np));
    fs::copy(four, run, fs::copy_options::recursive);
    Result r = train(np, "--resume " + run.string() + " --steps 6");
    ASSERT_EQ(r.code, 0) << r.err;
    expect_same_losses(reference(), run, 4);
  }
  const fs::path one = scratch() / "ckpt_dp1";
  ASSERT_EQ(train(0, "--steps 3 --checkpoint-interval 3 --out " + one.string()).code, 0);
  Result r = train(4, "--resume " + one.string() + " --steps 6 --zero 2");
  ASSERT_EQ(r.code, 0) << r.err;
  expect_same_losses(reference(), one, 4);
}

TEST_F(DataParallel, ZeroOneShardsTheOptimizerState) {
  auto optimizer_mib = [](const std::string& out) {
    const size_t at = out.find("optimizer state ");
    EXPECT_NE(at, std::string::npos) << out;
    return std::stod(out.substr(at + 16));
  };
  Result z0 = train(2, "--steps 1 --dim 128 --zero 0 --out " + (scratch() / "mem0").string());
  Result z1 = train(2, "--steps 1 --dim 128 --zero 1 --out " + (scratch() / "mem1").string());
  ASSERT_EQ(z0.code, 0) << z0.err;
  ASSERT_EQ(z1.code, 0) << z1.err;
  EXPECT_NEAR(optimizer_mib(z1.out), optimizer_mib(z0.out) / 2, 0.05) << z0.out << z1.out;
}

TEST_F(DataParallel, BadLaunchesFailOnEveryRankWithoutHanging) {
  const std::string out = " --steps 2 --out " + (scratch() / "never").string();
  expect_every_rank_says(train(2, "--dp 3" + out), 2, "dp 3 does not match the 2 ranks");
  expect_every_rank_says(train(4, "--batch 6" + out), 4, "global batch 6 is not divisible by dp 4");
  expect_every_rank_says(train(2, "--micro-batch 3" + out), 2, "not divisible into micro-batches of 3");
  // Different settings on the two ranks (MPMD launch): the configuration hash differs.
  const std::string cmd = std::string(TUTTI_CLI) + " train" + kTiny + out;
  Result mixed = shell(kMpirun + "-np 1 " + cmd + " --lr 0.001 : -np 1 " + cmd + " --lr 0.002");
  expect_every_rank_says(mixed, 2, "differs between ranks");
  EXPECT_FALSE(fs::exists(scratch() / "never"));
}

// A rank that computes slowly (40 ms of sleep in each forward) is named in the log and metrics.
TEST_F(DataParallel, StragglersAreNamed) {
  const fs::path out = scratch() / "straggler";
  const std::string cmd = std::string(TUTTI_CLI) + " train" + kTiny + "--steps 4 --straggler-interval 2 --out " +
                          out.string();
  Result r = shell("TUTTI_INJECT_SLOW_RANK=1:40 " + kMpirun + "-np 2 " + cmd);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("straggler: rank 1 computed"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("straggler: rank 0"), std::string::npos) << r.out;
  EXPECT_NE(slurp(out / "metrics.jsonl").find("\"straggler_rank\":1"), std::string::npos);
}

