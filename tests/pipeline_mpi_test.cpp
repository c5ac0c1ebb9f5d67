// Pipeline schedules under a real launcher: `mpirun -np N pipeline_mpi_test` (CTest runs N = 2, 3, 4).
// Every rank runs the whole suite. Each rank builds the whole toy model from one seed, so it also
// computes the single-process reference by itself, without communication. Only rank 0 prints the
// usual gtest output and the measured bubbles; other ranks print their failures, and the exit code
// is the worst over all ranks. Letters: p stages, s this stage, M micro-batches, N rows of a
// micro-batch, C channels.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "mpi_test_main.hpp"
#include "test_util.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/nn/module.hpp"
#include "tutti/ops/ops.hpp"
#include "tutti/parallel/pipeline.hpp"

namespace tutti {
namespace {

using parallel::Pipeline;
using parallel::Schedule;
using parallel::Span;
using Millis = std::chrono::milliseconds;

comm::Communicator* g_world = nullptr;
comm::Communicator& world() { return *g_world; }

using test::message_of;

// The groups a pipeline runs on: the world, a world of one (no communication), and the world
// split in two by rank parity (so group ranks differ from world ranks).
struct Groups {
  std::unique_ptr<comm::Communicator> local = comm::make_local();
  std::unique_ptr<comm::Communicator> halves = world().split(world().rank() % 2, world().rank());
  std::vector<std::pair<const char*, comm::Communicator*>> all() {
    return {{"world", &world()}, {"local", local.get()}, {"halves", halves.get()}};
  }
};

// 1, 2, p and 2p + 1 micro-batches (fewer than the stages included).
std::vector<int> micro_counts(int stages) {
  std::set<int> counts{1, 2, stages, 2 * stages + 1};
  return {counts.begin(), counts.end()};
}

// Runs check(group, schedule, m) for every group, both schedules and every micro-batch count,
// each under a trace naming the case.
template <class Check>
void for_each_case(Check check) {
  Groups groups;
  for (auto [name, group] : groups.all())
    for (Schedule schedule : {Schedule::gpipe, Schedule::one_f_one_b})
      for (int m : micro_counts(group->size())) {
        SCOPED_TRACE(testing::Message() << name << " group of " << group->size() << ", "
                                        << parallel::schedule_name(schedule) << ", M = " << m);
        check(*group, schedule, m);
      }
}

// ---- the toy model: a chain of Linear + gelu layers, two per stage -----------------------------

constexpr int64_t kRows = 3, kWidth = 5;  // N, C
constexpr int kLayersPerStage = 2;
constexpr uint64_t kSeed = 20240611;

struct Chain {
  std::vector<std::unique_ptr<nn::Linear>> layers;

  explicit Chain(int n) {
    Rng rng(kSeed);
    for (int i = 0; i < n; ++i) {
      auto layer = std::make_unique<nn::Linear>(kWidth, kWidth);
      nn::normal_(layer->weight, 0.6f, rng);
      nn::normal_(layer->bias, 0.2f, rng);
      layers.push_back(std::move(layer));
    }
  }
  // Layers [begin, end) on x (N, C); gelu after each but the chain's last.
  Tensor run(Tensor x, int begin, int end) const {
    for (int i = begin; i < end; ++i) {
      x = layers[size_t(i)]->forward(x);
      if (i + 1 < int(layers.size())) x = ops::gelu(x);
    }
    return x;
  }
  void zero_grad() {
    for (auto& l : layers) l->zero_grad();
  }
  // Layer i's gradients: weight then bias.
  std::vector<std::vector<float>> grads(int i) const {
    return {layers[size_t(i)]->weight.grad().to_vector<float>(), layers[size_t(i)]->bias.grad().to_vector<float>()};
  }
};

// M micro-batches of inputs (M N, C) and class targets (M N).
struct Batch {
  Tensor x, targets;
  explicit Batch(int micro_batches) {
    Rng rng(kSeed + 1);
    std::vector<float> xs(size_t(micro_batches * kRows * kWidth));
    for (float& v : xs) v = float(rng.normal());
    std::vector<int32_t> ts(size_t(micro_batches * kRows));
    for (int32_t& t : ts) t = int32_t(rng.below(kWidth));
    x = Tensor::from_vector({micro_batches * kRows, kWidth}, xs);
    targets = Tensor::from_vector({micro_batches * kRows}, ts);
  }
  Tensor x_of(int m) const { return x.slice(0, m * kRows, (m + 1) * kRows); }
  Tensor targets_of(int m) const { return targets.slice(0, m * kRows, (m + 1) * kRows); }
};

struct Reference {
  double loss_sum = 0;
  std::vector<std::vector<std::vector<float>>> grads;  // [layer][weight, bias]
};

// The single process: each micro-batch's forward and backward in turn, its loss scaled by 1/M.
Reference reference(int n_layers, int micro_batches) {
  Chain chain(n_layers);
  Batch batch(micro_batches);
  Reference ref;
  for (int m = 0; m < micro_batches; ++m) {
    Tensor loss = ops::cross_entropy(chain.run(batch.x_of(m), 0, n_layers), batch.targets_of(m));
    ref.loss_sum += loss.item();
    ops::scale(loss, 1.0f / float(micro_batches)).backward();
  }
  for (int i = 0; i < n_layers; ++i) ref.grads.push_back(chain.grads(i));
  return ref;
}

// max |a - b| over the tensor, relative to max |b|.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, double(std::abs(a[i] - b[i])));
    scale = std::max(scale, double(std::abs(b[i])));
  }
  return diff / std::max(scale, 1e-30);
}

