// Data-parallel scaling and overlap of tutti's GPT training step on W2 (6 layers, 6 heads, dim 384,
// context 256) at a fixed global batch of 8 sequences, driven exactly as src/train/trainer.cpp drives
// DataParallel: zero_grad -> next batch (this rank's slice) -> forward -> begin_sync -> backward ->
// end_sync (the group's mean gradient) -> AdamW step -> mean loss over ranks.
//
//   dp_bench [--threads 2]                                  one process: 1 rank x 2 threads
//   mpirun -np 2 dp_bench --threads 1 [--bucket-mib 25]      2 ranks x 1 thread
//
// Measured per timed step: the step time of the slowest rank (tokens/s = global tokens / that),
// backward time and exposed communication time (what end_sync waits after backward ended) from
// DataParallel::last_stats(). Then a calibration with no compute: the same buckets (same flat
// gradient size and bucket rule) reduced back to back, launched together as DataParallel launches
// them, timed. Hidden fraction = 1 - exposed / calibrated communication time.
//
// Exposed time differs between ranks: the rank that ends backward first also waits for the other
// rank's backward (skew, not communication). The last rank to end backward waits only for the
// communication still in flight, so its exposed time (the minimum over ranks) is the one the
// hidden fraction uses; the maximum over ranks is reported beside it.
//
// Letters: B sequences per rank, T context.
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/data/token_dataset.hpp"
#include "tutti/nn/gpt.hpp"
#include "tutti/optim/adamw.hpp"
#include "tutti/parallel/data_parallel.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// ---- options ------------------------------------------------------------------------------------

struct Options {
  double bucket_mib = 25;
  int zero = 0;
  int steps = 10, warmup = 2, threads = 0;  // threads 0: the cores divided by the ranks
  int calib_reps = 10;
  int global_batch = 8;
  std::string data = TUTTI_BENCH_DATA;
  uint64_t seed = 1337;
  bool json = false;
};

// W2 (bench/RESULTS.md).
tutti::nn::GPTConfig w2_config() {
  tutti::nn::GPTConfig c;
  c.n_layer = 6;
  c.n_head = 6;
  c.n_embd = 384;
  c.block_size = 256;
  c.vocab_size = 256;
  c.validate();
  return c;
}

// ---- statistics -----------------------------------------------------------------------------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
double smallest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

// Per timed step, per rank (seconds).
// end_sync: the whole call (exposed wait + averaging); update: gradient norm, mean loss and AdamW.
enum Field { kStep, kForward, kBackward, kExposed, kEndSync, kUpdate, kFields };
constexpr const char* kFieldNames[kFields] = {"step", "forward", "backward", "exposed", "end_sync", "update"};

// rows[rank][field][step], gathered on every rank.
using Timeline = std::vector<std::vector<std::vector<double>>>;

Timeline gather_timeline(tutti::comm::Communicator& world, const std::vector<std::vector<double>>& mine, int steps) {
  std::vector<double> flat;
  for (const auto& f : mine) flat.insert(flat.end(), f.begin(), f.end());
  const int64_t per_rank = int64_t{kFields} * steps;
  std::vector<double> all(size_t(per_rank * world.size()));
  world.all_gather(std::span<const double>(flat), std::span<double>(all),
                   std::vector<int64_t>(size_t(world.size()), per_rank))->wait();
  Timeline t(size_t(world.size()), std::vector<std::vector<double>>(kFields));
  for (int r = 0; r < world.size(); ++r)
    for (int f = 0; f < kFields; ++f) {
      const auto begin = all.begin() + r * per_rank + int64_t{f} * steps;
      t[size_t(r)][size_t(f)].assign(begin, begin + steps);
    }
  return t;
}

// Per step, the max (or min) over ranks of one field.
std::vector<double> over_ranks(const Timeline& t, Field f, bool take_max) {
  std::vector<double> out = t[0][f];
  for (size_t r = 1; r < t.size(); ++r)
    for (size_t s = 0; s < out.size(); ++s) out[s] = take_max ? std::max(out[s], t[r][f][s]) : std::min(out[s], t[r][f][s]);
  return out;
}

// ---- the training loop ------------------------------------------------------------------------

