// Pipeline schedules over point-to-point send/recv. Stage s receives micro-batch m's activation
// from s - 1 with tag 2m and its gradient from s + 1 with tag 2m + 1. Sends are posted and left
// in flight (the tensor they read kept alive beside their Work); receives are waited at once, so
// a stage blocks only on what it needs next, and a schedule in which every recv's matching send
// is posted earlier on the peer cannot deadlock.
#include "tutti/parallel/pipeline.hpp"

#include <algorithm>
#include <chrono>
#include <span>
#include <type_traits>
#include <utility>

#include "backend/backend.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/core/error.hpp"
#include "tutti/core/trace.hpp"
#include "tutti/ops/ops.hpp"

namespace tutti::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// Gaps between spans shorter than this are the bookkeeping between them, not idle time worth a span.
constexpr double kMinIdleSeconds = 10e-6;

int activation_tag(int micro) { return 2 * micro; }
int gradient_tag(int micro) { return 2 * micro + 1; }

struct Action {
  bool forward;
  int micro;
};

// The order of this stage's forwards and backwards in one step.
std::vector<Action> step_order(Schedule schedule, int stage, int stages, int micro_batches) {
  std::vector<Action> order;
  order.reserve(2 * size_t(micro_batches));
  if (schedule == Schedule::gpipe) {
    for (int m = 0; m < micro_batches; ++m) order.push_back({true, m});
    for (int m = 0; m < micro_batches; ++m) order.push_back({false, m});
    return order;
  }
  // 1F1B (PipeDream-Flush): warm-up forwards, then forward m with backward m - warmup, then the
  // cool-down backwards. A stage holds at most warmup + 1 = stages - stage micro-batches.
  const int warmup = std::min(stages - stage - 1, micro_batches);
  for (int m = 0; m < warmup; ++m) order.push_back({true, m});
  for (int m = warmup; m < micro_batches; ++m) {
    order.push_back({true, m});
    order.push_back({false, m - warmup});
  }
  for (int m = micro_batches - warmup; m < micro_batches; ++m) order.push_back({false, m});
  return order;
}

// What a stage's forward returns must be what the next stage (or the loss) expects.
void check_stage_output(const Tensor& out, bool last, const Shape& activation, Device device, int stage,
                               int micro) {
  TUTTI_CHECK_AS(InvalidArgument, out.defined(), "pipeline stage ", stage, ": forward of micro-batch ", micro,
                 " returned an undefined tensor");
  if (last) {
    TUTTI_CHECK_AS(InvalidArgument, out.numel() == 1 && out.dtype() == DType::f32, "pipeline stage ", stage,
                   " (last): forward of micro-batch ", micro, " must return the scalar loss, got ", out.str());
  } else {
    TUTTI_CHECK_AS(InvalidArgument, out.shape() == activation && out.dtype() == DType::f32 && out.device() == device,
                   "pipeline stage ", stage, ": forward of micro-batch ", micro, " returned ", out.str(),
                   ", the next stage expects f32", activation.str(), " ", device.str());
  }
}

}  // namespace

// ---- names and the ideal bubble ----------------------------------------------------------------

Schedule parse_schedule(const std::string& name) {
  if (name == "gpipe") return Schedule::gpipe;
  if (name == "1f1b") return Schedule::one_f_one_b;
  TUTTI_FAIL(ConfigError, "schedule '", name, "' is not one of gpipe, 1f1b");
}

std::string schedule_name(Schedule schedule) {
  switch (schedule) {
    case Schedule::gpipe: return "gpipe";
    case Schedule::one_f_one_b: return "1f1b";
  }
  TUTTI_FAIL(InvalidArgument, "unknown schedule ", static_cast<int>(schedule));
}

const char* span_name(Span::Kind kind) {
  switch (kind) {
    case Span::Kind::forward: return "forward";
    case Span::Kind::backward: return "backward";
    case Span::Kind::send: return "send";
    case Span::Kind::recv: return "recv";
    case Span::Kind::idle: return "idle";
  }
  return "unknown";
}

double Timeline::bubble_fraction() const {
  if (step_seconds <= 0) return 0;
  double compute = 0;
  for (const Span& s : spans)
    if (s.kind == Span::Kind::forward || s.kind == Span::Kind::backward) compute += s.end - s.begin;
  return 1.0 - compute / step_seconds;
}

double predicted_bubble(int stages, int micro_batches) {
  TUTTI_CHECK_AS(InvalidArgument, stages >= 1 && micro_batches >= 1, "predicted_bubble needs stages >= 1 and ",
                 "micro-batches >= 1, got ", stages, " and ", micro_batches);
  return double(stages - 1) / double(micro_batches + stages - 1);
}

// ---- one step: clock, spans, point-to-point ---------------------------------------------------

struct Pipeline::InFlight {
  comm::WorkHandle work;
  Tensor buffer;  // what the send reads (no autograd history: holding it keeps no graph alive)
  int micro;
};

class Pipeline::Step {
 public:
  explicit Step(Pipeline& pipeline) : p_(pipeline) {
    wait_sends(false);  // left by a step that threw
    start_ = Clock::now();
    traced_until_ = trace::enabled() ? trace::now_us() : 0.0;
  }

