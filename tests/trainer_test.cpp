// The training loop: exact resume, checkpoint cadence and pruning, run-directory safety.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "process_util.hpp"
#include "tutti/core/energy.hpp"
#include "tutti/train/run_dir.hpp"
#include "tutti/train/trainer.hpp"

namespace fs = std::filesystem;
using namespace tutti;
using tutti::test::slurp;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("tutti_trainer_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

train::TrainConfig tiny_run(const fs::path& out, int steps) {
  train::TrainConfig c;
  c.layers = 2;
  c.heads = 2;
  c.dim = 32;
  c.context = 16;
  c.batch = 4;
  c.steps = steps;
  c.decay_steps = 20;  // the schedule must not depend on where a run stops
  c.warmup = 5;
  c.eval_interval = 1000;
  c.eval_batches = 2;
  c.checkpoint_interval = 10;
  c.sample_tokens = 0;
  c.data = std::string(TUTTI_SOURCE_DIR) + "/data/tinyshakespeare.txt";
  c.out = out.string();
  return c;
}

// step -> loss text, exactly as logged
std::map<int, std::string> step_losses(const fs::path& run) {
  std::ifstream in(run / "metrics.jsonl");
  std::map<int, std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    const size_t at = line.find("\"loss\":") + 7;
    out[j["step"].get<int>()] = line.substr(at, line.find(',', at) - at);
  }
  return out;
}

train::TrainResult run(const train::TrainConfig& c, bool resume) {
  std::ostringstream log;
  train::TrainOptions o;
  o.resume = resume;
  o.log = &log;
  return train::run_training(c, o);
}

}  // namespace

TEST(Trainer, ResumeIsBitIdentical) {
  const fs::path straight = temp_dir("straight"), split = temp_dir("split");
  run(tiny_run(straight, 20), false);
  run(tiny_run(split, 10), false);
  train::TrainConfig resumed = train::load_run_config(split.string());
  resumed.steps = 20;
  const train::TrainResult r = run(resumed, true);
  EXPECT_EQ(r.steps, 20);

  const auto a = step_losses(straight), b = step_losses(split);
  ASSERT_EQ(a.size(), 20u);
  ASSERT_EQ(b.size(), 20u);
  for (int step = 1; step <= 20; ++step) EXPECT_EQ(a.at(step), b.at(step)) << "step " << step;
  // The final weights and optimizer moments are the same bytes.
  const fs::path ca = straight / "checkpoints" / "step_00000020", cb = split / "checkpoints" / "step_00000020";
  EXPECT_EQ(slurp(ca / "model.safetensors"), slurp(cb / "model.safetensors"));
  EXPECT_EQ(slurp(ca / "optimizer.safetensors"), slurp(cb / "optimizer.safetensors"));
  fs::remove_all(straight);
  fs::remove_all(split);
}

TEST(Trainer, KeepsOnlyRecentCheckpointsAndPointsLatestAtTheNewest) {
  const fs::path dir = temp_dir("keep");
  train::TrainConfig c = tiny_run(dir, 30);
  c.keep_checkpoints = 2;
  run(c, false);
  std::vector<std::string> names;
  for (auto& e : fs::directory_iterator(dir / "checkpoints")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"step_00000020", "step_00000030"}));
  EXPECT_EQ(train::resolve_checkpoint(dir.string()), (dir / "checkpoints" / "step_00000030").string());
  fs::remove_all(dir);
}

TEST(Trainer, RefusesAnOutputDirectoryThatHoldsARun) {
  const fs::path dir = temp_dir("occupied");
  run(tiny_run(dir, 10), false);
  const std::string before = slurp(dir / "checkpoints" / "step_00000010" / "model.safetensors");
  train::TrainConfig again = tiny_run(dir, 10);
  again.seed = 7;
  EXPECT_THROW(run(again, false), ConfigError);
  EXPECT_EQ(slurp(dir / "checkpoints" / "step_00000010" / "model.safetensors"), before);
  fs::remove_all(dir);
}

TEST(Trainer, ResumeNeedsARun) {
  const fs::path dir = temp_dir("empty");
  fs::create_directories(dir);
  EXPECT_THROW(train::load_run_config(dir.string()), ConfigError);
  EXPECT_THROW(train::resolve_checkpoint(dir.string()), CheckpointError);
  fs::remove_all(dir);
}