struct TrainLog {
  std::vector<std::vector<double>> fields = std::vector<std::vector<double>>(kFields);  // timed steps
  std::vector<double> losses;  // mean over ranks, every step
};

// The trainer's step (src/train/trainer.cpp) without micro-batch accumulation, gradient clipping or
// learning-rate schedule: one micro-batch of B sequences per rank.
TrainLog train(tutti::comm::Communicator& world, tutti::nn::GPT& model, tutti::parallel::DataParallel& replica,
               const tutti::data::TokenDataset& dataset, const Options& opt, int per_rank, float lr) {
  TrainLog log;
  for (int step = 0; step < opt.warmup + opt.steps; ++step) {
    const auto t0 = Clock::now();
    world.set_step(step + 1);
    replica.zero_grad();
    const int64_t first = int64_t{world.rank()} * per_rank;
    const tutti::data::Batch batch = dataset.batch(tutti::data::Split::train, opt.seed, uint64_t(step), first,
                                                   per_rank);  // (B, T) each
    tutti::Tensor loss = model.loss(batch.inputs, batch.targets);
    const auto t1 = Clock::now();
    replica.begin_sync();
    loss.backward();
    const auto t_sync = Clock::now();
    replica.end_sync();
    const auto t2 = Clock::now();
    // As the trainer: the loss and the squared gradient norm in one all-reduce, then the update.
    std::array<double, 2> agreed{loss.item(), replica.grad_squares()};
    if (world.size() > 1) world.all_reduce(std::span<double>(agreed))->wait();
    replica.step(lr, tutti::optim::clip_scale(std::sqrt(agreed[1]), 1.0f));
    const double loss_value = agreed[0] / world.size();
    const auto t3 = Clock::now();
    if (!std::isfinite(loss_value)) throw tutti::Error("non-finite loss at step " + std::to_string(step));
    log.losses.push_back(loss_value);
    if (step < opt.warmup) continue;
    const tutti::parallel::CommStats& stats = replica.last_stats();
    log.fields[kStep].push_back(seconds_between(t0, t3));
    log.fields[kForward].push_back(seconds_between(t0, t1));
    log.fields[kBackward].push_back(stats.backward_seconds);
    log.fields[kExposed].push_back(stats.exposed_seconds);
    log.fields[kEndSync].push_back(seconds_between(t_sync, t2));
    log.fields[kUpdate].push_back(seconds_between(t2, t3));
  }
  return log;
}

// ---- calibration: the same buckets, no compute -----------------------------------------------------

// DataParallel's bucket rule (src/parallel/data_parallel.cpp, not public): parameters in reverse
// registration order, a new bucket once the current one holds at least bucket_bytes. The caller
// checks the count against DataParallel::num_buckets().
std::vector<std::pair<int64_t, int64_t>> bucket_ranges(const tutti::nn::Module& model, int64_t bucket_bytes) {
  const int64_t per_bucket = std::max<int64_t>(1, bucket_bytes / 4);
  const auto named = model.named_parameters();
  std::vector<std::pair<int64_t, int64_t>> buckets;  // [begin, end) in the flat gradient
  int64_t offset = 0;
  for (auto it = named.rbegin(); it != named.rend(); ++it) {
    if (buckets.empty() || buckets.back().second - buckets.back().first >= per_bucket)
      buckets.emplace_back(offset, offset);
    offset += it->second.numel();
    buckets.back().second = offset;
  }
  return buckets;
}

int64_t shard_begin(int64_t n, int rank, int world) { return n * rank / world; }