// ---- 1. correctness against the single process, 4. forward_only --------------------------------

void check_against_reference(comm::Communicator& group, Schedule schedule, int micro_batches) {
  const int stages = group.size(), stage = group.rank();
  const int n_layers = kLayersPerStage * stages, begin = kLayersPerStage * stage, end = begin + kLayersPerStage;
  const Reference ref = reference(n_layers, micro_batches);
  Chain chain(n_layers);  // this stage uses layers [begin, end) of it
  const Batch batch(micro_batches);
  Pipeline pipe(group, Shape{kRows, kWidth}, Device::cpu(), schedule, micro_batches);
  const parallel::StageForward forward = [&](int m, const Tensor& input) {
    EXPECT_EQ(input.defined(), !pipe.first());
    if (input.defined()) {
      EXPECT_EQ(input.requires_grad(), grad_enabled()) << "received activation, micro " << m;
    }
    Tensor y = chain.run(pipe.first() ? batch.x_of(m) : input, begin, end);
    return pipe.last() ? ops::cross_entropy(y, batch.targets_of(m)) : y;
  };

  for (int step = 0; step < 2; ++step) {  // the second step reuses the first one's tags
    SCOPED_TRACE(testing::Message() << "step " << step);
    chain.zero_grad();
    const double loss_sum = pipe.train_step(forward);
    if (pipe.last()) EXPECT_NEAR(loss_sum, ref.loss_sum, 1e-5 * std::abs(ref.loss_sum));
    else EXPECT_EQ(loss_sum, 0.0);
    for (int i = begin; i < end; ++i) {
      const auto grads = chain.grads(i);
      for (size_t j = 0; j < grads.size(); ++j)
        EXPECT_LE(relative_error(grads[j], ref.grads[size_t(i)][j]), 1e-5)
            << "layer " << i << (j == 0 ? " weight" : " bias") << " gradient";
    }
  }

  const double eval_sum = pipe.forward_only(forward, micro_batches);
  if (pipe.last()) EXPECT_NEAR(eval_sum, ref.loss_sum, 1e-6 * std::abs(ref.loss_sum));
  else EXPECT_EQ(eval_sum, 0.0);
}

TEST(Pipeline, LossAndGradientsMatchTheSingleProcess) { for_each_case(check_against_reference); }

// ---- a stage whose tape is counted and whose compute sleeps -------------------------------------

// Micro-batches whose tape is alive on this rank, and backwards run.
struct Live {
  int now = 0, peak = 0, backwards = 0;
};

// Identity whose node marks a micro-batch's tape: counted while alive, sleeps in backward.
class TrackNode : public Node {
 public:
  TrackNode(const Tensor& x, Live& live, Millis backward_sleep) : Node({x}), live_(live), sleep_(backward_sleep) {
    live_.peak = std::max(live_.peak, ++live_.now);
  }
  ~TrackNode() override { --live_.now; }
  const char* name() const override { return "track"; }
  std::vector<Tensor> backward(const Tensor& grad_output) override {
    std::this_thread::sleep_for(sleep_);
    ++live_.backwards;
    return {grad_output};
  }

 private:
  Live& live_;
  Millis sleep_;
};

Tensor track(const Tensor& x, Live& live, Millis backward_sleep) {
  if (!any_requires_grad({&x})) return x;
  return record(x.clone(), std::make_shared<TrackNode>(x, live, backward_sleep));
}

