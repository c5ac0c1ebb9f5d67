// The tutti program: help and version, and every kind of bad input gets one clear error line,
// a non-zero exit, and leaves existing checkpoints untouched.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>

#include "process_util.hpp"

using namespace tutti::test;

namespace {

Result run_tutti(const std::string& args) { return shell(std::string(TUTTI_CLI) + " " + args); }

int lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }

const std::string kTiny = " --layers 1 --heads 2 --dim 16 --context 16 --batch 2 --eval-batches 1 --sample-tokens 0 ";

// A finished tiny run, shared by the checkpoint tests.
fs::path tiny_run() {
  static fs::path run = [] {
    fs::path p = scratch() / "run";
    Result r = run_tutti("train" + kTiny + "--steps 4 --checkpoint-interval 2 --out " + p.string());
    EXPECT_EQ(r.code, 0) << r.err;
    return p;
  }();
  return run;
}

void expect_one_line_error(const Result& r, const std::string& must_mention) {
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(lines(r.err), 1) << r.err;
  EXPECT_NE(r.err.find("error"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(must_mention), std::string::npos) << "'" << must_mention << "' not in: " << r.err;
}

}  // namespace

TEST(Cli, HelpAndVersion) {
  Result v = run_tutti("--version");
  EXPECT_EQ(v.code, 0);
  EXPECT_EQ(v.out.rfind("tutti ", 0), 0u) << v.out;
  Result h = run_tutti("--help");
  EXPECT_EQ(h.code, 0);
  for (const char* cmd : {"train", "generate", "eval"}) EXPECT_NE(h.out.find(cmd), std::string::npos) << cmd;
  Result t = run_tutti("train --help");
  EXPECT_EQ(t.code, 0);
  for (const char* flag : {"--layers", "--heads", "--dim", "--context", "--batch", "--steps", "--lr", "--warmup",
                           "--decay", "--weight-decay", "--grad-clip", "--seed", "--eval-interval",
                           "--checkpoint-interval", "--threads", "--data", "--out", "--config", "--resume"})
    EXPECT_NE(t.out.find(flag), std::string::npos) << flag;
  Result g = run_tutti("generate --help");
  for (const char* flag : {"--checkpoint", "--prompt", "--max-tokens", "--temperature", "--top-k", "--seed"})
    EXPECT_NE(g.out.find(flag), std::string::npos) << flag;
  EXPECT_NE(run_tutti("").code, 0);
  EXPECT_NE(run_tutti("frobnicate").code, 0);
}

TEST(Cli, BadData) {
  const fs::path out = scratch() / "never";
  expect_one_line_error(run_tutti("train --data /nonexistent/file.txt --out " + out.string()), "/nonexistent/file.txt");
  const fs::path empty = scratch() / "empty.txt";
  std::ofstream(empty).close();
  expect_one_line_error(run_tutti("train --data " + empty.string() + " --out " + out.string()), "empty");
  const fs::path small = scratch() / "small.txt";
  std::ofstream(small) << std::string(200, 'a');
  expect_one_line_error(run_tutti("train --data " + small.string() + " --context 64 --out " + out.string()), "too short");
  EXPECT_FALSE(fs::exists(out)) << "a failed start must not create the output directory";
}

TEST(Cli, BadConfig) {
  const fs::path out = scratch() / "never";
  const fs::path unknown = scratch() / "unknown.toml";
  std::ofstream(unknown) << "layers = 2\nlayer_count = 3\n";
  expect_one_line_error(run_tutti("train --config " + unknown.string() + " --out " + out.string()), "layer_count");
  const fs::path typed = scratch() / "typed.toml";
  std::ofstream(typed) << "layers = \"four\"\n";
  expect_one_line_error(run_tutti("train --config " + typed.string() + " --out " + out.string()), "layers");
  const fs::path broken = scratch() / "broken.toml";
  std::ofstream(broken) << "layers = = 2\n";
  expect_one_line_error(run_tutti("train --config " + broken.string() + " --out " + out.string()), "broken.toml");
  expect_one_line_error(run_tutti("train --layers 0 --out " + out.string()), "layers must be positive");
  expect_one_line_error(run_tutti("train --dim -8 --out " + out.string()), "dim");
  expect_one_line_error(run_tutti("train --heads 3 --dim 128 --out " + out.string()), "must divide");
  expect_one_line_error(run_tutti("train --decay linear --out " + out.string()), "linear");
  expect_one_line_error(run_tutti("train --steps 12x --out " + out.string()), "12x");
  expect_one_line_error(run_tutti("train --device gpu --out " + out.string()), "cpu, cuda or cuda:N, got 'gpu'");
  expect_one_line_error(run_tutti("train --device cuda:99 --out " + out.string()), "--device cuda:99: no ");
  expect_one_line_error(run_tutti("train --vocab 100 --out " + out.string()), "vocab 100 is smaller than the 256");
  EXPECT_FALSE(fs::exists(out));
}