// Seconds of each repetition (slowest rank) to reduce every bucket, all launched back to back and
// then waited for, as end_sync waits for them. ZeRO 2 reduce-scatters each bucket to the ranks that
// own its parts; otherwise all-reduce.
std::vector<double> calibrate(tutti::comm::Communicator& world, const std::vector<std::pair<int64_t, int64_t>>& buckets,
                              int zero, int reps) {
  const int W = world.size();
  const int64_t n = buckets.empty() ? 0 : buckets.back().second;
  std::vector<float> grads(static_cast<size_t>(n), 1.0f);
  std::vector<float> shard(static_cast<size_t>(n));
  std::vector<double> times;
  for (int rep = -2; rep < reps; ++rep) {  // two untimed repetitions first
    world.barrier()->wait();
    const auto t0 = Clock::now();
    std::vector<tutti::comm::WorkHandle> work;
    for (const auto& [b, e] : buckets) {
      if (zero < 2) {
        work.push_back(world.all_reduce(std::span<float>(grads.data() + b, size_t(e - b))));
        continue;
      }
      std::vector<int64_t> counts(static_cast<size_t>(W));
      for (int k = 0; k < W; ++k)
        counts[size_t(k)] = std::max<int64_t>(0, std::min(e, shard_begin(n, k + 1, W)) - std::max(b, shard_begin(n, k, W)));
      work.push_back(world.reduce_scatter(std::span<const float>(grads.data() + b, size_t(e - b)),
                                          std::span<float>(shard.data(), size_t(counts[size_t(world.rank())])), counts));
    }
    for (auto& w : work) w->wait();
    if (rep >= 0) times.push_back(seconds_between(t0, Clock::now()));
  }
  if (W > 1 && !times.empty()) world.all_reduce(std::span<double>(times), tutti::comm::ReduceOp::max)->wait();
  return times;
}

// ---- the machine ------------------------------------------------------------------------------------

// The CPUs this process may run on, e.g. "0" or "0-1" (what mpirun's binding left it).
std::string cpu_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return "?";
  std::string out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &set)) continue;
    int last = c;
    while (last + 1 < CPU_SETSIZE && CPU_ISSET(last + 1, &set)) ++last;
    out += (out.empty() ? "" : ",") + std::to_string(c) + (last > c ? "-" + std::to_string(last) : "");
    c = last;
  }
  return out;
}

std::vector<std::string> gather_affinity(tutti::comm::Communicator& world) {
  // Fixed-width text per rank: all_gather carries typed elements (u8).
  constexpr int64_t kWidth = 64;
  std::string mine = cpu_affinity();
  mine.resize(size_t(kWidth), '\0');
  std::vector<uint8_t> in(mine.begin(), mine.end()), all(size_t(kWidth * world.size()));
  if (world.size() > 1)
    world.all_gather(std::span<const uint8_t>(in), std::span<uint8_t>(all), std::vector<int64_t>(size_t(world.size()), kWidth))
        ->wait();
  else
    all = in;
  std::vector<std::string> out;
  for (int r = 0; r < world.size(); ++r) out.emplace_back(reinterpret_cast<const char*>(all.data() + r * kWidth));
  return out;
}

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// ---- the benchmark ------------------------------------------------------------------------------

// What one run measured, on every rank.
struct Measurement {
  int ranks, threads, zero, per_rank;
  std::string backend;
  int64_t num_buckets;
  tutti::parallel::MemoryReport memory;
  Timeline timeline;                  // [rank][field][step]
  std::vector<double> calibration;    // seconds per repetition, slowest rank
  std::vector<std::string> affinity;  // per rank
  std::vector<double> losses;
};

Measurement measure(tutti::comm::Communicator& world, const Options& opt) {
  const int W = world.size();
  TUTTI_CHECK_AS(tutti::InvalidArgument, opt.global_batch % W == 0, "global batch ", opt.global_batch,
                 " is not divisible by ", W, " ranks");
  const int per_rank = opt.global_batch / W;
  tutti::set_num_threads(opt.threads > 0 ? opt.threads : std::max(1, tutti::hardware_threads() / W));
  const tutti::nn::GPTConfig config = w2_config();
  tutti::nn::GPT model(config);
  tutti::Rng rng(opt.seed);
  model.init_weights(rng);
  const tutti::data::TokenDataset dataset(opt.data, config.block_size);
  const tutti::optim::AdamWOptions adamw = torch_adamw_options();
  const int64_t bucket_bytes = std::max<int64_t>(4, std::llround(opt.bucket_mib * double(1 << 20)));
  const int zero = W > 1 ? opt.zero : 0;  // as the trainer: no sharding in a world of one
  tutti::parallel::DataParallel replica(model, world, adamw, {bucket_bytes, zero});
  const auto buckets = bucket_ranges(model, bucket_bytes);
  TUTTI_CHECK(int64_t(buckets.size()) == replica.num_buckets(), "the calibration's bucket rule gives ",
              buckets.size(), " buckets, DataParallel has ", replica.num_buckets(),
              ": update bucket_ranges() to match src/parallel/data_parallel.cpp");

  const TrainLog log = train(world, model, replica, dataset, opt, per_rank, adamw.lr);
  Measurement m{W, tutti::num_threads(), zero, per_rank, world.backend(), replica.num_buckets(), replica.memory(),
                gather_timeline(world, log.fields, opt.steps), {}, {}, log.losses};
  m.calibration = calibrate(world, buckets, zero, opt.calib_reps);
  m.affinity = gather_affinity(world);
  return m;
}

