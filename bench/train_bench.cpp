// Training throughput of tutti's GPT on the CPU workloads W1 and W2, timed exactly as the PyTorch
// peer (bench/torch_peer.py): the same model, optimizer, batch and step, per-step wall time after
// warmup, median and best.
//
// GPT-2 (Hugging Face layout), byte vocabulary 256, tied LM head, fp32, AdamW lr 1e-3, betas
// (0.9, 0.999), eps 1e-8, weight decay 0.1 on 2-D parameters. Whole-step GFLOP/s use
// GPTConfig::flops_per_token and are compared with this CPU's fp32 FMA peak (../shared/MACHINE.md).
//
// Letters: B batch, T context.
//
//   train_bench --workload W1|W2 [--steps 20] [--warmup 3] [--threads 1] [--json] [--dump DIR]
//
// --dump DIR writes the initial weights (safetensors, GPT-2 names), every step's batch and loss,
// for `torch_peer.py --check DIR` to replay in PyTorch: proof that the peer computes the same
// thing. A dumping run's timings are not measurements.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "tutti/ckpt/safetensors.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/data/token_dataset.hpp"
#include "tutti/nn/gpt.hpp"
#include "tutti/optim/adamw.hpp"

namespace {

// ---- workloads and the machine ----------------------------------------------------------------

struct Workload {
  const char* name;
  int n_layer, n_head, n_embd, context, batch;
};
constexpr Workload kWorkloads[] = {
    {"W1", 4, 4, 128, 128, 8},
    {"W2", 6, 6, 384, 256, 8},
};

// fp32 FMA peak of the development machine, measured (../shared/MACHINE.md): ~100 GFLOP/s on one
// core, ~204 on two (the cores boost to ~3.1 GHz). Override with --peak-gflops on another machine.
double default_peak_gflops(int threads) { return threads == 1 ? 100.0 : 102.0 * threads; }

struct Options {
  std::string workload = "W1";
  int steps = 20, warmup = 3, threads = 1;
  std::string data = TUTTI_BENCH_DATA;
  uint64_t seed = 1337;
  double peak_gflops = 0.0;  // 0: default_peak_gflops(threads)
  bool json = false;
  std::string dump;  // directory for the PyTorch cross-check, or empty
};

// ---- batches ----------------------------------------------------------------------------------

// Random windows of the text file (TokenDataset), or uniformly random tokens when there is none;
// either way the batch is made inside the timed step, as the peer does.
class Batches {
 public:
  Batches(const std::string& path, int batch, int context, uint64_t seed)
      : batch_(batch), context_(context), seed_(seed) {
    if (!path.empty() && std::filesystem::exists(path)) {
      dataset_ = std::make_unique<tutti::data::TokenDataset>(path, context);
      source_ = path;
    }
  }
  const std::string& source() const { return source_; }

  tutti::data::Batch next(uint64_t step) const {
    if (dataset_) return dataset_->batch(tutti::data::Split::train, batch_, seed_, step);
    tutti::Rng rng = tutti::Rng::stream(seed_, step);
    std::vector<int32_t> xy(static_cast<size_t>(batch_) * (context_ + 1));
    for (int32_t& t : xy) t = static_cast<int32_t>(rng.below(256));
    std::vector<int32_t> x, y;
    for (int b = 0; b < batch_; ++b) {
      const auto row = xy.begin() + static_cast<ptrdiff_t>(b) * (context_ + 1);
      x.insert(x.end(), row, row + context_);
      y.insert(y.end(), row + 1, row + context_ + 1);
    }
    return {tutti::Tensor::from_vector({batch_, context_}, x), tutti::Tensor::from_vector({batch_, context_}, y)};
  }

