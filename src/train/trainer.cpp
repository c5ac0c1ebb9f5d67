#include "tutti/train/trainer.hpp"

#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <set>
#include <sstream>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "tutti/autograd/node.hpp"
#include "tutti/ckpt/safetensors.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/ops/ops.hpp"
#include "tutti/parallel/data_parallel.hpp"
#include "tutti/train/run_dir.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kEvalStream = 0x5EEDE7A1ull;  // evaluation batches come from their own stream

std::string format_duration(double seconds) {
  const int s = static_cast<int>(std::max(0.0, seconds));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", s / 3600, s / 60 % 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", s / 60, s % 60);
  return buf;
}

// Refuses to start a new run in a directory that holds anything; for a resume, needs a run.
// Every rank checks (so all fail alike); only rank 0 creates.
void check_run_dir(const TrainConfig& config, bool resume) {
  const fs::path out(config.out);
  if (resume) {
    TUTTI_CHECK_AS(ConfigError, fs::exists(out / "run.toml"), "cannot resume: '", config.out,
                   "' holds no run (no run.toml)");
    return;
  }
  if (fs::exists(out)) {
    TUTTI_CHECK_AS(ConfigError, fs::is_directory(out), "output path '", config.out, "' exists and is not a directory");
    TUTTI_CHECK_AS(ConfigError, fs::is_empty(out), "output directory '", config.out,
                   "' already holds a run or other files; continue it with --resume ", config.out,
                   " or choose another --out");
  }
}

void create_run_dir(const TrainConfig& config, bool resume) {
  if (resume) return;
  fs::create_directories(config.out);
  ckpt::write_file_atomic((fs::path(config.out) / "run.toml").string(), to_toml(config));
}

class Progress {
 public:
  Progress(std::ostream& out, bool live, int64_t first, int64_t last, int log_interval)
      : out_(out), live_(live), first_(first), last_(last), log_interval_(log_interval), start_(Clock::now()) {}

  void step(int64_t step, double loss, float lr, double tokens_per_second) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const double eta = step > first_ ? elapsed / double(step - first_) * double(last_ - step) : 0.0;
    char line[160];
    std::snprintf(line, sizeof line, "step %6lld/%lld | loss %.4f | lr %.2e | %8.0f tok/s | ETA %s",
                  static_cast<long long>(step), static_cast<long long>(last_), loss, lr, tokens_per_second,
                  format_duration(eta).c_str());
    if (live_) {
      out_ << "\r" << line << "\033[K" << std::flush;
      dirty_ = true;
    } else if (step % log_interval_ == 0 || step == last_) {
      out_ << line << "\n" << std::flush;
    }
  }
  // A line that stays (evaluation, checkpoint): clears the live line first.
  std::ostream& line() {
    if (dirty_) out_ << "\r\033[K";
    dirty_ = false;
    return out_;
  }

 private:
  std::ostream& out_;
  bool live_;
  int64_t first_, last_;
  int log_interval_;
  Clock::time_point start_;
  bool dirty_ = false;
};

// Each rank rewrites <out>/heartbeats/rank_<r> (its step and the time) at most once a second, so
// a supervisor can tell a frozen rank from a slow one.
class Heartbeat {
 public:
  Heartbeat(const std::string& out, int rank) : path_(fs::path(out) / "heartbeats" / ("rank_" + std::to_string(rank))) {
    fs::create_directories(path_.parent_path());
  }
  void beat(int64_t step) {
    const auto now = Clock::now();
    if (now - last_ < std::chrono::seconds(1)) return;
    last_ = now;
    std::ofstream(path_, std::ios::trunc) << step << " " << std::chrono::system_clock::now().time_since_epoch().count()
                                          << "\n";
  }

 private:
  fs::path path_;
  Clock::time_point last_{};
};

// "3,7,8" -> {3, 7, 8}
std::set<int64_t> steps_from_env(const char* name) {
  std::set<int64_t> out;
  const char* v = std::getenv(name);
  for (std::stringstream s(v ? v : ""); s.good();) {
    std::string item;
    std::getline(s, item, ',');
    if (!item.empty()) out.insert(std::stoll(item));
  }
  return out;
}

std::string bytes_to_text(const std::vector<int32_t>& tokens) {
  std::string s;
  for (int32_t t : tokens) s += static_cast<char>(t);
  return s;
}

}  // namespace