// --preset gpt2: GPT-2's setup, which a config file and flags override.
TEST(Cli, PresetsStartARunThatFlagsOverride) {
  const fs::path out = scratch() / "preset";
  Result r = run_tutti("train --preset gpt2 --layers 1 --heads 2 --dim 16 --context 8 --batch 2 --steps 1 --vocab 512 "
                       "--threads 1 --out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string toml = slurp(out / "run.toml");
  for (const char* line : {"data = \"synthetic\"", "beta2 = 0.95", "layers = 1", "vocab = 512"})
    EXPECT_NE(toml.find(line), std::string::npos) << line << "\n" << toml;
  expect_one_line_error(run_tutti("train --preset gpt3 --out " + (scratch() / "never").string()),
                        "unknown preset 'gpt3'; the presets are gpt2, shakespeare");
  EXPECT_FALSE(fs::exists(scratch() / "never"));
}

// --data synthetic: random tokens of any vocabulary, for speed runs of models like GPT-2's.
TEST(Cli, SyntheticTokens) {
  const fs::path out = scratch() / "synthetic";
  Result r = run_tutti("train --data synthetic --vocab 1000 --layers 1 --heads 2 --dim 16 --context 8 --batch 2 "
                       "--steps 2 --eval-batches 1 --threads 1 --out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("val loss 6.9"), std::string::npos) << r.out;  // ln(1000) = 6.91: uniform tokens
  EXPECT_EQ(r.out.find("--- sample"), std::string::npos) << "no sample of random tokens: " << r.out;
  EXPECT_NE(slurp(out / "checkpoints" / "step_00000002" / "config.json").find("\"vocab_size\": 1000"), std::string::npos);
}

TEST(Cli, ConfigFileAndFlagsCombine) {
  const fs::path cfg = scratch() / "run.toml";
  std::ofstream(cfg) << "layers = 1\nheads = 2\ndim = 16\ncontext = 16\nbatch = 2\nsteps = 3\neval_batches = 1\n"
                        "sample_tokens = 0\nlr = 2e-3\n";
  const fs::path out = scratch() / "from_config";
  Result r = run_tutti("train --config " + cfg.string() + " --steps 2 --out " + out.string());
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string saved = slurp(out / "run.toml");
  EXPECT_NE(saved.find("steps = 2\n"), std::string::npos) << saved;  // the flag wins over the file
  EXPECT_NE(saved.find("lr = 0.002\n"), std::string::npos) << saved;
  EXPECT_NE(saved.find("layers = 1\n"), std::string::npos) << saved;
}

TEST(Cli, OutputDirectoryHoldingARunIsNeverOverwritten) {
  const fs::path run = tiny_run();
  const fs::path model = run / "checkpoints" / "step_00000004" / "model.safetensors";
  const std::string before = slurp(model), latest = slurp(run / "latest");
  expect_one_line_error(run_tutti("train" + kTiny + "--steps 4 --seed 9 --out " + run.string()), "--resume");
  EXPECT_EQ(slurp(model), before);
  EXPECT_EQ(slurp(run / "latest"), latest);
}

TEST(Cli, ResumeContinuesARun) {
  const fs::path src = tiny_run(), run = scratch() / "resumed";
  fs::copy(src, run, fs::copy_options::recursive);
  Result r = run_tutti("train --resume " + run.string() + " --steps 6");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(run / "checkpoints" / "step_00000006" / "model.safetensors"));
  expect_one_line_error(run_tutti("train --resume " + (scratch() / "nothing").string()), "no run");
}

TEST(Cli, GenerateGreedyIsDeterministic) {
  const std::string args = "generate --checkpoint " + tiny_run().string() + " --prompt ROMEO --max-tokens 20 --temperature 0";
  Result a = run_tutti(args), b = run_tutti(args + " --seed 5");
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.out.size(), 21u);  // 20 bytes and a newline
}

TEST(Cli, CorruptCheckpointsAreRejected) {
  const fs::path src = tiny_run() / "checkpoints" / "step_00000004";
  const fs::path bad = scratch() / "bad_ckpt";
  fs::remove_all(bad);
  fs::copy(src, bad, fs::copy_options::recursive);
  const fs::path model = bad / "model.safetensors";
  const std::string good = slurp(model);
  std::ofstream(model, std::ios::binary | std::ios::trunc) << good.substr(0, good.size() / 2);
  expect_one_line_error(run_tutti("generate --checkpoint " + bad.string() + " --max-tokens 4"), "model.safetensors");
  std::string flipped = good;
  flipped[10] = '!';  // breaks the JSON header
  std::ofstream(model, std::ios::binary | std::ios::trunc) << flipped;
  expect_one_line_error(run_tutti("generate --checkpoint " + bad.string() + " --max-tokens 4"), "model.safetensors");
  fs::remove(bad / "config.json");
  expect_one_line_error(run_tutti("generate --checkpoint " + bad.string()), "config.json");
  expect_one_line_error(run_tutti("generate --checkpoint " + (scratch() / "nowhere").string()), "nowhere");
}

TEST(Cli, EvalReportsLossAndWritesLogits) {
  Result r = run_tutti("eval --checkpoint " + tiny_run().string() + " --batches 2 --batch 2");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("val loss"), std::string::npos);
  const fs::path logits = scratch() / "logits.safetensors";
  r = run_tutti("eval --checkpoint " + tiny_run().string() + " --prompt hello --logits-out " + logits.string());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(logits));
}