TEST(Trainer, LearnsShakespeareBytes) {
  const fs::path dir = temp_dir("learn");
  train::TrainConfig c = tiny_run(dir, 300);
  c.lr = 3e-3f;
  c.context = 32;
  c.batch = 8;
  c.eval_batches = 8;
  c.decay_steps = 300;
  c.checkpoint_interval = 300;
  const train::TrainResult r = run(c, false);
  EXPECT_LT(r.val_loss, 3.1) << "300 steps must get well below the uniform 5.55 (seeds 1-3 reach 2.78-2.90)";
  fs::remove_all(dir);
}

TEST(Trainer, NonFiniteStepsAreSkippedAndTooManyRollBack) {
  const fs::path dir = temp_dir("nan");
  train::TrainConfig c = tiny_run(dir, 12);
  c.checkpoint_interval = 4;
  c.max_bad_steps = 3;
  ::setenv("TUTTI_INJECT_NAN_STEPS", "2,6,7,8", 1);  // one alone, then three in a row
  const train::TrainResult r = run(c, false);
  ::unsetenv("TUTTI_INJECT_NAN_STEPS");
  EXPECT_EQ(r.steps, 12);
  EXPECT_EQ(r.skipped_steps, 4);
  EXPECT_EQ(r.rollbacks, 1) << "steps 6-8 roll back to the checkpoint of step 4";
  std::ifstream in(dir / "metrics.jsonl");
  int skipped = 0, step5 = 0;
  for (std::string line; std::getline(in, line);) {
    skipped += line.find("\"skipped\":true") != std::string::npos;
    step5 += line.rfind("{\"step\":5,", 0) == 0;
  }
  EXPECT_EQ(skipped, 4);
  EXPECT_EQ(step5, 2) << "steps 5-8 run again after the rollback";
  fs::remove_all(dir);
}

// Energy comes from the machine's counter or is reported as not measured, never estimated.
TEST(Trainer, EnergyFromTheCounterOrNotAtAll) {
  const fs::path dir = temp_dir("energy");
  const train::TrainResult r = run(tiny_run(dir, 3), false);
  const std::string metrics = slurp(dir / "metrics.jsonl");
  if (EnergyMeter(Device::cpu()).available()) {
    EXPECT_GT(r.energy_joules, 0.0);
    EXPECT_NE(metrics.find("\"joules\":"), std::string::npos) << metrics;
  } else {
    EXPECT_EQ(r.energy_joules, -1.0);
    EXPECT_EQ(metrics.find("joules"), std::string::npos) << metrics;
  }
  fs::remove_all(dir);
}

// On a GPU (skipped without one): fp32 training follows the CPU's losses, and a checkpoint written
// on the GPU resumes on the CPU and the other way round.
TEST(TrainerCuda, MatchesTheCpuAndCheckpointsMoveBetweenDevices) {
  if (!device_available(Device::cuda(0))) GTEST_SKIP() << "no CUDA GPU";
  const fs::path cpu_dir = temp_dir("cpu_ref"), gpu_dir = temp_dir("gpu");
  train::TrainConfig cpu = tiny_run(cpu_dir, 10), gpu = tiny_run(gpu_dir, 10);
  gpu.device = "cuda";
  run(cpu, false);
  const train::TrainResult on_gpu = run(gpu, false);
  // NVML measured it (-1 would be "not measured"); the counter need not tick during a run this short
  // (10 tiny steps, tens of ms on an H200: it read 0 once the host stopped waiting on every copy).
  if (EnergyMeter(Device::cuda(0)).available()) EXPECT_GE(on_gpu.energy_joules, 0.0);
  const auto a = step_losses(cpu_dir), b = step_losses(gpu_dir);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [step, loss] : a)
    EXPECT_NEAR(std::stod(b.at(step)), std::stod(loss), 1e-4 * std::stod(loss)) << "step " << step;
  train::TrainConfig onward = tiny_run(gpu_dir, 12);  // written on the GPU, resumed on the CPU
  run(onward, true);
  train::TrainConfig back = tiny_run(cpu_dir, 12);  // written on the CPU, resumed on the GPU
  back.device = "cuda";
  run(back, true);
  const auto c = step_losses(gpu_dir), d = step_losses(cpu_dir);
  for (int step : {11, 12}) EXPECT_NEAR(std::stod(c.at(step)), std::stod(d.at(step)), 1e-4 * std::stod(d.at(step)));
  fs::remove_all(cpu_dir);
  fs::remove_all(gpu_dir);
}
