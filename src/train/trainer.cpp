#include "tutti/train/trainer.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "train/eval_rank.hpp"
#include "train/layout.hpp"
#include "train/run_support.hpp"
#include "train/workflow.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/ckpt/safetensors.hpp"
#include "tutti/comm/nccl.hpp"
#include "tutti/core/allocator.hpp"
#include "tutti/core/energy.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/core/trace.hpp"
#include "tutti/ops/ops.hpp"
#include "tutti/parallel/data_parallel.hpp"
#include "tutti/parallel/mesh.hpp"
#include "tutti/parallel/pipeline.hpp"
#include "tutti/train/plot.hpp"
#include "tutti/train/run_dir.hpp"

namespace fs = std::filesystem;

namespace tutti::train {
namespace {

using Clock = std::chrono::steady_clock;
// The arena's workers: the loader, an evaluation and a checkpoint write can run at once.
constexpr int kBackgroundWorkers = 3;
const std::vector<std::string> kMoments = {".exp_avg", ".exp_avg_sq"};  // AdamW state per parameter

}  // namespace

double evaluate(const nn::GPT& model, const data::TokenDataset& dataset, data::Split split, int batches,
                int batch_size, int64_t seed) {
  return eval_loss_sum(model, dataset, split, batches, batch_size, seed) / batches;
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

// ============================================================================================
// One training run on this rank
// ============================================================================================

class Run {
 public:
  // `world`: the training ranks; `launch`: every rank (the evaluating rank too, if any).
  Run(const TrainConfig& config, const TrainOptions& options, comm::Communicator& world, comm::Communicator& launch)
      : config_(config), options_(options), world_(world), layout_(plan_layout(config, world.size())),
        mesh_(world, layout_.mesh), coord_{mesh_.dp_rank(), mesh_.pp_rank(), mesh_.tp_rank()},
        lead_(world.rank() == 0), log_(!lead_ ? null_stream_ : options.log ? *options.log : std::cout),
        dataset_((set_num_threads(config.threads > 0 ? config.threads : hardware_threads()),
                  data::TokenDataset(config.data, config.context, 0.1, config.vocab))),  // before the output directory
        tasks_(config.workflow == "concurrent" ? kBackgroundWorkers : 0),
        loader_(tasks_, [this](int64_t step) { return step_batches(step); }),
        device_(run_device(config, world)),
        // GPUs of several ranks: device tensors travel over NCCL, host values over the launcher's world.
        nccl_(device_.is_cuda() && world.size() > 1 ? comm::make_nccl_from(world, device_.index) : nullptr),
        device_mesh_(nccl_ ? std::make_unique<parallel::Mesh>(*nccl_, layout_.mesh) : nullptr),
        energy_(device_),
        model_(config.model(), partition_of(layout_, coord_, &dmesh().tp_group())),
        pipeline_(dmesh().pp_group(), {layout_.micro, config.context, config.dim}, device_, layout_.schedule,
                  layout_.micro_batches),
        eval_pipeline_(dmesh().pp_group(), {config.batch, config.context, config.dim}, device_, parallel::Schedule::gpipe,
                       1),
        // The first and last stages of one (dp, tp) position: the tied wte's two copies.
        tied_(layout_.mesh.pp > 1 ? (nccl_ ? *nccl_ : world).split(2 * (coord_.dp * layout_.mesh.tp + coord_.tp) +
                                                    (pipeline_.first() || pipeline_.last() ? 0 : 1),
                                                coord_.pp)
                                  : nullptr),
        reports_loss_(pipeline_.last() && coord_.tp == 0),
        schedule_{config.lr, config.min_lr, config.warmup, config.decay_steps > 0 ? config.decay_steps : config.steps,
                  config.decay == "cosine"},
        tokens_per_step_(int64_t{config.batch} * config.context),
        heartbeat_((prepare_output(), config.out), world.rank()),  // the data checked out: now the directory
        inject_nan_(steps_from_env("TUTTI_INJECT_NAN_STEPS")),
        inject_slow_ms_(slow_ms_from_env(world.rank())) {
    for (parallel::Mesh* m : {&mesh_, device_mesh_.get()})
      if (m) m->set_timeout(std::chrono::seconds(config.comm_timeout));
    Rng init_rng(static_cast<uint64_t>(config.seed));
    model_.init_weights(init_rng);
    model_.to(device_);
    state_.seed = config.seed;
    state_.data_path = config.data;
    state_.sample_rng_state = static_cast<uint64_t>(config.seed) * 0x9E3779B97F4A7C15ull + 1;
    LoadedCheckpoint loaded;
    if (options.resume) {
      result_.checkpoint = pick_checkpoint();
      loaded = load_checkpoint(result_.checkpoint, model_);
      state_ = loaded.state;
      state_.data_path = config.data;
      check_ranks_agree(loaded.manifest);
    }
    const int zero = layout_.mesh.dp > 1 ? config.zero : 0;
    replica_ = std::make_unique<parallel::DataParallel>(
        model_, dmesh().dp_group(), optim::AdamWOptions{config.lr, config.beta1, config.beta2, 1e-8f, config.weight_decay},
        parallel::DataParallelOptions{int64_t(config.bucket_mib) << 20, zero});
    if (options.resume) {
      replica_->load_optimizer_state(shards_of(loaded.optimizer_state, model_, kMoments), loaded.optimizer_steps);
      log_ << "resumed from " << result_.checkpoint << " at step " << state_.step << "\n";
    }
    if (lead_) metrics_.open(fs::path(config.out) / "metrics.jsonl", std::ios::app);
    if (lead_ && config.eval_rank >= 0) eval_client_ = std::make_unique<EvalRankClient>(launch, config.eval_rank);
    if (coord_.dp == 0 && coord_.tp == 0)  // each pipeline stage writes its shard
      writer_ = std::make_unique<CheckpointWriter>(tasks_, config.out, config.keep_checkpoints);
    print_header();
  }

  // A run that ends by an error may leave its evaluation running: it reads snapshot_ and
  // dataset_, which go before tasks_ (which would wait for it) does.
  ~Run() { wait_quietly(eval_task_); }

  // The loop: step after step, with evaluation, checkpoints and rollbacks at their points.
  TrainResult train() {
    Progress progress(log_, options_.live_progress && lead_, state_.step, config_.steps, config_.log_interval);
    progress_ = &progress;
    if (!options_.trace.empty()) {
      trace::start();
      trace::name_thread("train");
    }
    if (state_.step == 0) evaluate_and_log();
    const auto run_start = Clock::now();
    const double run_joules_start = last_joules_ = energy_.joules();
    last_checkpoint_ = run_start;
    const int64_t first_step = state_.step;
    while (state_.step < config_.steps) {
      const trace::Scope step_span("step " + std::to_string(state_.step + 1), trace::cat::step);
      const Outcome out = train_step();
      if (eval_client_)
        if (std::optional<EvalReport> r = eval_client_->poll()) report_eval(*r);
      if (out.bad && bad_in_row_ >= config_.max_bad_steps) {
        roll_back();
        continue;
      }
      if (config_.straggler_interval > 0 && state_.step % config_.straggler_interval == 0) compare_ranks();
      if (state_.step % config_.eval_interval == 0 || state_.step == config_.steps) evaluate_and_log();
      if (state_.step % config_.checkpoint_interval == 0 || state_.step == config_.steps || out.time_for_checkpoint)
        checkpoint();
    }
    finish_eval();
    eval_client_.reset();  // the evaluating rank stops
    if (writer_) result_.checkpoint = writer_->wait();
    if (lead_) log_checkpoint_timing();
    const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
    result_.steps = state_.step;
    result_.lead = lead_;
    result_.tokens_per_second = total > 0 ? double(tokens_per_step_ * (result_.steps - first_step)) / total : 0.0;
    if (step_seconds_.size() > 1) {  // the median step, the first (warm-up) left out
      std::vector<double> t(step_seconds_.begin() + 1, step_seconds_.end());
      std::nth_element(t.begin(), t.begin() + std::ptrdiff_t(t.size() / 2), t.end());
      result_.step_tokens_per_second = double(tokens_per_step_) / t[t.size() / 2];
    }
    print_energy(energy_.joules() - run_joules_start, total);
    print_parallel_summary();
    if (!options_.trace.empty()) write_trace();
    plot();
    if (config_.sample_tokens > 0 && !dataset_.synthetic()) print_sample();  // no text to continue
    progress_ = nullptr;
    return result_;
  }

 private:
  struct Outcome {
    bool bad = false;                  // non-finite loss or gradient: the update was skipped
    bool time_for_checkpoint = false;  // rank 0's clock says checkpoint_minutes have passed
  };

  // Every rank checks the output directory (so all fail alike); then rank 0 creates it.
  void prepare_output() {
    check_run_dir(config_, options_.resume);
    if (world_.size() > 1) world_.barrier()->wait();
    if (lead_) create_run_dir(config_, options_.resume);
    if (world_.size() > 1) world_.barrier()->wait();
  }

  // micro-batches through the pipeline (forward, backward; gradients reduced during the last
  // backward) -> the tied embedding's two copies summed -> global norm and loss -> update
  Outcome train_step() {
    const int64_t step = state_.step;  // 0-based index of this step; it completes step + 1
    const auto t0 = Clock::now();
    mesh_.set_step(step + 1);
    if (device_mesh_) device_mesh_->set_step(step + 1);
    heartbeat_.set_step(step);
    replica_->zero_grad();
    const std::vector<data::Batch> batches = loader_.take(step);
    auto forward = [&](int m, const Tensor& input) {
      if (inject_slow_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(inject_slow_ms_));
      const data::Batch& batch = batches[size_t(m)];
      Tensor inputs, targets;
      {
        const trace::Scope span("batch to device", trace::cat::data);
        inputs = pipeline_.first() ? batch.inputs.to(device_) : input;
        targets = batch.targets.to(device_);
      }
      return model_.forward_part(inputs, targets);
    };
    double loss_sum = pipeline_.train_step(forward, [&] { replica_->begin_sync(); });
    // The energy counter, read once a step here, where the device still has the backward queued:
    // a read takes milliseconds (NVML, 2.6-9.4 ms on an H200), which the device would sit idle
    // through anywhere else. The step's energy is the counter's rise since the last step's read.
    const double step_joules = read_energy_since_last();
    replica_->end_sync();  // the replicas' mean gradient
    if (tied_ && (pipeline_.first() || pipeline_.last())) {
      Tensor g = model_.named_parameters().front().second.grad();  // wte: registered first
      tied_->all_reduce(std::span<float>(g.data<float>(), size_t(g.numel())))->wait();
    }
    if (inject_nan_.erase(step + 1) && lead_) loss_sum = std::nan("");
    // The loss, the squared gradient norm (each parameter counted once over the mesh) and whether
    // rank 0's clock asks for a checkpoint, agreed by every rank in one all-reduce.
    const bool time_due = lead_ && config_.checkpoint_minutes > 0 &&
                          Clock::now() - last_checkpoint_ >= std::chrono::minutes(config_.checkpoint_minutes);
    // A background evaluation's sums travel here too; they count once every rank has its own.
    const bool eval_ready = eval_task_ && eval_task_->is_completed();
    std::array<double, 8> agreed{reports_loss_ ? loss_sum / layout_.micro_batches : 0.0, time_due ? 1.0 : 0.0,
                                 grad_squares(), step_joules, energy_.available() ? 1.0 : 0.0,
                                 eval_ready ? 1.0 : 0.0, eval_ready ? eval_.sums[0] : 0.0, eval_ready ? eval_.sums[1] : 0.0};
    if (world_.size() > 1) world_.all_reduce(std::span<double>(agreed))->wait();
    if (eval_task_ && agreed[5] == world_.size()) report_eval(std::array<double, 2>{agreed[6], agreed[7]});
    const double loss = agreed[0] / layout_.mesh.dp, norm = std::sqrt(agreed[2]);
    step_joules_ = agreed[4] == world_.size() ? agreed[3] : -1.0;  // every rank's counter, or none
    const float lr = schedule_.at(step);
    Outcome out{!std::isfinite(loss) || !std::isfinite(norm), agreed[1] > 0};
    if (!out.bad) {
      const trace::Scope span("optimizer", trace::cat::compute);
      replica_->step(lr, optim::clip_scale(norm, config_.grad_clip));
      bad_in_row_ = 0;
      state_.last_loss = loss;
    } else {
      ++result_.skipped_steps;
      progress_->line() << "step " << step + 1 << ": non-finite " << (std::isfinite(loss) ? "gradient" : "loss")
                        << ", update skipped (" << ++bad_in_row_ << " in a row)\n" << std::flush;
    }
    if (layout_.mesh.pp > 1) bubbles_.push_back(pipeline_.last_timeline().bubble_fraction());
    for (const parallel::Span& span : pipeline_.last_timeline().spans)
      if (span.kind == parallel::Span::Kind::forward || span.kind == parallel::Span::Kind::backward)
        compute_seconds_ += span.end - span.begin;
    ++compute_steps_;
    state_.step = step + 1;
    state_.data_position = step + 1;
    log_step(loss, lr, norm, out.bad, std::chrono::duration<double>(Clock::now() - t0).count());
    return out;
  }

  double read_energy_since_last() {
    const trace::Scope span("energy counter", trace::cat::host);
    const double now = energy_.joules(), since = now - last_joules_;
    last_joules_ = now;
    return since;
  }
  double grad_squares() {
    const trace::Scope span("gradient norm", trace::cat::compute);
    return replica_->grad_squares([&](const std::string& name) { return counted(name); });
  }

  // Stragglers: every rank's mean forward + backward time per step since the last comparison,
  // measured before the collectives that would hide it, against the median; slow ranks are named.
  void compare_ranks() {
    const double mine = compute_steps_ > 0 ? compute_seconds_ / compute_steps_ : 0.0;
    compute_seconds_ = 0.0;
    const int steps = std::exchange(compute_steps_, 0);
    if (world_.size() == 1) return;
    std::vector<double> all(size_t(world_.size()));
    world_.all_gather(std::span<const double>(&mine, 1), std::span<double>(all), std::vector<int64_t>(all.size(), 1))
        ->wait();
    // Ranks of different pipeline stages do different work: compare each rank with its stage's.
    for (int stage = 0; stage < layout_.mesh.pp; ++stage) {
      std::vector<std::pair<double, int>> peers;
      for (int r = 0; r < world_.size(); ++r)
        if (parallel::mesh_coord(layout_.mesh, r).pp == stage) peers.emplace_back(all[size_t(r)], r);
      if (peers.size() < 2) continue;
      std::vector<std::pair<double, int>> sorted = peers;
      std::sort(sorted.begin(), sorted.end());
      const size_t n = sorted.size();
      const double median = n % 2 ? sorted[n / 2].first : 0.5 * (sorted[n / 2 - 1].first + sorted[n / 2].first);
      for (const auto& [seconds, r] : peers) {
        if (median <= 0 || seconds <= median * (1.0 + config_.straggler_threshold)) continue;
        char text[200];
        std::snprintf(text, sizeof text, "straggler: rank %d computed %.1f ms per step over the last %d steps, %.0f%% "
                      "above the median %.1f ms of its %zu peers", r, seconds * 1e3, steps,
                      100.0 * (seconds / median - 1.0), median * 1e3, peers.size());
        progress_->line() << text << "\n" << std::flush;
        if (lead_)
          metrics_ << nlohmann::json{{"step", state_.step}, {"straggler_rank", r}, {"compute_ms", seconds * 1e3},
                                     {"median_ms", median * 1e3}}.dump() << "\n" << std::flush;
      }
    }
  }

  // Every rank's events, gathered to rank 0, which writes the file (--trace).
  void write_trace() {
    trace::stop();
    char name[96];
    std::snprintf(name, sizeof name, "rank %d (dp %d, pp %d, tp %d)", world_.rank(), coord_.dp, coord_.pp, coord_.tp);
    const std::string mine = trace::take_events(world_.rank(), name);
    const int64_t size = int64_t(mine.size());
    std::vector<int64_t> sizes(size_t(world_.size()));
    world_.all_gather(std::span<const int64_t>(&size, 1), std::span<int64_t>(sizes), std::vector<int64_t>(sizes.size(), 1))
        ->wait();
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    std::vector<uint8_t> all(static_cast<size_t>(total));
    world_.all_gather(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(mine.data()), mine.size()),
                      std::span<uint8_t>(all), sizes)->wait();
    if (!lead_) return;
    std::string doc = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
    int64_t offset = 0;
    for (size_t r = 0; r < sizes.size(); ++r) {
      if (r > 0) doc += ",\n";
      doc.append(reinterpret_cast<const char*>(all.data()) + offset, size_t(sizes[r]));
      offset += sizes[r];
    }
    doc += "\n]}\n";
    ckpt::write_file_atomic(options_.trace, doc);
    progress_->line() << "trace of " << world_.size() << " rank(s) written to " << options_.trace
                      << " (summary: tutti inspect trace " << options_.trace << ")\n" << std::flush;
  }

  // The groups that carry device tensors: NCCL's for GPUs of several ranks, else the world's.
  parallel::Mesh& dmesh() { return device_mesh_ ? *device_mesh_ : mesh_; }

  // Whether this rank counts parameter `name` in the global gradient norm: tensor-parallel shards
  // on every rank, replicated tensors on tp rank 0, the tied wte on the first stage only.
  bool counted(const std::string& name) const {
    if (name == "wte.weight" && !pipeline_.first()) return false;
    return coord_.tp == 0 || !nn::GPT::split_of(name).replicated();
  }

  // Mean loss of `config.eval_batches` fixed batches, spread over the replicas, each through the
  // pipeline in one micro-batch.
  double evaluate_split(data::Split split) {
    double total = 0.0;
    for (int i = coord_.dp; i < config_.eval_batches; i += layout_.mesh.dp) {
      data::Batch b = dataset_.batch(split, config_.batch, static_cast<uint64_t>(config_.seed) ^ kEvalStream,
                                     static_cast<uint64_t>(i));
      const double loss = eval_pipeline_.forward_only(
          [&](int, const Tensor& input) {
            return model_.forward_part(eval_pipeline_.first() ? b.inputs.to(device_) : input, b.targets.to(device_));
          },
          1);
      if (reports_loss_) total += loss;
    }
    if (world_.size() > 1) world_.all_reduce(std::span<double>(&total, 1))->wait();
    return total / config_.eval_batches;
  }

  void log_step(double loss, float lr, double norm, bool bad, double secs) {
    step_seconds_.push_back(secs);
    const double rate = double(tokens_per_step_) / secs;
    tokens_per_second_ = tokens_per_second_ == 0.0 ? rate : 0.9 * tokens_per_second_ + 0.1 * rate;
    if (lead_) {
      char loss_text[32];
      std::snprintf(loss_text, sizeof loss_text, "%.9g", loss);
      metrics_ << "{\"step\":" << state_.step << ",\"loss\":" << (bad ? "null" : loss_text) << ",\"lr\":" << lr
               << ",\"grad_norm\":" << (std::isfinite(norm) ? norm : -1.0) << ",\"ms\":" << secs * 1e3;
      metrics_ << ",\"data_wait_ms\":" << loader_.last_wait_seconds() * 1e3;
      if (step_joules_ >= 0) metrics_ << ",\"joules\":" << step_joules_ << ",\"watts\":" << step_joules_ / secs;
      metrics_ << (bad ? ",\"skipped\":true" : "") << "}\n" << std::flush;  // a killed run keeps every line
    }
    progress_->step(state_.step, loss, lr, tokens_per_second_);
  }

  // ---- evaluation ---------------------------------------------------------------------------
  // A model whole on every rank (pp = tp = 1, on the CPU) is evaluated on a snapshot of its
  // weights as a task: in the background under the concurrent workflow, while training goes on.
  // Each replica evaluates its share of the batches; the sums meet in a later step's all-reduce,
  // and the result is reported against the step whose weights it used. Other layouts evaluate
  // through the pipeline, in turn. With --eval-rank, that rank evaluates every layout's snapshots.
  bool eval_on_snapshot() const { return layout_.mesh.pp == 1 && layout_.mesh.tp == 1 && device_.is_cpu(); }

  void evaluate_and_log() {
    if (config_.eval_rank >= 0) {  // the evaluating rank's: every rank gathers, the lead sends
      NamedTensors weights = !model_.whole() ? gather_whole(mesh_, local_weights(), config_.model(), {""})
                                             : lead_ ? local_weights() : NamedTensors{};
      if (!lead_) return;
      if (eval_client_->pending()) report_eval(eval_client_->wait());
      eval_client_->send(state_.step, std::move(weights));
      return;
    }
    if (!eval_on_snapshot()) {
      const auto t0 = Clock::now();
      const trace::Scope span("eval step " + std::to_string(state_.step), trace::cat::eval);
      const double train = evaluate_split(data::Split::train), val = evaluate_split(data::Split::val);
      log_eval(state_.step, train, val, std::chrono::duration<double>(Clock::now() - t0).count(), "");
      return;
    }
    finish_eval();  // one evaluation at a time
    if (!snapshot_) snapshot_ = std::make_unique<nn::GPT>(config_.model());
    auto mine = model_.named_parameters(), copy = snapshot_->named_parameters();
    for (size_t i = 0; i < mine.size(); ++i) copy[i].second.copy_(mine[i].second);
    eval_step_ = state_.step;
    // Beside training only on cores its kernels leave free: where the team has every core, the
    // evaluation would take cores from it, and measured slower that way than in turn with the
    // whole team (docs/tasks.md).
    const int spare = cores_per_rank() - train_threads_;
    eval_task_ = tasks_.run(
        "eval step " + std::to_string(state_.step), trace::cat::eval, spare > 0 ? spare : train_threads_,
        [this] { eval_ = evaluate_share(*snapshot_, dataset_, config_, eval_step_, coord_.dp, layout_.mesh.dp, lead_); },
        spare > 0);
  }

  // Waits for the evaluation in flight and reports it (a collective: every rank has one pending).
  void finish_eval() {
    if (eval_client_ && eval_client_->pending()) report_eval(eval_client_->wait());
    if (!eval_task_) return;
    const trace::Scope span("eval wait", trace::cat::eval, !eval_task_->is_completed());
    eval_task_->wait();
    std::array<double, 2> sums = eval_.sums;
    if (world_.size() > 1) world_.all_reduce(std::span<double>(sums))->wait();
    report_eval(sums);
  }

  void report_eval(const EvalReport& r) { log_eval(r.step, r.train_loss, r.val_loss, r.seconds, r.sample); }

  void report_eval(const std::array<double, 2>& sums) {
    eval_task_->wait();  // rethrows what the evaluation threw
    eval_task_ = nullptr;
    log_eval(eval_step_, sums[0] / config_.eval_batches, sums[1] / config_.eval_batches, eval_.seconds, eval_.sample);
  }

  void log_eval(int64_t step, double train, double val, double seconds, const std::string& sample) {
    result_.train_loss = train;
    result_.val_loss = val;
    char line[160];
    std::snprintf(line, sizeof line, "step %lld: train loss %.4f, val loss %.4f (eval %.1fs%s)",
                  static_cast<long long>(step), train, val, seconds,
                  step != state_.step ? (", reported at step " + std::to_string(state_.step)).c_str() : "");
    progress_->line() << line << "\n" << std::flush;
    if (!lead_) return;
    nlohmann::json j{{"step", step}, {"train_loss", train}, {"val_loss", val}, {"eval_seconds", seconds}};
    if (step != state_.step) j["reported_at_step"] = state_.step;
    if (!sample.empty()) j["sample"] = sample;
    metrics_ << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n" << std::flush;  // bytes
    plot();
  }

  // The run's curves so far, <out>/plot.svg (rank 0); a plot that fails does not stop training.
  void plot() {
    if (!lead_) return;
    try {
      plot_run(config_.out);
    } catch (const std::exception& e) {
      progress_->line() << "tutti: warning: no plot: " << e.what() << "\n" << std::flush;
    }
  }

  // This rank's micro-batches of `step` (each rank loads its own slice: no broadcast).
  std::vector<data::Batch> step_batches(int64_t step) const {
    std::vector<data::Batch> out;
    for (int m = 0; m < layout_.micro_batches; ++m) {
      const int64_t first = int64_t{coord_.dp} * layout_.per_rank + int64_t{m} * layout_.micro;
      out.push_back(dataset_.batch(data::Split::train, static_cast<uint64_t>(config_.seed), static_cast<uint64_t>(step),
                                   first, layout_.micro));
    }
    return out;
  }

  // This rank's weights, CPU copies under single-process names.
  NamedTensors local_weights() {
    NamedTensors weights = model_.named_parameters();
    for (auto& [name, t] : weights) t = t.to(Device::cpu()).clone();
    return weights;
  }

  // Every stage's writer (dp 0, tp 0) gathers its stage's whole tensors and writes them in the
  // background, all stages at once into one directory; rank 0 commits it when every shard is in.
  void checkpoint() {
    const trace::Scope span("checkpoint " + std::to_string(state_.step), trace::cat::checkpoint);
    NamedTensors moments = replica_->optimizer_state();  // gathered from the ZeRO shards: collective
    for (auto& [name, t] : moments) t = t.to(Device::cpu());
    NamedTensors weights = gather_stage(mesh_, local_weights(), {""});
    moments = gather_stage(mesh_, moments, kMoments);
    const parallel::MeshShape& m = layout_.mesh;
    if (m.pp > 1) {
      if (pipeline_.last()) drop_tied_copy(weights, moments);  // stage 0 writes wte
      if (writer_) writer_->wait();  // this stage's previous shard is written (rank 0: committed)
      if (lead_) prepare_sharded_save(config_.out, state_.step);
      world_.barrier()->wait();
    }
    if (writer_) {
      CheckpointSnapshot snap{config_.model(), std::move(weights), std::move(moments), replica_->steps_taken(), state_,
                              {m.dp, m.pp, m.tp, m.dp > 1 ? config_.zero : 0, world_.size()}};
      snap.shard = coord_.pp;
      snap.shards = m.pp;
      snap.shard_wait_seconds = std::max(600, config_.comm_timeout);
      writer_->submit(std::move(snap));
    }
    if (lead_) {
      progress_->line() << "checkpoint of step " << state_.step << (tasks_.background() ? " (written in the background)\n" : "\n") << std::flush;
      log_checkpoint_timing();
    }
    last_checkpoint_ = Clock::now();
  }

  static void drop_tied_copy(NamedTensors& weights, NamedTensors& moments) {
    auto tied = [](const auto& named) { return named.first.rfind("wte.weight", 0) == 0; };
    std::erase_if(weights, tied);
    std::erase_if(moments, tied);
  }

  // The cost of the last background write, once, in metrics.jsonl.
  void log_checkpoint_timing() {
    const CheckpointWriter::Timing t = writer_->last_timing();
    if (t.step < 0 || t.step == logged_checkpoint_) return;
    logged_checkpoint_ = t.step;
    metrics_ << nlohmann::json{{"checkpoint_step", t.step}, {"bytes", t.bytes}, {"seconds", t.seconds}}.dump() << "\n"
             << std::flush;
  }

  // After max_bad_steps non-finite steps in a row: back to the newest checkpoint, on every rank.
  void roll_back() {
    if (writer_) writer_->wait();
    if (world_.size() > 1) world_.barrier()->wait();
    const std::string dir = pick_checkpoint();
    LoadedCheckpoint back = load_checkpoint(dir, model_);
    check_ranks_agree(back.manifest);
    replica_->load_optimizer_state(shards_of(back.optimizer_state, model_, kMoments), back.optimizer_steps);
    progress_->line() << "rolled back to " << dir << " (step " << back.state.step << ") after " << bad_in_row_
                      << " non-finite steps in a row\n" << std::flush;
    ++result_.rollbacks;
    TUTTI_CHECK(result_.rollbacks <= config_.max_bad_steps, "still non-finite after ", result_.rollbacks,
                " rollbacks at step ", state_.step, "; lower the learning rate");
    state_ = back.state;
    state_.data_path = config_.data;
    bad_in_row_ = 0;
  }

  // Every rank must have loaded the same checkpoint (a file system that differs between hosts,
  // or a checkpoint damaged on one of them, would otherwise train on different weights): the
  // step and a digest of the manifest (layout, config hash, every file's checksum) must agree.
  void check_ranks_agree(const ckpt::Manifest& manifest) {
    if (world_.size() == 1) return;
    const int64_t mine[2] = {manifest.step, int64_t(ckpt::xxh3_64(ckpt::format_manifest(manifest)))};
    std::vector<int64_t> all(2 * size_t(world_.size()));
    world_.all_gather(std::span<const int64_t>(mine, 2), std::span<int64_t>(all),
                      std::vector<int64_t>(size_t(world_.size()), 2))->wait();
    for (size_t r = 1; r < size_t(world_.size()); ++r) {
      TUTTI_CHECK_AS(CheckpointError, all[2 * r] == all[0], "ranks resumed from different checkpoints: rank 0 at step ",
                     all[0], ", rank ", r, " at step ", all[2 * r]);
      TUTTI_CHECK_AS(CheckpointError, all[2 * r + 1] == all[1], "ranks loaded different checkpoints of step ", all[0],
                     ": the manifest read by rank ", r, " differs from rank 0's (a file system that differs between "
                     "hosts?)");
    }
  }

  // The newest good checkpoint of the run; a note on damaged newer ones is logged once (rank 0).
  std::string pick_checkpoint() {
    CheckpointChoice choice = choose_checkpoint(config_.out);
    if (!choice.note.empty() && lead_) std::cerr << "tutti: warning: " << choice.note << "\n" << std::flush;
    return choice.dir;
  }

  void print_header() {
    log_ << "tutti train: " << config_.model().num_parameters() << " parameters (" << config_.layers << " layers, "
         << config_.heads << " heads, dim " << config_.dim << ", context " << config_.context << "), "
         << tokens_per_step_ << " tokens/step, " << (device_.is_cpu() ? std::to_string(num_threads()) + " threads"
                                                       : device_.str()) << ", data " << config_.data << " ("
         << dataset_.tokens(data::Split::train) << " train / " << dataset_.tokens(data::Split::val)
         << " val tokens), out " << config_.out << "\n";
    if (world_.size() == 1 && layout_.micro_batches == 1) return;
    const parallel::MeshShape& m = layout_.mesh;
    const parallel::MemoryReport mem = replica_->memory();
    log_ << "mesh dp " << m.dp << " x pp " << m.pp << " x tp " << m.tp << " (" << world_.backend()
         << (nccl_ ? "; device tensors over nccl" : "") << "), zero "
         << (m.dp > 1 ? config_.zero : 0) << ", " << layout_.per_rank << " sequences per replica in "
         << layout_.micro_batches << " micro-batch(es) of " << layout_.micro;
    if (m.pp > 1)
      log_ << ", schedule " << parallel::schedule_name(layout_.schedule) << " (predicted bubble "
           << int(100 * parallel::predicted_bubble(m.pp, layout_.micro_batches) + 0.5) << "%)";
    log_ << ", " << replica_->num_buckets() << " gradient bucket(s) of up to " << config_.bucket_mib
         << " MiB; rank 0: parameters " << mib(mem.parameter_bytes) << ", gradients " << mib(mem.gradient_bytes)
         << ", optimizer state " << mib(mem.optimizer_bytes) << "\n";
    for (const std::string& line : gather_lines(describe_part(layout_, config_.model(), world_.rank(), coord_)))
      log_ << "  " << line << "\n";
    if (!layout_.warning.empty()) log_ << "tutti: warning: " << layout_.warning << "\n";
  }

  // Every rank's line, in rank order, on rank 0.
  std::vector<std::string> gather_lines(const std::string& mine) {
    constexpr size_t kWidth = 256;
    std::vector<uint8_t> padded(kWidth, 0), all(kWidth * size_t(world_.size()));
    std::memcpy(padded.data(), mine.data(), std::min(mine.size(), kWidth - 1));
    world_.all_gather(std::span<const uint8_t>(padded), std::span<uint8_t>(all),
                      std::vector<int64_t>(size_t(world_.size()), int64_t(kWidth)))->wait();
    std::vector<std::string> out;
    for (int r = 0; r < world_.size(); ++r) out.emplace_back(reinterpret_cast<const char*>(all.data() + size_t(r) * kWidth));
    return out;
  }

  // The run's energy over every rank, from the hardware's counters, or why there is none: no
  // estimate stands in for a missing counter.
  void print_energy(double mine, double seconds) {
    std::array<double, 2> sum{mine, energy_.available() ? 1.0 : 0.0};
    if (world_.size() > 1) world_.all_reduce(std::span<double>(sum))->wait();
    const int64_t tokens = tokens_per_step_ * int64_t(step_seconds_.size());
    if (sum[1] < world_.size() || tokens == 0) {
      result_.energy_joules = -1.0;
      progress_->line() << "energy: not measured (" << (energy_.available() ? "a rank has no counter" : energy_.source())
                        << ")\n";
      return;
    }
    result_.energy_joules = sum[0];
    char text[200];
    std::snprintf(text, sizeof text, "energy: %.1f J over the run (%.4f J/token, average %.1f W; %s%s)", sum[0],
                  sum[0] / double(tokens), seconds > 0 ? sum[0] / seconds : 0.0, energy_.source().c_str(),
                  world_.size() > 1 ? ", summed over the ranks" : "");
    progress_->line() << text << "\n";
    if (lead_)
      metrics_ << nlohmann::json{{"energy_joules", sum[0]}, {"joules_per_token", sum[0] / double(tokens)},
                                 {"average_watts", seconds > 0 ? sum[0] / seconds : 0.0}}.dump() << "\n" << std::flush;
  }

  // Each rank's peak tensor memory and, under pipeline parallelism, the measured bubble next to
  // the prediction.
  void print_parallel_summary() {
    const int64_t peak = allocator_stats(device_).peak_bytes_in_use;
    std::vector<int64_t> peaks(size_t(world_.size()));
    world_.all_gather(std::span<const int64_t>(&peak, 1), std::span<int64_t>(peaks),
                      std::vector<int64_t>(peaks.size(), 1))->wait();
    std::string line = std::string("peak tensor memory") + (device_.is_cuda() ? " on the GPU" : "") +
                       (world_.size() == 1 ? ":" : " per rank:");
    for (int64_t p : peaks) line += " " + mib(p);
    progress_->line() << line << "\n";
    if (!bubbles_.empty()) {
      std::vector<double> b = bubbles_;
      std::nth_element(b.begin(), b.begin() + std::ptrdiff_t(b.size() / 2), b.end());
      char text[160];
      std::snprintf(text, sizeof text, "pipeline bubble (stage 0, median of %zu steps): %.1f%% measured, %.1f%% predicted "
                    "by (p - 1) / (m + p - 1)", b.size(), 100 * b[b.size() / 2],
                    100 * parallel::predicted_bubble(layout_.mesh.pp, layout_.micro_batches));
      progress_->line() << text << "\n" << std::flush;
    }
  }

  // The sample at the end, on rank 0, from the whole model (gathered under model parallelism).
  void print_sample() {
    std::unique_ptr<nn::GPT> gathered;
    if (!model_.whole()) {
      NamedTensors weights = gather_whole(mesh_, local_weights(), config_.model(), {""});
      if (!lead_) return;
      gathered = std::make_unique<nn::GPT>(config_.model());
      auto params = gathered->named_parameters();
      for (size_t i = 0; i < params.size(); ++i) params[i].second.copy_(weights[i].second);
    }
    if (!lead_) return;
    nn::SampleOptions sample;
    sample.max_tokens = config_.sample_tokens;
    sample.temperature = 0.8f;
    sample.seed = state_.sample_rng_state;
    result_.sample = bytes_to_text(nn::generate(gathered ? *gathered : model_, {'\n'}, sample));
    progress_->line() << "--- sample (" << config_.sample_tokens << " bytes, temperature 0.8) ---\n"
                      << result_.sample << "\n---\n" << std::flush;
  }

  const TrainConfig& config_;
  const TrainOptions& options_;
  comm::Communicator& world_;
  const Layout layout_;
  parallel::Mesh mesh_;
  const parallel::MeshCoord coord_;
  const bool lead_;
  std::ostream null_stream_{nullptr};
  std::ostream& log_;
  data::TokenDataset dataset_;
  Tasks tasks_;  // before everything that runs on it, so it is destroyed after them
  BatchLoader loader_;
  const Device device_;
  std::unique_ptr<comm::Communicator> nccl_;     // GPUs of several ranks: the world over NCCL
  std::unique_ptr<parallel::Mesh> device_mesh_;  // its groups, for device tensors
  EnergyMeter energy_;                           // this rank's device's counter, when it has one
  nn::GPT model_;
  parallel::Pipeline pipeline_, eval_pipeline_;
  std::unique_ptr<comm::Communicator> tied_;  // pp > 1: the stages holding a copy of wte
  const bool reports_loss_;                   // the last stage's tp rank 0 reports the loss
  std::vector<double> bubbles_;               // stage's measured bubble per step (pp > 1)
  std::unique_ptr<parallel::DataParallel> replica_;
  const optim::LrSchedule schedule_;
  const int64_t tokens_per_step_;
  Heartbeat heartbeat_;
  std::set<int64_t> inject_nan_;  // fault injection (tests): steps whose loss becomes NaN, once each
  const int inject_slow_ms_;      // fault injection (tests): this rank sleeps so long in each forward
  double compute_seconds_ = 0.0;  // this rank's forward + backward time since the last comparison
  int compute_steps_ = 0;
  TrainerState state_;
  TrainResult result_;
  std::ofstream metrics_;
  std::unique_ptr<CheckpointWriter> writer_;  // a stage's dp 0, tp 0 rank writes its shard in the background
  Progress* progress_ = nullptr;
  std::unique_ptr<EvalRankClient> eval_client_;  // --eval-rank, on the lead
  int64_t eval_step_ = 0;             // whose weights the evaluation in flight has
  EvalShare eval_;                    // its result: this replica's share
  std::shared_ptr<Task> eval_task_;   // the evaluation not yet reported
  const int train_threads_ = num_threads();  // the kernels' team (--threads), set before the members
  std::unique_ptr<nn::GPT> snapshot_;  // the weights it evaluates
  Clock::time_point last_checkpoint_;
  int bad_in_row_ = 0;
  int64_t logged_checkpoint_ = -1;
  double tokens_per_second_ = 0.0;  // smoothed, for the progress line
  std::vector<double> step_seconds_;  // of this run's steps, for the median
  double step_joules_ = -1.0;         // the last step's energy over every rank (-1: not measured)
  double last_joules_ = 0.0;          // this rank's counter at its last read (once a step)
};

}  // namespace