double evaluate(const nn::GPT& model, const data::TokenDataset& dataset, data::Split split, int batches,
                int batch_size, int64_t seed) {
  NoGradGuard no_grad;
  double total = 0.0;
  for (int i = 0; i < batches; ++i) {
    data::Batch b = dataset.batch(split, batch_size, static_cast<uint64_t>(seed) ^ kEvalStream, static_cast<uint64_t>(i));
    total += model.loss(b.inputs, b.targets).item();
  }
  return total / batches;
}

TrainConfig load_run_config(const std::string& run_dir) {
  const fs::path path = fs::path(run_dir) / "run.toml";
  TUTTI_CHECK_AS(ConfigError, fs::exists(path), "cannot resume: '", run_dir, "' holds no run (no run.toml)");
  TrainConfig config;
  apply_toml_file(config, path.string());
  config.out = run_dir;
  return config;
}

namespace {

// How the global batch splits over ranks and micro-batches.
struct BatchPlan {
  int dp, per_rank, micro, accumulation;
};

BatchPlan plan_batches(const TrainConfig& c, int world_size) {
  const int dp = c.dp > 0 ? c.dp : world_size;
  TUTTI_CHECK_AS(ConfigError, dp == world_size, "dp ", dp, " does not match the ", world_size,
                 " ranks of the launch (data parallelism is the only kind so far: dp must equal the world size)");
  TUTTI_CHECK_AS(ConfigError, c.batch % dp == 0, "global batch ", c.batch, " is not divisible by dp ", dp);
  const int per_rank = c.batch / dp;
  const int micro = c.micro_batch > 0 ? c.micro_batch : per_rank;
  TUTTI_CHECK_AS(ConfigError, per_rank % micro == 0, "global batch ", c.batch, " over dp ", dp, " gives ", per_rank,
                 " sequences per rank, not divisible into micro-batches of ", micro);
  return {dp, per_rank, micro, per_rank / micro};
}

uint64_t fnv1a(const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Every rank must run the same binary with the same settings.
void check_same_config(comm::Communicator& world, const TrainConfig& config) {
  if (world.size() == 1) return;
  const int64_t mine = static_cast<int64_t>(fnv1a(to_toml(config) + TUTTI_VERSION));
  std::vector<int64_t> all(size_t(world.size()));
  world.all_gather(std::span<const int64_t>(&mine, 1), std::span<int64_t>(all), std::vector<int64_t>(all.size(), 1))
      ->wait();
  for (size_t r = 1; r < all.size(); ++r)
    TUTTI_CHECK_AS(ConfigError, all[r] == all[0], "the configuration or the tutti binary differs between ranks: rank ",
                   r, " has hash ", std::hex, all[r], ", rank 0 has ", all[0]);
}


// Evaluation batches spread over the ranks; the mean over all of them.
double evaluate_distributed(comm::Communicator& world, const nn::GPT& model, const data::TokenDataset& dataset,
                            data::Split split, int batches, int batch_size, int64_t seed) {
  NoGradGuard no_grad;
  double total = 0.0;
  for (int i = world.rank(); i < batches; i += world.size()) {
    data::Batch b = dataset.batch(split, batch_size, static_cast<uint64_t>(seed) ^ kEvalStream, static_cast<uint64_t>(i));
    total += model.loss(b.inputs, b.targets).item();
  }
  if (world.size() > 1) world.all_reduce(std::span<double>(&total, 1))->wait();
  return total / batches;
}

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / (1 << 20));
  return buf;
}

}  // namespace