  // Runs f() as a span of `kind` and returns what it returns.
  template <class F>
  auto timed(Span::Kind kind, int micro, F&& f) {
    const double begin = now(), trace_begin = trace_gap();
    if constexpr (std::is_void_v<decltype(f())>) {
      f();
      record(kind, micro, begin, trace_begin);
    } else {
      auto result = f();
      record(kind, micro, begin, trace_begin);
      return result;
    }
  }

  // A tensor of the activation shape from `peer`, waited for.
  Tensor recv(int micro, int peer, int tag) {
    Tensor t = Tensor::empty(p_.activation_, DType::f32, p_.device_);
    timed(Span::Kind::recv, micro, [&] {
      p_.group_.recv(std::span<float>(t.data<float>(), size_t(t.numel())), peer, tag)->wait();
    });
    return t;
  }

  // Posts the send of `t` and keeps it in flight until it completes.
  void send(const Tensor& t, int micro, int peer, int tag) {
    reap();
    timed(Span::Kind::send, micro, [&] {
      Tensor buffer = t.contiguous().detach();
      // The kernels that wrote it must have finished; nccl orders its send after them by itself.
      if (p_.group_.backend() != "nccl") backend_for(buffer.device()).synchronize();
      auto work = p_.group_.send(std::span<const float>(buffer.data<float>(), size_t(buffer.numel())), peer, tag);
      work->is_completed();  // the nccl backend batches sends until polled: start it now
      p_.in_flight_.push_back({std::move(work), std::move(buffer), micro});
    });
  }

  // Waits for every send still in flight (as send spans when `record`).
  void wait_sends(bool record = true) {
    for (InFlight& s : p_.in_flight_) {
      if (!record || s.work->is_completed()) s.work->wait();
      else timed(Span::Kind::send, s.micro, [&] { s.work->wait(); });
    }
    p_.in_flight_.clear();
  }

  // The spans in time order with the gaps between them as idle spans.
  Timeline finish() {
    trace_gap();
    timeline_.step_seconds = now();
    std::vector<Span> spans;
    spans.reserve(2 * timeline_.spans.size() + 1);
    double cursor = 0;
    for (const Span& s : timeline_.spans) {
      if (s.begin - cursor >= kMinIdleSeconds) spans.push_back({Span::Kind::idle, -1, cursor, s.begin});
      spans.push_back(s);
      cursor = s.end;
    }
    if (timeline_.step_seconds - cursor >= kMinIdleSeconds)
      spans.push_back({Span::Kind::idle, -1, cursor, timeline_.step_seconds});
    timeline_.spans = std::move(spans);
    return std::move(timeline_);
  }

 private:
  double now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

  void record(Span::Kind kind, int micro, double begin, double trace_begin) {
    timeline_.spans.push_back({kind, micro, begin, now()});
    if (!trace::enabled()) return;
    traced_until_ = trace::now_us();
    // A stage waiting to receive waits for its neighbour's compute: bubble, not communication.
    const char* category = kind == Span::Kind::send   ? trace::cat::comm
                           : kind == Span::Kind::recv ? trace::cat::bubble
                                                      : trace::cat::compute;
    trace::complete(std::string(span_name(kind)) + " " + std::to_string(micro), category, trace_begin, traced_until_,
                    "{\"micro_batch\":" + std::to_string(micro) + "}");
  }

  // In a trace, the time since the last span as an idle span (the bubble); returns now.
  double trace_gap() {
    if (!trace::enabled()) return 0.0;
    const double now_us = trace::now_us();
    if (now_us - traced_until_ >= kMinIdleSeconds * 1e6) trace::complete("idle", trace::cat::bubble, traced_until_, now_us);
    return traced_until_ = now_us;
  }

  // Drops the sends that have completed, so their buffers go before the end of the step.
  void reap() {
    std::erase_if(p_.in_flight_, [](InFlight& s) {
      if (!s.work->is_completed()) return false;
      s.work->wait();  // rethrows a failed send's error
      return true;
    });
  }

  Pipeline& p_;
  Clock::time_point start_;
  Timeline timeline_;
  double traced_until_;  // the end of the last span in the trace (--trace)
};

// ---- the pipeline ------------------------------------------------------------------------------

Pipeline::Pipeline(comm::Communicator& group, Shape activation, Device device, Schedule schedule, int micro_batches)
    : group_(group), activation_(std::move(activation)), device_(device), schedule_(schedule),
      micro_batches_(micro_batches) {
  TUTTI_CHECK_AS(InvalidArgument, micro_batches >= 1, "pipeline: micro-batches must be at least 1, got ",
                 micro_batches);
}

Pipeline::~Pipeline() {
  for (InFlight& s : in_flight_) {
    try {
      s.work->wait();
    } catch (...) {  // the step that left it already failed; its error was reported
    }
  }
}

int Pipeline::stage() const { return group_.rank(); }
int Pipeline::stages() const { return group_.size(); }
bool Pipeline::first() const { return stage() == 0; }
bool Pipeline::last() const { return stage() == stages() - 1; }

