// Model parallelism end to end: `mpirun -np N tutti train --dp --pp --tp` against the single
// process (same losses at every step, same weights), checkpoints moving between layouts, the mesh
// printout, and bad layouts. Ranks are processes on this machine (oversubscribed on 2 cores).
#include <gtest/gtest.h>

#include "train_runs.hpp"
#include "tutti/core/device.hpp"

using namespace tutti::test;

namespace {

// Heads and the byte vocabulary divide by 2 and 4; 4 layers cut into 2 or 4 stages.
const std::string kTiny =
    " --layers 4 --heads 4 --dim 32 --context 16 --batch 8 --warmup 2 --decay-steps 6 --eval-interval 1000 "
    "--eval-batches 2 --sample-tokens 0 --threads 1 --comm-timeout 120 ";

Result train(int np, const std::string& args) { return run_tutti(np, " train" + kTiny + args); }

const fs::path& reference() {  // the single process, 6 steps, no micro-batches
  static const fs::path run = [] {
    fs::path p = scratch() / "single";
    Result r = train(0, "--steps 6 --checkpoint-interval 3 --out " + p.string());
    EXPECT_EQ(r.code, 0) << r.err;
    return p;
  }();
  return run;
}

struct MeshCase {
  int dp, pp, tp;
  const char* schedule;
  int micro_batches;
  int np() const { return dp * pp * tp; }
  std::string name() const {
    return "dp" + std::to_string(dp) + "_pp" + std::to_string(pp) + "_tp" + std::to_string(tp) + "_" + schedule +
           "_m" + std::to_string(micro_batches);
  }
  std::string flags() const {
    return " --dp " + std::to_string(dp) + " --pp " + std::to_string(pp) + " --tp " + std::to_string(tp) +
           " --schedule " + schedule + " --micro-batches " + std::to_string(micro_batches);
  }
};

void PrintTo(const MeshCase& c, std::ostream* os) { *os << c.name(); }

class ModelParallel : public MpirunTest {};

class ModelParallelEquivalence : public ModelParallel, public ::testing::WithParamInterface<MeshCase> {};

TEST_P(ModelParallelEquivalence, SameLossesAndWeightsAsOneProcess) {
  const MeshCase c = GetParam();
  const fs::path run = scratch() / c.name();
  Result r = train(c.np(), "--steps 6 --checkpoint-interval 3" + c.flags() + " --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("mesh dp " + std::to_string(c.dp) + " x pp " + std::to_string(c.pp) + " x tp " +
                       std::to_string(c.tp)),
            std::string::npos)
      << r.out;
  for (int rank = 0; rank < c.np(); ++rank)
    EXPECT_NE(r.out.find("  rank " + std::to_string(rank) + ": dp "), std::string::npos) << r.out;
  if (c.pp > 1) EXPECT_NE(r.out.find("pipeline bubble (stage 0"), std::string::npos) << r.out;
  expect_same_losses(reference(), run);
  expect_same_weights(reference(), run, 6);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ModelParallelEquivalence,
                         ::testing::Values(MeshCase{1, 1, 2, "1f1b", 1}, MeshCase{1, 1, 4, "1f1b", 2},
                                           MeshCase{1, 2, 1, "gpipe", 4}, MeshCase{1, 2, 1, "1f1b", 4},
                                           MeshCase{1, 4, 1, "gpipe", 4}, MeshCase{1, 4, 1, "1f1b", 8},
                                           MeshCase{2, 1, 2, "1f1b", 1}, MeshCase{2, 2, 1, "1f1b", 2},
                                           MeshCase{1, 2, 2, "1f1b", 4}, MeshCase{2, 2, 2, "1f1b", 2},
                                           MeshCase{2, 2, 2, "gpipe", 4}),
                         [](const auto& info) { return info.param.name(); });

// Written at dp2 x pp2 x tp2; resumed at pp4, tp4 and in one process: the run goes on as the
// single process does, and a save -> load -> save round trip (one step at learning rate 0) gives
// every weight tensor back bit for bit.
TEST_F(ModelParallel, CheckpointsMoveBetweenLayouts) {
  const fs::path written = scratch() / "ckpt_dp2pp2tp2";
  Result w = train(8, "--steps 3 --checkpoint-interval 3 --dp 2 --pp 2 --tp 2 --micro-batches 2 --out " +
                          written.string());
  ASSERT_EQ(w.code, 0) << w.err;
  const std::pair<int, std::string> targets[] = {{4, " --pp 4 --tp 1 --dp 1 --micro-batches 4"},
                                                 {4, " --pp 1 --tp 4 --dp 1 --micro-batches 1"},
                                                 {0, " --pp 1 --tp 1 --dp 1 --micro-batches 1"}};
  for (const auto& [np, layout] : targets) {
    SCOPED_TRACE(layout);
    const fs::path onward = scratch() / ("onward" + std::to_string(&layout - &targets[0].second));
    fs::copy(written, onward, fs::copy_options::recursive);
    Result r = train(np, "--resume " + onward.string() + " --steps 6" + layout);
    ASSERT_EQ(r.code, 0) << r.err;
    expect_same_losses(reference(), onward, 4);

    const fs::path again = scratch() / ("roundtrip" + std::to_string(&layout - &targets[0].second));
    fs::copy(written, again, fs::copy_options::recursive);
    r = train(np, "--resume " + again.string() + " --steps 4 --lr 0 --min-lr 0 --weight-decay 0" + layout);
    ASSERT_EQ(r.code, 0) << r.err;
    expect_same_weights(written, again, 3, 4, 0.0);
  }
}