TrainResult run_training(const TrainConfig& config, const TrainOptions& options) {
  config.validate();
  std::unique_ptr<comm::Communicator> own_world;
  if (!options.world) own_world = comm::make_local();
  comm::Communicator& world = options.world ? *options.world : *own_world;
  world.set_timeout(std::chrono::seconds(config.comm_timeout));
  TUTTI_CHECK_AS(ConfigError, config.eval_rank < world.size(), "eval rank ", config.eval_rank,
                 " is outside the launch of ", world.size(), " rank(s): launch one rank more than training needs "
                 "and name one of them (mpirun -np N+1 ... --eval-rank N)");
  TUTTI_CHECK_AS(ConfigError, config.eval_rank < 0 || world.size() >= 2, "--eval-rank needs a training rank besides it");
  const bool evaluates = config.eval_rank == world.rank();
  const int trainers = world.size() - (config.eval_rank >= 0 ? 1 : 0);
  plan_layout(config, trainers);  // settings errors before any collective or allocation
  const Device device = config.compute_device();
  if (device.is_cuda() && !evaluates) {
    TUTTI_CHECK_AS(ConfigError, device_available(device), "--device ", config.device, ": ",
                   device_available(Device::cuda(0)) ? "no such GPU on this machine"
                                                     : "no CUDA GPU here, or tutti was built without CUDA (cmake -DTUTTI_CUDA=ON)",
                   "; use --device cpu");
    if (trainers > 1) {
      TUTTI_CHECK_AS(ConfigError, config.device == "cuda", "--device ", config.device, " names one GPU for ",
                     trainers, " ranks; use --device cuda (one GPU per rank, by its local rank)");
      TUTTI_CHECK_AS(ConfigError, comm::nccl_available(), "--device cuda with ", trainers,
                     " ranks needs NCCL, and this build has none (cmake -DTUTTI_NCCL_ROOT=...)");
      const Device mine = run_device(config, world);
      TUTTI_CHECK_AS(ConfigError, device_available(mine), "rank ", world.rank(), " would train on ", mine.str(),
                     ", which this machine does not have: launch at most one rank per GPU");
    }
  }
  if (!options.trace.empty()) check_trace_path(options.trace);
  check_same_config(world, config);
  if (config.eval_rank < 0) return Run(config, options, world, world).train();
  const std::unique_ptr<comm::Communicator> training = world.split(evaluates ? 1 : 0, world.rank());
  if (evaluates) {
    serve_evaluations(config, world, config.eval_rank == 0 ? 1 : 0);  // the lead: training rank 0
    return TrainResult{};
  }
  return Run(config, options, *training, world).train();
}

}  // namespace tutti::train