double Pipeline::train_step(const StageForward& forward, const std::function<void()>& before_last_backward) {
  Step step(*this);
  struct Held {  // what micro-batch m's backward needs, released right after it
    Tensor input;   // the received activation, a leaf (undefined on the first stage)
    Tensor output;  // the activation sent on, or on the last stage the loss
  };
  std::vector<Held> held(static_cast<size_t>(micro_batches_));
  double loss_sum = 0;
  int backwards_left = micro_batches_;

  auto run_forward = [&](int m) {
    Tensor input;
    if (!first()) {
      input = step.recv(m, stage() - 1, activation_tag(m));
      input.set_requires_grad(true);
    }
    Tensor output = step.timed(Span::Kind::forward, m, [&] {
      Tensor out = forward(m, input);
      check_stage_output(out, last(), activation_, device_, stage(), m);
      if (last()) loss_sum += out.item();  // waits for the device: the loss's compute is done here
      return out;
    });
    if (!last()) step.send(output, m, stage() + 1, activation_tag(m));
    held[size_t(m)] = {std::move(input), std::move(output)};
  };

  auto run_backward = [&](int m) {
    Held h = std::exchange(held[size_t(m)], Held{});
    Tensor grad;
    if (!last()) grad = step.recv(m, stage() + 1, gradient_tag(m));
    if (--backwards_left == 0 && before_last_backward) before_last_backward();
    step.timed(Span::Kind::backward, m, [&] {
      if (last()) ops::scale(h.output, 1.0f / float(micro_batches_)).backward();
      else h.output.backward(grad);
    });
    h.output = Tensor();  // the tape of micro-batch m (its saved activations) goes here
    if (!first()) {
      const Tensor input_grad = h.input.grad();
      TUTTI_CHECK_AS(InvalidArgument, input_grad.defined(), "pipeline stage ", stage(), ": forward of micro-batch ",
                     m, " did not use its input, so there is no gradient to send back");
      step.send(input_grad, m, stage() - 1, gradient_tag(m));
    }
  };

  for (const Action& a : step_order(schedule_, stage(), stages(), micro_batches_))
    a.forward ? run_forward(a.micro) : run_backward(a.micro);
  step.wait_sends();
  timeline_ = step.finish();
  return last() ? loss_sum : 0.0;
}

double Pipeline::forward_only(const StageForward& forward, int micro_batches) {
  TUTTI_CHECK_AS(InvalidArgument, micro_batches >= 0, "pipeline: forward_only over ", micro_batches,
                 " micro-batches");
  NoGradGuard no_grad;
  Step step(*this);
  double loss_sum = 0;
  for (int m = 0; m < micro_batches; ++m) {
    const Tensor input = first() ? Tensor() : step.recv(m, stage() - 1, activation_tag(m));
    const Tensor output = forward(m, input);
    check_stage_output(output, last(), activation_, device_, stage(), m);
    if (last()) loss_sum += output.item();
    else step.send(output, m, stage() + 1, activation_tag(m));
  }
  step.wait_sends();
  return last() ? loss_sum : 0.0;
}

std::vector<int> balance_stages(const std::vector<double>& cost, double first_extra, double last_extra, int stages) {
  const int L = static_cast<int>(cost.size());
  TUTTI_CHECK_AS(ConfigError, stages >= 1 && stages <= L, "pp ", stages, " needs at least as many layers; the model has ",
                 L);
  std::vector<double> prefix(size_t(L) + 1, 0.0);
  for (int l = 0; l < L; ++l) prefix[size_t(l) + 1] = prefix[size_t(l)] + cost[size_t(l)];
  auto stage_cost = [&](int s, int a, int b) {
    return prefix[size_t(b)] - prefix[size_t(a)] + (s == 0 ? first_extra : 0.0) + (s == stages - 1 ? last_extra : 0.0);
  };
  // best[s][l]: the least max-stage cost of layers [0, l) in stages 0..s; cut[s][l]: where stage s begins.
  constexpr double kInf = 1e300;
  std::vector<std::vector<double>> best(size_t(stages), std::vector<double>(size_t(L) + 1, kInf));
  std::vector<std::vector<int>> cut(size_t(stages), std::vector<int>(size_t(L) + 1, 0));
  for (int l = 1; l <= L; ++l) best[0][size_t(l)] = stage_cost(0, 0, l);
  for (int s = 1; s < stages; ++s)
    for (int l = s + 1; l <= L; ++l)
      for (int k = s; k < l; ++k) {
        const double c = std::max(best[size_t(s) - 1][size_t(k)], stage_cost(s, k, l));
        if (c < best[size_t(s)][size_t(l)] * (1 - 1e-12)) {  // ties: the earliest cut, deterministic
          best[size_t(s)][size_t(l)] = c;
          cut[size_t(s)][size_t(l)] = k;
        }
      }
  std::vector<int> bounds(size_t(stages) + 1, 0);
  bounds[size_t(stages)] = L;
  for (int s = stages - 1; s > 0; --s) bounds[size_t(s)] = cut[size_t(s)][size_t(bounds[size_t(s) + 1])];
  return bounds;
}

}  // namespace tutti::parallel