TEST_F(ModelParallel, BadLayoutsFailOnEveryRankBeforeStarting) {
  const std::string out = " --steps 2 --out " + (scratch() / "never").string();
  expect_every_rank_says(train(3, "--tp 3" + out), 3, "tp 3 does not divide the 4 heads");
  expect_every_rank_says(train(4, "--pp 4 --layers 2" + out), 4, "pp 4 needs at least as many layers; the model has 2");
  expect_every_rank_says(train(2, "--pp 2 --tp 2" + out), 2, "pp 2 x tp 2 = 4 does not divide the 2 ranks");
  expect_every_rank_says(train(4, "--dp 1 --tp 2" + out), 4, "dp 1 x pp 1 x tp 2 = 2 does not match the 4 ranks");
  expect_every_rank_says(train(4, "--dp 2 --pp 2 --zero 2" + out), 4, "zero 2 (sharded gradients) does not combine with pp 2");
  expect_every_rank_says(train(2, "--pp 2 --schedule zigzag" + out), 2, "schedule must be gpipe or 1f1b, got 'zigzag'");
  EXPECT_FALSE(fs::exists(scratch() / "never"));
  // Fewer micro-batches than stages runs, with a warning about the bubble.
  Result few = train(2, "--pp 2 --micro-batches 1 --steps 1 --out " + (scratch() / "few").string());
  EXPECT_EQ(few.code, 0) << few.err;
  EXPECT_NE((few.out + few.err).find("1 micro-batch(es) for 2 pipeline stages"), std::string::npos) << few.out;
}

}  // namespace

namespace {

// Under pp every stage writes its own shard; the manifest covers them all, transformers' index
// names each tensor's file, and a damaged shard makes the run fall back to the previous checkpoint.
TEST_F(ModelParallel, ShardedCheckpointsAreIndexedVerifiedAndFallenBackFrom) {
  const fs::path run = scratch() / "sharded";
  Result r = train(4, "--steps 2 --checkpoint-interval 1 --pp 2 --tp 2 --micro-batches 2 --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const fs::path newest = checkpoint_of(run, 2);
  for (const char* f : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                        "optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors",
                        "model.safetensors.index.json", "config.json", "trainer_state.json", "manifest.json"})
    EXPECT_TRUE(fs::exists(newest / f)) << f;
  EXPECT_FALSE(fs::exists(newest / "model.safetensors"));
  const auto index = nlohmann::json::parse(slurp(newest / "model.safetensors.index.json"));
  EXPECT_EQ(index["weight_map"]["transformer.wte.weight"], "model-00001-of-00002.safetensors");
  EXPECT_EQ(index["weight_map"]["transformer.h.3.mlp.c_fc.weight"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(index["weight_map"]["transformer.ln_f.bias"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(index["weight_map"].size(), 2u + 12u * 4u + 2u);  // wte once, wpe, 4 blocks, ln_f
  Result inspect = run_tutti(0, " inspect " + run.string());
  EXPECT_EQ(inspect.code, 0) << inspect.out << inspect.err;
  EXPECT_NE(inspect.out.find("model-00002-of-00002.safetensors"), std::string::npos) << inspect.out;
  EXPECT_NE(inspect.out.find("layout dp=1 pp=2 tp=2"), std::string::npos) << inspect.out;

  std::string bytes = slurp(newest / "model-00002-of-00002.safetensors");
  bytes[bytes.size() - 3] ^= 1;
  std::ofstream(newest / "model-00002-of-00002.safetensors", std::ios::binary | std::ios::trunc) << bytes;
  r = train(2, "--resume " + run.string() + " --steps 3 --pp 2 --tp 1");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("model-00002-of-00002.safetensors: checksum mismatch"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("at step 1"), std::string::npos) << r.out;
  const auto want = losses(reference()), got = losses(run);
  for (int step : {2, 3}) {
    ASSERT_TRUE(got.count(step)) << step;
    EXPECT_NEAR(got.at(step), want.at(step), 1e-5 * want.at(step)) << "step " << step;
  }
}

// Two GPUs (skipped with fewer): one rank per GPU, device tensors over NCCL, under dp 2, pp 2 and
// tp 2, follow the one-GPU run's losses.
TEST_F(ModelParallel, TwoGpusFollowOneGpu) {
  if (!tutti::device_available(tutti::Device::cuda(1))) GTEST_SKIP() << "fewer than 2 GPUs";
  const fs::path one = scratch() / "gpu1";
  Result r = train(0, "--device cuda --steps 6 --out " + one.string());
  ASSERT_EQ(r.code, 0) << r.err;
  for (const std::string layout : {"--dp 2", "--pp 2 --micro-batches 4", "--dp 2 --zero 1", "--tp 2"}) {
    SCOPED_TRACE(layout);
    const fs::path run = scratch() / ("gpu2_" + std::to_string(std::hash<std::string>{}(layout)));
    r = train(2, "--device cuda --steps 6 " + layout + " --out " + run.string());
    ASSERT_EQ(r.code, 0) << r.out << r.err;
    expect_same_losses(one, run, 1, 1e-4);
    expect_same_weights(one, run, 6, -1, 1e-4);
  }
}

}  // namespace