nlohmann::json summarize(const Measurement& m, const Options& opt) {
  const Timeline& timeline = m.timeline;
  const double tokens = double(opt.global_batch) * w2_config().block_size;
  const std::vector<double> step = over_ranks(timeline, kStep, true);
  const double comm_median = m.calibration.empty() ? 0.0 : median(m.calibration);
  const double exposed_median = median(over_ranks(timeline, kExposed, false));  // the last rank to end backward
  nlohmann::json per_rank_ms = nlohmann::json::array();
  for (int r = 0; r < m.ranks; ++r) {
    nlohmann::json row{{"rank", r}, {"cpus", m.affinity[size_t(r)]}};
    for (int f = 0; f < kFields; ++f) row[std::string(kFieldNames[f]) + "_ms_median"] = median(timeline[size_t(r)][size_t(f)]) * 1e3;
    per_rank_ms.push_back(row);
  }
  auto ms_max = [&](Field f) { return median(over_ranks(timeline, f, true)) * 1e3; };
  return {
      {"impl", "tutti"},
      {"workload", "W2"},
      {"ranks", m.ranks},
      {"backend", m.backend},
      {"threads", m.threads},
      {"config", std::to_string(m.ranks) + "x" + std::to_string(m.threads)},
      {"zero", m.zero},
      {"global_batch", opt.global_batch},
      {"per_rank_batch", m.per_rank},
      {"params", w2_config().num_parameters()},
      {"bucket_mib", opt.bucket_mib},
      {"num_buckets", m.num_buckets},
      {"gradient_bytes", m.memory.gradient_bytes},  // per rank: the shard under ZeRO 2
      {"all_gradient_bytes", m.memory.parameter_bytes},
      {"optimizer_bytes", m.memory.optimizer_bytes},
      {"steps", opt.steps},
      {"warmup", opt.warmup},
      {"tokens_per_step", tokens},
      {"tok_s_median", tokens / median(step)},
      {"tok_s_best", tokens / smallest(step)},
      {"step_ms_median", median(step) * 1e3},
      {"step_ms_best", smallest(step) * 1e3},
      {"forward_ms_median", ms_max(kForward)},
      {"backward_ms_median", ms_max(kBackward)},
      {"exposed_ms_median", exposed_median * 1e3},
      {"exposed_max_ms_median", ms_max(kExposed)},
      {"end_sync_ms_median", ms_max(kEndSync)},
      {"update_ms_median", ms_max(kUpdate)},
      {"comm_ms_median", comm_median * 1e3},
      {"comm_ms_best", m.calibration.empty() ? 0.0 : smallest(m.calibration) * 1e3},
      {"hidden_fraction", m.ranks > 1 && comm_median > 0 ? std::max(0.0, 1.0 - exposed_median / comm_median) : 0.0},
      {"per_rank", per_rank_ms},
      {"omp_wait_policy", env_or("OMP_WAIT_POLICY", "default")},
      {"comm_poll_us", env_or("TUTTI_COMM_POLL_US", "default")},
      {"loss_first", m.losses.front()},
      {"loss_last", m.losses.back()},
  };
}