 private:
  int batch_, context_;
  uint64_t seed_;
  std::unique_ptr<tutti::data::TokenDataset> dataset_;
  std::string source_ = "random tokens";
};

// ---- timing -----------------------------------------------------------------------------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
double best(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

struct StepLog {
  std::vector<double> step, forward, backward, update;  // seconds, timed steps only
  std::vector<float> losses;                           // every step, warmup included
};

// ---- the training loop ------------------------------------------------------------------------

// Trains for warmup + steps steps, timing each. With `dump` open, every batch is written to it
// (int32 inputs then targets, (B, T) each) for torch_peer.py --check.
StepLog train(tutti::nn::GPT& model, tutti::optim::AdamW& optimizer, float lr, const Batches& batches, int warmup,
              int steps, std::ofstream* dump) {
  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
  StepLog log;
  for (int step = 0; step < warmup + steps; ++step) {
    const auto t0 = clock::now();
    const tutti::data::Batch batch = batches.next(static_cast<uint64_t>(step));  // (B, T) each
    if (dump) {
      for (const tutti::Tensor& t : {batch.inputs, batch.targets}) {
        const std::vector<int32_t> v = t.to_vector<int32_t>();
        dump->write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(int32_t)));
      }
    }
    tutti::Tensor loss = model.loss(batch.inputs, batch.targets);
    const auto t1 = clock::now();
    model.zero_grad();
    loss.backward();
    const auto t2 = clock::now();
    optimizer.step(lr);
    const float loss_value = loss.item();
    const auto t3 = clock::now();
    if (!std::isfinite(loss_value)) throw tutti::Error("non-finite loss at step " + std::to_string(step));
    log.losses.push_back(loss_value);
    if (step < warmup) continue;
    log.step.push_back(seconds(t0, t3));
    log.forward.push_back(seconds(t0, t1));
    log.backward.push_back(seconds(t1, t2));
    log.update.push_back(seconds(t2, t3));
  }
  return log;
}

// ---- the benchmark ----------------------------------------------------------------------------

const Workload& find_workload(const std::string& name) {
  for (const Workload& w : kWorkloads)
    if (name == w.name) return w;
  throw tutti::InvalidArgument("unknown workload " + name + " (W1 or W2)");
}

tutti::nn::GPTConfig make_config(const Workload& w) {
  tutti::nn::GPTConfig config;
  config.n_layer = w.n_layer;
  config.n_head = w.n_head;
  config.n_embd = w.n_embd;
  config.block_size = w.context;
  config.vocab_size = 256;
  config.validate();
  return config;
}

nlohmann::json run(const Options& opt) {
  const Workload& w = find_workload(opt.workload);
  tutti::set_num_threads(opt.threads);
  const tutti::nn::GPTConfig config = make_config(w);
  tutti::nn::GPT model(config);
  tutti::Rng rng(opt.seed);
  model.init_weights(rng);
  const tutti::optim::AdamWOptions adamw = torch_adamw_options();
  tutti::optim::AdamW optimizer(model.named_parameters(), adamw);
  const Batches batches(opt.data, w.batch, w.context, opt.seed);

  std::ofstream dump;
  if (!opt.dump.empty()) {
    std::filesystem::create_directories(opt.dump);
    tutti::ckpt::write_safetensors(opt.dump + "/model.safetensors", model.named_parameters());
    dump.open(opt.dump + "/batches.i32", std::ios::binary | std::ios::trunc);
    if (!dump) throw tutti::Error("cannot write " + opt.dump + "/batches.i32");
  }
  const StepLog log = train(model, optimizer, adamw.lr, batches, opt.warmup, opt.steps, dump.is_open() ? &dump : nullptr);
  if (!opt.dump.empty()) {
    std::ofstream out(opt.dump + "/losses.json");
    out << nlohmann::json{{"workload", w.name}, {"losses", log.losses}}.dump() << "\n";
  }

  const double tokens = double(w.batch) * w.context;
  const double flops = config.flops_per_token(w.context) * tokens;  // per step
  const double peak = opt.peak_gflops > 0 ? opt.peak_gflops : default_peak_gflops(opt.threads);
  const double med = median(log.step), top = best(log.step);
  return {
      {"impl", "tutti"},
      {"workload", w.name},
      {"threads", opt.threads},
      {"tutti_threads", tutti::num_threads()},
      {"params", config.num_parameters()},
      {"data", batches.source()},
      {"steps", opt.steps},
      {"warmup", opt.warmup},
      {"tokens_per_step", tokens},
      {"step_ms_median", med * 1e3},
      {"step_ms_best", top * 1e3},
      {"forward_ms_median", median(log.forward) * 1e3},
      {"backward_ms_median", median(log.backward) * 1e3},
      {"update_ms_median", median(log.update) * 1e3},
      {"tok_s_median", tokens / med},
      {"tok_s_best", tokens / top},
      {"flops_per_token", config.flops_per_token(w.context)},
      {"gflops_median", flops / med * 1e-9},
      {"gflops_best", flops / top * 1e-9},
      {"peak_gflops", peak},
      {"peak_fraction_median", flops / med * 1e-9 / peak},
      {"loss_first", log.losses.front()},
      {"loss_last", log.losses.back()},
  };
}

