// Pipeline parallelism: the model's layers are cut into stages, one per rank of a pipeline group,
// and the micro-batches of a step flow through them: activations forward, their gradients back,
// by point-to-point send/recv. Schedules: GPipe (every forward, then every backward) and 1F1B
// (after a warm-up of stages - stage - 1 forwards, one forward then one backward, so at most
// `stages - stage` micro-batches hold activations on a stage at once). Both run the backwards in
// the order of the forwards (micro-batch 0 first), so they accumulate parameter gradients in the
// same order and give the same gradients, bit for bit.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "tutti/comm/communicator.hpp"
#include "tutti/core/tensor.hpp"

namespace tutti::parallel {

enum class Schedule { gpipe, one_f_one_b };
// "gpipe" | "1f1b"; anything else throws ConfigError naming the value.
Schedule parse_schedule(const std::string& name);
std::string schedule_name(Schedule schedule);

// One span of a stage's step on its own clock (seconds since the step started).
struct Span {
  enum class Kind { forward, backward, send, recv, idle };
  Kind kind;
  int micro;  // micro-batch, -1 for idle
  double begin, end;
};
const char* span_name(Span::Kind kind);

struct Timeline {
  std::vector<Span> spans;
  double step_seconds = 0;
  // Share of the step this stage spent neither in forward nor backward compute.
  double bubble_fraction() const;
};
// The ideal bubble of a synchronous schedule with equal stages: (p - 1) / (m + p - 1).
double predicted_bubble(int stages, int micro_batches);

// Cuts `cost.size()` layers into `stages` contiguous non-empty stages minimising the costliest
// stage, the first stage also paying `first_extra` (embeddings) and the last `last_extra` (the
// head and loss). Returns stages + 1 boundaries: stage s holds layers [b[s], b[s + 1]). Throws
// ConfigError when there are fewer layers than stages.
std::vector<int> balance_stages(const std::vector<double>& cost, double first_extra, double last_extra, int stages);

// The stage's compute for micro-batch m. `input` is undefined on the first stage; elsewhere it is
// the activation received from the previous stage, a leaf that requires grad. Returns the
// activation for the next stage (the activation shape), or on the last stage the scalar mean loss
// of micro-batch m.
using StageForward = std::function<Tensor(int micro, const Tensor& input)>;

class Pipeline {
 public:
  // group: the pipeline group, its ranks the stages in order. activation: the shape (f32) of the
  // tensor passed between stages for one micro-batch, e.g. {micro, T, C}; device: where it lives.
  Pipeline(comm::Communicator& group, Shape activation, Device device, Schedule schedule, int micro_batches);
  // Waits for sends still in flight (only after a step that threw) before their buffers go.
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  int stage() const;
  int stages() const;
  bool first() const;
  bool last() const;
  Schedule schedule() const { return schedule_; }
  int micro_batches() const { return micro_batches_; }

  // One training step over every micro-batch: forward and backward as the schedule orders them;
  // the last stage back-propagates loss / micro_batches. before_last_backward runs just before the
  // last backward of this stage in the step (data parallelism arms its gradient buckets there).
  // Returns the sum over micro-batches of the losses on the last stage, 0 elsewhere.
  double train_step(const StageForward& forward, const std::function<void()>& before_last_backward = {});
  // Forward only, without the tape (evaluation) over `micro_batches` micro-batches; same return.
  double forward_only(const StageForward& forward, int micro_batches);

  // The spans of the last train_step on this stage.
  const Timeline& last_timeline() const { return timeline_; }

 private:
  struct InFlight;  // a posted send and the tensor it reads
  class Step;       // the clock, spans and point-to-point traffic of one step (pipeline.cpp)

  comm::Communicator& group_;
  Shape activation_;
  Device device_;
  Schedule schedule_;
  int micro_batches_;
  Timeline timeline_;
  std::vector<InFlight> in_flight_;
};

}  // namespace tutti::parallel
