// `tutti inspect trace FILE`: where each rank's step time went, from a trace written by
// `tutti train --trace FILE` (Chrome trace / Perfetto JSON).
#pragma once
#include <array>
#include <string>
#include <vector>

namespace tutti::train {

// The parts of a step, in the order they are printed. Each span's exclusive time (its duration
// less that of the spans nested in it) counts once, so a rank's parts add up to its step time.
// Each rank's first step (warm-up) is left out. The spans are host time: on a GPU, kernels run
// asynchronously, so a host wait on a collective also holds the GPU work queued before it.
enum class StepPart { compute, comm, bubble, data, checkpoint, eval, other, count };
const char* step_part_name(StepPart part);

struct RankTime {
  int rank = 0;
  std::string name;  // "rank 1 (dp 0, pp 1, tp 0)"
  double first_step_seconds = 0.0;  // warm-up, left out of what follows
  int steps = 0;                    // the others
  double step_seconds = 0.0;        // the training thread's steps, summed
  std::array<double, size_t(StepPart::count)> seconds{};
  double outside_seconds = 0.0;  // spans outside steps: background threads (loading, evaluation, writing)
  double percent(StepPart part) const;
  double compute_per_step() const;
};

struct TraceReport {
  std::vector<RankTime> ranks;
  int slowest = -1;              // index into ranks by compute per step (-1: fewer than two ranks)
  double median_compute = 0.0;   // seconds per step, over the ranks
  std::vector<std::string> problems;  // spans that overlap without nesting, and the like
};

// Reads and checks the file; throws ConfigError naming it when it cannot be read or is not a
// trace tutti wrote.
TraceReport read_trace_report(const std::string& path);
std::string format_trace_report(const TraceReport& report);

}  // namespace tutti::train
