#include "train/eval_rank.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "train/run_support.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/core/trace.hpp"

namespace tutti::train {
namespace {

using Clock = std::chrono::steady_clock;

// Tags of the lead <-> evaluating rank messages.
enum Tag : int { kHeader = 7101, kWeights = 7102, kReport = 7103, kSample = 7104 };
constexpr size_t kSampleBytes = 256;  // samples are at most 200 bytes
constexpr comm::Millis kForever = std::chrono::hours(24 * 365);

}  // namespace

double eval_loss_sum(const nn::GPT& model, const data::TokenDataset& data, data::Split split, int batches,
                     int batch_size, int64_t seed, int first, int stride) {
  NoGradGuard no_grad;
  double total = 0.0;
  for (int i = first; i < batches; i += stride) {
    data::Batch b = data.batch(split, batch_size, static_cast<uint64_t>(seed) ^ kEvalStream, static_cast<uint64_t>(i));
    total += model.loss(b.inputs, b.targets).item();
  }
  return total;
}

EvalShare evaluate_share(const nn::GPT& model, const data::TokenDataset& data, const TrainConfig& config,
                         int64_t step, int replica, int replicas, bool sample) {
  const auto t0 = Clock::now();
  EvalShare out;
  for (data::Split split : {data::Split::train, data::Split::val})
    out.sums[split == data::Split::train ? 0 : 1] =
        eval_loss_sum(model, data, split, config.eval_batches, config.batch, config.seed, replica, replicas);
  if (sample && config.sample_tokens > 0 && !data.synthetic()) {
    nn::SampleOptions options;
    options.max_tokens = std::min(config.sample_tokens, 200);
    options.temperature = 0.8f;
    options.seed = static_cast<uint64_t>(config.seed) ^ static_cast<uint64_t>(step);
    out.sample = bytes_to_text(nn::generate(model, {'\n'}, options));
  }
  out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return out;
}

// ---- the lead's side ----------------------------------------------------------------------------

struct EvalRankClient::Impl {
  comm::Communicator& world;
  int peer;
  int64_t header[2] = {0, 0};  // step (-1: stop), tensors
  NamedTensors weights;         // kept until their sends complete
  std::vector<comm::WorkHandle> sends;
  double report[5] = {};        // step, train loss, val loss, seconds, sample bytes
  uint8_t sample[kSampleBytes] = {};
  comm::WorkHandle report_recv, sample_recv;

  void finish_sends() {
    for (auto& w : sends) w->wait(kForever);
    sends.clear();
    weights.clear();
  }
};

EvalRankClient::EvalRankClient(comm::Communicator& world, int eval_rank)
    : impl_(std::make_unique<Impl>(Impl{world, eval_rank})) {}

EvalRankClient::~EvalRankClient() {
  try {
    if (pending_) wait();
    impl_->finish_sends();
    impl_->header[0] = -1;
    impl_->world.send(std::span<const int64_t>(impl_->header, 2), impl_->peer, kHeader)->wait(kForever);
  } catch (...) {  // the run already failed; the launcher ends the evaluating rank
  }
}

void EvalRankClient::send(int64_t step, NamedTensors weights) {
  Impl& c = *impl_;
  c.finish_sends();
  c.weights = std::move(weights);
  c.header[0] = step;
  c.header[1] = int64_t(c.weights.size());
  c.sends.push_back(c.world.send(std::span<const int64_t>(c.header, 2), c.peer, kHeader));
  for (const auto& [name, t] : c.weights)
    c.sends.push_back(c.world.send(std::span<const float>(t.data<float>(), size_t(t.numel())), c.peer, kWeights));
  c.report_recv = c.world.recv(std::span<double>(c.report, 5), c.peer, kReport);
  c.sample_recv = c.world.recv(std::span<uint8_t>(c.sample, kSampleBytes), c.peer, kSample);
  pending_ = true;
}

std::optional<EvalReport> EvalRankClient::poll() {
  if (!pending_ || !impl_->report_recv->is_completed() || !impl_->sample_recv->is_completed()) return std::nullopt;
  return wait();
}

EvalReport EvalRankClient::wait() {
  Impl& c = *impl_;
  {
    const trace::Scope span("eval rank wait", trace::cat::eval, !c.report_recv->is_completed());
    c.report_recv->wait(kForever);
    c.sample_recv->wait(kForever);
  }
  pending_ = false;
  const size_t bytes = std::min(kSampleBytes, size_t(c.report[4]));
  return {int64_t(c.report[0]), c.report[1], c.report[2], c.report[3], std::string(reinterpret_cast<const char*>(c.sample), bytes)};
}

// ---- the evaluating rank ------------------------------------------------------------------------

void serve_evaluations(const TrainConfig& config, comm::Communicator& world, int lead) {
  set_num_threads(config.threads > 0 ? config.threads : hardware_threads());
  const data::TokenDataset data(config.data, config.context, 0.1, config.vocab);
  nn::GPT model(config.model());
  auto params = model.named_parameters();
  for (;;) {
    int64_t header[2];
    world.recv(std::span<int64_t>(header, 2), lead, kHeader)->wait(kForever);
    if (header[0] < 0) return;
    TUTTI_CHECK_AS(CommError, header[1] == int64_t(params.size()), "the evaluating rank expected ", params.size(),
                   " tensors, the lead sends ", header[1]);
    for (auto& [name, t] : params)
      world.recv(std::span<float>(t.data<float>(), size_t(t.numel())), lead, kWeights)->wait(kForever);
    const EvalShare share = evaluate_share(model, data, config, header[0], 0, 1, true);
    double report[5] = {double(header[0]), share.sums[0] / config.eval_batches, share.sums[1] / config.eval_batches,
                        share.seconds, double(std::min(kSampleBytes, share.sample.size()))};
    uint8_t sample[kSampleBytes] = {};
    std::memcpy(sample, share.sample.data(), size_t(report[4]));
    world.send(std::span<const double>(report, 5), lead, kReport)->wait(kForever);
    world.send(std::span<const uint8_t>(sample, kSampleBytes), lead, kSample)->wait(kForever);
  }
}

}  // namespace tutti::train