void print_human(const nlohmann::json& r) {
  std::printf("tutti %s, %d thread(s), %lld params, data: %s\n", r["workload"].get<std::string>().c_str(),
              r["threads"].get<int>(), r["params"].get<long long>(), r["data"].get<std::string>().c_str());
  std::printf("  %d timed steps after %d warmup, %.0f tokens/step\n", r["steps"].get<int>(), r["warmup"].get<int>(),
              r["tokens_per_step"].get<double>());
  std::printf("  tokens/s   median %.0f   best %.0f\n", r["tok_s_median"].get<double>(), r["tok_s_best"].get<double>());
  std::printf("  step ms    median %.1f   best %.1f   (forward %.1f, backward %.1f, update %.1f)\n",
              r["step_ms_median"].get<double>(), r["step_ms_best"].get<double>(), r["forward_ms_median"].get<double>(),
              r["backward_ms_median"].get<double>(), r["update_ms_median"].get<double>());
  std::printf("  GFLOP/s    median %.1f   best %.1f   (%.0f%% of the %.0f GFLOP/s peak)\n",
              r["gflops_median"].get<double>(), r["gflops_best"].get<double>(),
              100.0 * r["peak_fraction_median"].get<double>(), r["peak_gflops"].get<double>());
  std::printf("  loss       first %.3f   last %.3f\n", r["loss_first"].get<double>(), r["loss_last"].get<double>());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tutti GPT training throughput (workloads W1, W2), the peer of bench/torch_peer.py"};
  Options opt;
  app.add_option("--workload", opt.workload, "W1: 4 layers, dim 128, ctx 128; W2: 6 layers, dim 384, ctx 256")
      ->check(CLI::IsMember({"W1", "W2"}));
  app.add_option("--steps", opt.steps, "timed steps (after warmup)")->check(CLI::PositiveNumber);
  app.add_option("--warmup", opt.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_option("--threads", opt.threads, "kernel threads")->check(CLI::PositiveNumber);
  app.add_option("--data", opt.data, "byte-level text for batches (random tokens when missing or empty)");
  app.add_option("--seed", opt.seed, "weights and batches");
  app.add_option("--peak-gflops", opt.peak_gflops, "fp32 peak to compare with (default: MACHINE.md's)");
  app.add_flag("--json", opt.json, "print one JSON object");
  app.add_option("--dump", opt.dump, "write weights, batches and losses for torch_peer.py --check");
  CLI11_PARSE(app, argc, argv);
  try {
    const nlohmann::json result = run(opt);
    if (opt.json)
      std::printf("%s\n", result.dump().c_str());
    else
      print_human(result);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_bench: error: %s\n", e.what());
    return 1;
  }
}