// Forward sleeps `forward_sleep`, backward `backward_sleep`; the first stage starts from `param`.
parallel::StageForward sleepy_stage(const Pipeline& pipe, const Tensor& param, Live& live, Millis forward_sleep,
                                    Millis backward_sleep) {
  return [&pipe, param, &live, forward_sleep, backward_sleep](int, const Tensor& input) {
    std::this_thread::sleep_for(forward_sleep);
    Tensor x = track(pipe.first() ? param : input, live, backward_sleep);
    return pipe.last() ? ops::mean(x) : x;
  };
}

// The order the schedule prescribes on stage s: +m a forward, -(m + 1) a backward.
std::vector<int> expected_order(Schedule schedule, int stages, int stage, int micro_batches) {
  std::vector<int> order;
  const int warmup = schedule == Schedule::gpipe ? micro_batches : std::min(stages - stage - 1, micro_batches);
  for (int m = 0; m < warmup; ++m) order.push_back(m);
  for (int m = warmup; m < micro_batches; ++m) {
    order.push_back(m);
    order.push_back(-(m - warmup + 1));
  }
  for (int m = micro_batches - warmup; m < micro_batches; ++m) order.push_back(-(m + 1));
  return order;
}

std::vector<int> compute_order(const parallel::Timeline& timeline) {
  std::vector<int> order;
  for (const Span& s : timeline.spans)
    if (s.kind == Span::Kind::forward) order.push_back(s.micro);
    else if (s.kind == Span::Kind::backward) order.push_back(-(s.micro + 1));
  return order;
}

// Spans in order, not overlapping, inside the step; each micro-batch one forward and one backward.
void check_timeline(const parallel::Timeline& t, int micro_batches) {
  ASSERT_GT(t.step_seconds, 0.0);
  double cursor = 0;
  std::vector<int> forwards(static_cast<size_t>(micro_batches)), backwards(static_cast<size_t>(micro_batches));
  for (const Span& s : t.spans) {
    EXPECT_LE(s.begin, s.end) << parallel::span_name(s.kind) << " micro " << s.micro;
    EXPECT_GE(s.begin, cursor) << parallel::span_name(s.kind) << " micro " << s.micro << " overlaps the span before";
    EXPECT_LE(s.end, t.step_seconds);
    EXPECT_EQ(s.micro == -1, s.kind == Span::Kind::idle);
    if (s.kind == Span::Kind::forward) ++forwards[size_t(s.micro)];
    if (s.kind == Span::Kind::backward) ++backwards[size_t(s.micro)];
    cursor = s.end;
  }
  EXPECT_EQ(forwards, std::vector<int>(size_t(micro_batches), 1));
  EXPECT_EQ(backwards, std::vector<int>(size_t(micro_batches), 1));
  EXPECT_GE(t.bubble_fraction(), 0.0);
  EXPECT_LT(t.bubble_fraction(), 1.0);
}

// ---- 2. activations held at once, schedule order, before_last_backward --------------------------

TEST(Pipeline, OneFOneBHoldsAtMostStagesMinusStageMicroBatches) {
  for_each_case([](comm::Communicator& group, Schedule schedule, int m) {
    const int p = group.size(), s = group.rank();
    Live live;
    Pipeline pipe(group, Shape{kRows, kWidth}, Device::cpu(), schedule, m);
    Tensor param = Tensor::full({kRows, kWidth}, 0.5f).set_requires_grad(true);
    int hook_calls = 0, backwards_at_hook = -1;
    pipe.train_step(sleepy_stage(pipe, param, live, Millis(0), Millis(0)), [&] {
      ++hook_calls;
      backwards_at_hook = live.backwards;
    });
    EXPECT_EQ(live.peak, schedule == Schedule::gpipe ? m : std::min(m, p - s));
    EXPECT_EQ(live.now, 0) << "tapes still alive after the step";
    EXPECT_EQ(live.backwards, m);
    EXPECT_EQ(hook_calls, 1);
    EXPECT_EQ(backwards_at_hook, m - 1) << "before_last_backward ran before the last backward";
    check_timeline(pipe.last_timeline(), m);
    EXPECT_EQ(compute_order(pipe.last_timeline()), expected_order(schedule, p, s, m));
    if (pipe.first()) {
      EXPECT_FLOAT_EQ(param.grad().to_vector<float>()[0], 1.0f / float(kRows * kWidth));
    }
  });
}

// ---- 3. measured bubble against (p - 1) / (m + p - 1) -------------------------------------------