void print_table(const nlohmann::json& r) {
  auto d = [&](const char* key) { return r[key].get<double>(); };
  std::printf("tutti dp_bench: W2, %d rank(s) x %d thread(s) (%s), zero %d, global batch %d (%d per rank), "
              "%lld params\n",
              r["ranks"].get<int>(), r["threads"].get<int>(), r["backend"].get<std::string>().c_str(),
              r["zero"].get<int>(), r["global_batch"].get<int>(), r["per_rank_batch"].get<int>(),
              r["params"].get<long long>());
  std::printf("  %lld bucket(s) of up to %g MiB over %.1f MiB of gradients; %d timed steps after %d warmup\n",
              r["num_buckets"].get<long long>(), d("bucket_mib"), d("all_gradient_bytes") / (1 << 20), r["steps"].get<int>(),
              r["warmup"].get<int>());
  for (const auto& row : r["per_rank"])
    std::printf("  rank %d on cpus %s: step %.1f ms, backward %.1f, exposed %.1f (medians)\n", row["rank"].get<int>(),
                row["cpus"].get<std::string>().c_str(), row["step_ms_median"].get<double>(),
                row["backward_ms_median"].get<double>(), row["exposed_ms_median"].get<double>());
  std::printf("\n| config | tok/s median / best | step ms | forward | backward | exposed (last rank / max) | end_sync "
              "| update | pure comm ms median / best | hidden |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  std::printf("| %s | %.0f / %.0f | %.1f | %.1f | %.1f | %.1f / %.1f | %.1f | %.1f | %.1f / %.1f | %s |\n",
              r["config"].get<std::string>().c_str(), d("tok_s_median"), d("tok_s_best"), d("step_ms_median"),
              d("forward_ms_median"), d("backward_ms_median"), d("exposed_ms_median"), d("exposed_max_ms_median"),
              d("end_sync_ms_median"), d("update_ms_median"), d("comm_ms_median"), d("comm_ms_best"),
              r["ranks"].get<int>() > 1 ? (std::to_string(std::lround(100 * d("hidden_fraction"))) + "%").c_str() : "-");
  std::printf("\nstep ms and tok/s: the slowest rank per step; forward/backward/update: max over ranks; exposed: what\n"
              "end_sync waits after backward (min over ranks = the last rank to finish backward; max includes skew);\n"
              "end_sync: the whole call (that wait and averaging); update: gradient norm, mean loss, AdamW;\n"
              "pure comm: the same buckets reduced with no compute; hidden = 1 - exposed / pure comm.\n"
              "loss first %.4f, last %.4f\n",
              d("loss_first"), d("loss_last"));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tutti data-parallel scaling and overlap on W2 (run plainly or under mpirun)"};
  Options opt;
  app.add_option("--bucket-mib", opt.bucket_mib, "gradient bucket size in MiB")->check(CLI::PositiveNumber);
  app.add_option("--zero", opt.zero, "ZeRO stage: 0, 1 or 2 (ignored in a world of one)")->check(CLI::Range(0, 2));
  app.add_option("--steps", opt.steps, "timed steps (after warmup)")->check(CLI::PositiveNumber);
  app.add_option("--warmup", opt.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_option("--threads", opt.threads, "kernel threads per rank (default: cores / ranks)")->check(CLI::NonNegativeNumber);
  app.add_option("--calib-reps", opt.calib_reps, "timed repetitions of the no-compute reduction")->check(CLI::PositiveNumber);
  app.add_option("--global-batch", opt.global_batch, "sequences per step over all ranks")->check(CLI::PositiveNumber);
  app.add_option("--data", opt.data, "byte-level text for batches");
  app.add_option("--seed", opt.seed, "weights and batches");
  app.add_flag("--json", opt.json, "print one JSON object (rank 0)");
  CLI11_PARSE(app, argc, argv);
  std::unique_ptr<tutti::comm::Communicator> world;
  try {
    world = tutti::comm::make_world("auto");
    const nlohmann::json result = summarize(measure(*world, opt), opt);
    if (world->rank() == 0) {
      if (opt.json) std::printf("%s\n", result.dump().c_str());
      else print_table(result);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dp_bench: error%s: %s\n", world ? (" on rank " + std::to_string(world->rank())).c_str() : "",
                 e.what());
    if (world && world->size() > 1) world->abort(1);  // the other ranks would wait forever
    return 1;
  }
}