TrainResult run_training(const TrainConfig& config, const TrainOptions& options) {
  config.validate();
  std::unique_ptr<comm::Communicator> own_world;
  if (!options.world) own_world = comm::make_local();
  comm::Communicator& world = options.world ? *options.world : *own_world;
  world.set_timeout(std::chrono::seconds(config.comm_timeout));
  const BatchPlan plan = plan_batches(config, world.size());
  check_same_config(world, config);
  const bool lead = world.rank() == 0;
  std::ostream null_stream(nullptr);
  std::ostream& log = !lead ? null_stream : options.log ? *options.log : std::cout;
  set_num_threads(config.threads > 0 ? config.threads : hardware_threads());
  data::TokenDataset dataset(config.data, config.context);  // before touching the output directory
  check_run_dir(config, options.resume);
  if (world.size() > 1) world.barrier()->wait();  // every rank has looked before rank 0 creates
  if (lead) create_run_dir(config, options.resume);
  if (world.size() > 1) world.barrier()->wait();

  nn::GPT model(config.model());
  Rng init_rng(static_cast<uint64_t>(config.seed));
  model.init_weights(init_rng);
  TrainerState state;
  state.seed = config.seed;
  state.data_path = config.data;
  state.sample_rng_state = static_cast<uint64_t>(config.seed) * 0x9E3779B97F4A7C15ull + 1;
  TrainResult result;
  LoadedCheckpoint loaded;
  if (options.resume) {
    result.checkpoint = resolve_checkpoint(config.out);
    loaded = load_checkpoint(result.checkpoint, model);
    state = loaded.state;
    state.data_path = config.data;
  }
  const optim::AdamWOptions adamw{config.lr, config.beta1, config.beta2, 1e-8f, config.weight_decay};
  parallel::DataParallel replica(model, world, adamw,
                                 {int64_t(config.bucket_mib) << 20, world.size() > 1 ? config.zero : 0});
  if (options.resume) {
    replica.load_optimizer_state(loaded.optimizer_state, loaded.optimizer_steps);
    log << "resumed from " << result.checkpoint << " at step " << state.step << "\n";
  }
  const optim::LrSchedule schedule{config.lr, config.min_lr, config.warmup,
                                   config.decay_steps > 0 ? config.decay_steps : config.steps, config.decay == "cosine"};
  const int64_t tokens_per_step = int64_t{config.batch} * config.context;
  log << "tutti train: " << model.num_parameters() << " parameters (" << config.layers << " layers, " << config.heads
      << " heads, dim " << config.dim << ", context " << config.context << "), " << tokens_per_step
      << " tokens/step, " << num_threads() << " threads, data " << config.data << " ("
      << dataset.tokens(data::Split::train) << " train / " << dataset.tokens(data::Split::val) << " val tokens), out "
      << config.out << "\n";
  if (world.size() > 1) {
    const parallel::MemoryReport m = replica.memory();
    log << "data parallel: dp " << plan.dp << " (" << world.backend() << "), zero " << config.zero << ", "
        << plan.per_rank << " sequences per rank in " << plan.accumulation << " micro-batch(es) of " << plan.micro
        << ", " << replica.num_buckets() << " gradient bucket(s) of up to " << config.bucket_mib
        << " MiB; per rank: parameters " << mib(m.parameter_bytes) << ", gradients " << mib(m.gradient_bytes)
        << ", optimizer state " << mib(m.optimizer_bytes) << "\n";
  }

  std::ofstream metrics;
  if (lead) metrics.open(fs::path(config.out) / "metrics.jsonl", std::ios::app);
  auto eval_and_log = [&](int64_t step, Progress& progress) {
    const auto t0 = Clock::now();
    result.train_loss = evaluate_distributed(world, model, dataset, data::Split::train, config.eval_batches,
                                             config.batch, config.seed);
    result.val_loss = evaluate_distributed(world, model, dataset, data::Split::val, config.eval_batches, config.batch,
                                           config.seed);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    char line[128];
    std::snprintf(line, sizeof line, "step %lld: train loss %.4f, val loss %.4f (eval %.1fs)",
                  static_cast<long long>(step), result.train_loss, result.val_loss, secs);
    progress.line() << line << "\n" << std::flush;
    if (lead)
      metrics << nlohmann::json{{"step", step}, {"train_loss", result.train_loss}, {"val_loss", result.val_loss}}.dump()
              << "\n" << std::flush;
  };

  Progress progress(log, options.live_progress && lead, state.step, config.steps, config.log_interval);
  if (state.step == 0) eval_and_log(0, progress);
  std::unique_ptr<CheckpointWriter> writer;  // rank 0 writes checkpoints in the background
  if (lead) writer = std::make_unique<CheckpointWriter>(config.out, config.keep_checkpoints);
  Heartbeat heartbeat(config.out, world.rank());
  std::set<int64_t> inject_nan = steps_from_env("TUTTI_INJECT_NAN_STEPS");  // fault injection (tests), once each
  const auto run_start = Clock::now();
  auto last_checkpoint_time = run_start;
  const int64_t first_step = state.step;
  int bad_in_row = 0;
  double tokens_per_second = 0.0;  // smoothed, for the progress line
  while (state.step < config.steps) {
    const int64_t step = state.step;  // 0-based index of this step; it completes step + 1
    const auto t0 = Clock::now();
    world.set_step(step + 1);
    heartbeat.beat(step);
    replica.zero_grad();
    double loss_sum = 0.0;
    for (int a = 0; a < plan.accumulation; ++a) {  // next batch -> forward -> backward
      const int64_t first = int64_t{world.rank()} * plan.per_rank + int64_t{a} * plan.micro;
      data::Batch batch = dataset.batch(data::Split::train, static_cast<uint64_t>(config.seed),
                                        static_cast<uint64_t>(step), first, plan.micro);
      Tensor loss = model.loss(batch.inputs, batch.targets);
      if (a + 1 == plan.accumulation) replica.begin_sync();
      (plan.accumulation > 1 ? ops::scale(loss, 1.0f / float(plan.accumulation)) : loss).backward();
      loss_sum += loss.item();
    }
    if (inject_nan.erase(step + 1) && lead) loss_sum = std::nan("");
    const double norm = replica.end_sync();  // the group's mean gradient
    // The loss, and whether rank 0's clock asks for a checkpoint, agreed by every rank.
    const bool time_due = lead && config.checkpoint_minutes > 0 &&
                          Clock::now() - last_checkpoint_time >= std::chrono::minutes(config.checkpoint_minutes);
    std::array<double, 2> agreed{loss_sum / plan.accumulation, time_due ? 1.0 : 0.0};
    if (world.size() > 1) world.all_reduce(std::span<double>(agreed))->wait();
    const double loss_value = agreed[0] / world.size();
    const float lr = schedule.at(step);
    const bool bad = !std::isfinite(loss_value) || !std::isfinite(norm);
    if (!bad) {
      replica.step(lr, optim::clip_scale(norm, config.grad_clip));  // update
      bad_in_row = 0;
    } else {
      ++result.skipped_steps;
      progress.line() << "step " << step + 1 << ": non-finite " << (std::isfinite(loss_value) ? "gradient" : "loss")
                      << ", update skipped (" << ++bad_in_row << " in a row)\n" << std::flush;
    }

    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const double rate = double(tokens_per_step) / secs;
    tokens_per_second = tokens_per_second == 0.0 ? rate : 0.9 * tokens_per_second + 0.1 * rate;
    state.step = step + 1;
    state.data_position = step + 1;
    if (!bad) state.last_loss = loss_value;
    if (lead) {
      char loss_text[32];
      std::snprintf(loss_text, sizeof loss_text, "%.9g", loss_value);
      metrics << "{\"step\":" << state.step << ",\"loss\":" << (bad ? "null" : loss_text) << ",\"lr\":" << lr
              << ",\"grad_norm\":" << (std::isfinite(norm) ? norm : -1.0) << ",\"ms\":" << secs * 1e3
              << (bad ? ",\"skipped\":true" : "") << "}\n";
    }
    progress.step(state.step, loss_value, lr, tokens_per_second);

    if (bad && bad_in_row >= config.max_bad_steps) {  // roll back to the newest checkpoint
      if (writer) writer->wait();
      if (world.size() > 1) world.barrier()->wait();
      const std::string dir = resolve_checkpoint(config.out);
      LoadedCheckpoint back = load_checkpoint(dir, model);
      replica.load_optimizer_state(back.optimizer_state, back.optimizer_steps);
      progress.line() << "rolled back to " << dir << " (step " << back.state.step << ") after " << bad_in_row
                      << " non-finite steps in a row\n" << std::flush;
      ++result.rollbacks;
      TUTTI_CHECK(result.rollbacks <= config.max_bad_steps, "still non-finite after ", result.rollbacks,
                  " rollbacks at step ", state.step, "; lower the learning rate");
      state = back.state;
      state.data_path = config.data;
      bad_in_row = 0;
      continue;
    }
    if (state.step % config.eval_interval == 0 || state.step == config.steps) eval_and_log(state.step, progress);
    if (state.step % config.checkpoint_interval == 0 || state.step == config.steps || agreed[1] > 0) {
      auto optimizer_state = replica.optimizer_state();  // collective under ZeRO
      if (lead) {
        writer->submit(snapshot(model, std::move(optimizer_state), replica.steps_taken(), state));
        progress.line() << "checkpoint of step " << state.step << " (written in the background)\n" << std::flush;
      }
      last_checkpoint_time = Clock::now();
    }
  }
  if (writer) result.checkpoint = writer->wait();
  metrics.flush();
  const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
  result.steps = state.step;
  result.tokens_per_second = total > 0 ? double(tokens_per_step * (result.steps - first_step)) / total : 0.0;
  if (config.sample_tokens > 0 && lead) {
    nn::SampleOptions sample;
    sample.max_tokens = config.sample_tokens;
    sample.temperature = 0.8f;
    sample.top_k = 0;
    sample.seed = state.sample_rng_state;
    result.sample = bytes_to_text(nn::generate(model, {'\n'}, sample));
    progress.line() << "--- sample (" << config.sample_tokens << " bytes, temperature 0.8) ---\n"
                    << result.sample << "\n---\n" << std::flush;
  }
  return result;
}

}  // namespace tutti::train