// Sleeping compute (forward 20 ms, backward 40 ms on every stage) makes the timing independent of
// the oversubscribed CPU. The first stage's step spans the whole pipeline. A run outside the
// tolerance is retried twice (a loaded machine may delay a wake-up); every attempt is printed.
TEST(Pipeline, MeasuredBubbleMatchesThePrediction) {
  constexpr double kTolerance = 0.08;
  const int p = world().size(), s = world().rank();
  for (Schedule schedule : {Schedule::gpipe, Schedule::one_f_one_b})
    for (int m : {p, 2 * p}) {
      SCOPED_TRACE(testing::Message() << parallel::schedule_name(schedule) << ", M = " << m);
      const double predicted = parallel::predicted_bubble(p, m);
      Live live;
      Pipeline pipe(world(), Shape{kRows, kWidth}, Device::cpu(), schedule, m);
      Tensor param = Tensor::full({kRows, kWidth}, 0.5f).set_requires_grad(true);
      const auto forward = sleepy_stage(pipe, param, live, Millis(20), Millis(40));
      int32_t ok = 0;
      for (int attempt = 0; attempt < 3 && !ok; ++attempt) {
        world().barrier()->wait();  // every stage's clock starts together
        pipe.train_step(forward);
        const parallel::Timeline& t = pipe.last_timeline();
        check_timeline(t, m);
        double bubble = t.bubble_fraction(), step = t.step_seconds;
        std::vector<double> bubbles(static_cast<size_t>(p));
        world().all_gather(std::span<const double>(&bubble, 1), std::span<double>(bubbles),
                           std::vector<int64_t>(size_t(p), 1))->wait();
        ok = std::abs(bubbles[0] - predicted) <= kTolerance;
        world().broadcast(std::span<int32_t>(&ok, 1), 0)->wait();
        if (s == 0) {
          std::printf("  np %d %-5s M %2d: stage 0 bubble %.3f, predicted %.3f (step %.3f s; stages", p,
                      parallel::schedule_name(schedule).c_str(), m, bubbles[0], predicted, step);
          for (double b : bubbles) std::printf(" %.3f", b);
          std::printf(")%s\n", ok ? "" : "  outside the tolerance");
        }
      }
      EXPECT_TRUE(ok) << "stage 0's bubble is not within " << kTolerance << " of " << predicted;
    }
}

// ---- 5. names, predictions and bad input --------------------------------------------------------

TEST(Pipeline, NamesPredictionsAndBadInput) {
  EXPECT_EQ(parallel::parse_schedule("gpipe"), Schedule::gpipe);
  EXPECT_EQ(parallel::parse_schedule("1f1b"), Schedule::one_f_one_b);
  for (Schedule schedule : {Schedule::gpipe, Schedule::one_f_one_b})
    EXPECT_EQ(parallel::parse_schedule(parallel::schedule_name(schedule)), schedule);
  EXPECT_THROW(parallel::parse_schedule("zigzag"), ConfigError);
  const std::string bad = message_of([] { parallel::parse_schedule("zigzag"); });
  EXPECT_NE(bad.find("'zigzag'"), std::string::npos) << bad;
  EXPECT_NE(bad.find("gpipe"), std::string::npos) << bad;
  EXPECT_STREQ(parallel::span_name(Span::Kind::idle), "idle");
  EXPECT_STREQ(parallel::span_name(Span::Kind::recv), "recv");

  EXPECT_DOUBLE_EQ(parallel::predicted_bubble(1, 7), 0.0);
  EXPECT_DOUBLE_EQ(parallel::predicted_bubble(4, 8), 3.0 / 11.0);
  EXPECT_THROW(parallel::predicted_bubble(4, 0), InvalidArgument);

  for (int m : {0, -3}) {
    EXPECT_THROW(Pipeline(world(), Shape{kRows, kWidth}, Device::cpu(), Schedule::one_f_one_b, m), InvalidArgument);
    const std::string message =
        message_of([&] { Pipeline(world(), Shape{kRows, kWidth}, Device::cpu(), Schedule::gpipe, m); });
    EXPECT_NE(message.find(std::to_string(m)), std::string::npos) << message;
  }
  // Fewer micro-batches than stages is allowed (the trainer warns).
  Pipeline few(world(), Shape{kRows, kWidth}, Device::cpu(), Schedule::one_f_one_b, 1);
  EXPECT_EQ(few.stages(), world().size());
  EXPECT_EQ(few.stage(), world().rank());
  EXPECT_EQ(few.first(), world().rank() == 0);
  EXPECT_EQ(few.last(), world().rank() == world().size() - 1);
}

}  // namespace
}  // namespace tutti

int main(int argc, char** argv) {
  return tutti::test::mpi_test_main(argc, argv, "pipeline_mpi_test", tutti::g_world);
}
