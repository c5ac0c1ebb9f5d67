// Every setting of a training run, each settable from a TOML file (key = name) and from the
// command line (--name with '_' written as '-'); the table in settings() is the one source for
// both, for the saved run.toml and for the help text.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tutti/nn/gpt.hpp"

namespace tutti::train {

struct TrainConfig {
  // model (byte-level GPT-2, vocabulary 256)
  int layers = 4;
  int heads = 4;
  int dim = 128;
  int context = 64;
  int vocab = 256;  // tokens: bytes of a data file (256), or a synthetic stream of any size
  // data and output
  std::string data = "data/tinyshakespeare.txt";  // or "synthetic": random tokens (speed runs)
  std::string out = "runs/shakespeare";
  // optimisation
  int batch = 12;  // the global batch: sequences per optimizer step, over all ranks
  int steps = 2000;
  float lr = 1e-3f;
  float min_lr = 1e-4f;
  int warmup = 100;
  std::string decay = "cosine";  // cosine | constant
  int decay_steps = 0;           // 0: the run's steps
  float weight_decay = 0.1f;
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float grad_clip = 1.0f;  // 0: no clipping
  int64_t seed = 1337;
  // cadence
  int eval_interval = 250;
  int eval_batches = 20;
  int checkpoint_interval = 500;
  int checkpoint_minutes = 0;  // also every this many minutes (0: off)
  int keep_checkpoints = 2;
  int log_interval = 50;
  int sample_tokens = 300;
  // machine and parallelism
  std::string device = "cpu";  // cpu | cuda | cuda:N
  std::string dtype = "fp32";  // fp32 | bf16 (mixed precision: bf16 matrix products, fp32 weights and AdamW; GPU)
  int threads = 0;         // 0: every core
  int dp = 0;              // data-parallel replicas; 0: the world size / (pp x tp)
  int pp = 1;              // pipeline stages
  int tp = 1;              // tensor-parallel ranks per stage
  int micro_batch = 0;     // sequences per forward pass on a rank; 0: batch / dp (no accumulation)
  int micro_batches = 0;   // micro-batches per replica and step (the other way to say micro_batch); 0: from it
  std::string schedule = "1f1b";  // pipeline schedule: gpipe | 1f1b
  int zero = 0;            // 0: plain data parallelism, 1: sharded optimizer state, 2: + sharded gradients
  int bucket_mib = 4;      // gradient bucket size (4 MiB hid the most communication, bench/RESULTS.md)
  int comm_timeout = 60;   // seconds a collective may take before the run fails
  int max_bad_steps = 3;   // non-finite steps in a row before rolling back to the last checkpoint
  int straggler_interval = 50;        // compare the ranks' compute time every N steps (0: never)
  float straggler_threshold = 0.2f;   // name a rank slower than the median by more than this fraction
  // task parallelism
  std::string workflow = "concurrent";  // concurrent: loading, evaluation, checkpoints in the background; serial
  int eval_rank = -1;                   // a rank that only evaluates snapshots of the weights; -1: none

  // Throws ConfigError naming the first bad value.
  void validate() const;
  nn::GPTConfig model() const;
  Device compute_device() const;  // `device` parsed; throws ConfigError naming a bad one
};

// One named setting bound to a field of a TrainConfig.
struct Setting {
  std::string name;  // TOML key; the flag is --name with '_' -> '-'
  std::string help;
  enum class Kind { integer, real, text } kind;
  std::function<std::string()> get;             // the value as TOML text
  std::function<void(const std::string&)> set;  // parses; throws ConfigError on a bad value
};
std::vector<Setting> settings(TrainConfig& config);

// Named starting points, applied before a config file and flags (which override them):
// "gpt2" is GPT-2 124M (12 layers, 12 heads, dim 768, context 1024, vocabulary 50304 as padded
// for speed) on synthetic tokens, batch 16, AdamW (6e-4, betas 0.9/0.95); "shakespeare" is the
// default. Unknown names throw ConfigError listing the known ones.
void apply_preset(TrainConfig& config, const std::string& name);

// Applies a TOML file's keys (flat, names as above). Unknown keys, wrong types and files that do
// not parse throw ConfigError naming the file, key and value.
void apply_toml_file(TrainConfig& config, const std::string& path);
std::string to_toml(TrainConfig config);

}  // namespace tutti::train
