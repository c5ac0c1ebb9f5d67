#include "tutti/train/trace_report.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "tutti/core/error.hpp"
#include "tutti/core/trace.hpp"

namespace tutti::train {
namespace {

struct SpanEvent {
  double ts, dur;
  std::string category, name;
};

StepPart part_of(const std::string& category) {
  namespace c = trace::cat;
  if (category == c::compute) return StepPart::compute;
  if (category == c::comm) return StepPart::comm;
  if (category == c::bubble) return StepPart::bubble;
  if (category == c::data) return StepPart::data;
  if (category == c::checkpoint) return StepPart::checkpoint;
  if (category == c::eval) return StepPart::eval;
  return StepPart::other;  // the step's own time between the spans inside it
}

// One thread's spans: exclusive time per part inside step spans (added to `rank`), and the busy
// time of outermost spans outside any step (background threads; before and after the loop). The
// thread's first step (warm-up: connections, allocations) is left out and timed apart. A wait
// inside a pipeline receive is bubble: the stage waits for the stage before it. Spans that
// overlap without nesting are reported as problems.
void account_thread(std::vector<SpanEvent> spans, RankTime& rank, std::vector<std::string>& problems,
                    const std::string& where) {
  std::sort(spans.begin(), spans.end(), [](const SpanEvent& a, const SpanEvent& b) {
    return a.ts != b.ts ? a.ts < b.ts : a.dur > b.dur;  // a parent before the child that starts with it
  });
  constexpr double kSlackUs = 1.0;  // timestamps are rounded to the microsecond by some writers
  enum class Where { outside, counted, warm_up };
  struct Open {
    const SpanEvent* span;
    StepPart part;
    Where where;
    double children = 0.0;
  };
  std::vector<Open> stack;
  bool first_step = true;
  auto close = [&] {
    const Open o = stack.back();
    stack.pop_back();
    const double exclusive = std::max(0.0, o.span->dur - o.children) * 1e-6;
    if (o.where == Where::counted) rank.seconds[size_t(o.part)] += exclusive;
    if (!stack.empty()) stack.back().children += o.span->dur;
    else if (o.where == Where::outside) rank.outside_seconds += o.span->dur * 1e-6;
  };
  for (const SpanEvent& s : spans) {
    while (!stack.empty() && s.ts >= stack.back().span->ts + stack.back().span->dur - kSlackUs) close();
    if (!stack.empty() && s.ts + s.dur > stack.back().span->ts + stack.back().span->dur + kSlackUs)
      problems.push_back(where + ": span '" + s.name + "' overlaps '" + stack.back().span->name + "' without nesting");
    Where w = stack.empty() ? Where::outside : stack.back().where;
    StepPart part = part_of(s.category);
    if (s.category == trace::cat::step) {
      w = first_step ? Where::warm_up : Where::counted;
      if (first_step) rank.first_step_seconds = s.dur * 1e-6;
      else ++rank.steps, rank.step_seconds += s.dur * 1e-6;
      first_step = false;
    } else if (part == StepPart::comm && !stack.empty() && stack.back().part == StepPart::bubble) {
      part = StepPart::bubble;
    }
    stack.push_back({&s, part, w});
  }
  while (!stack.empty()) close();
}

}  // namespace

const char* step_part_name(StepPart part) {
  switch (part) {
    case StepPart::compute: return "compute";
    case StepPart::comm: return "exposed comm";
    case StepPart::bubble: return "bubble";
    case StepPart::data: return "data wait";
    case StepPart::checkpoint: return "checkpoint";
    case StepPart::eval: return "eval";
    case StepPart::other: return "other";
    case StepPart::count: break;
  }
  return "?";
}

double RankTime::percent(StepPart part) const {
  return step_seconds > 0 ? 100.0 * seconds[size_t(part)] / step_seconds : 0.0;
}

double RankTime::compute_per_step() const { return steps > 0 ? seconds[size_t(StepPart::compute)] / steps : 0.0; }

TraceReport read_trace_report(const std::string& path) {
  std::ifstream in(path);
  TUTTI_CHECK_AS(ConfigError, in.good(), "cannot read trace '", path, "'");
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    TUTTI_FAIL(ConfigError, "trace '", path, "' is not valid JSON: ", e.what());
  }
  TUTTI_CHECK_AS(ConfigError, doc.is_object() && doc.contains("traceEvents") && doc["traceEvents"].is_array(),
                 "trace '", path, "' has no traceEvents array (not a Chrome trace)");
  std::map<int, std::map<int, std::vector<SpanEvent>>> threads;  // pid -> tid -> spans
  std::map<int, std::string> names;
  for (const auto& e : doc["traceEvents"]) {
    const std::string ph = e.value("ph", "");
    const int pid = e.value("pid", 0);
    if (ph == "M" && e.value("name", "") == "process_name") names[pid] = e["args"].value("name", "");
    if (ph != "X") continue;
    threads[pid][e.value("tid", 0)].push_back({e.value("ts", 0.0), e.value("dur", 0.0), e.value("cat", ""),
                                               e.value("name", "")});
  }
  TraceReport report;
  for (auto& [pid, by_thread] : threads) {
    RankTime rank;
    rank.rank = pid;
    rank.name = names.count(pid) ? names[pid] : "rank " + std::to_string(pid);
    for (auto& [tid, spans] : by_thread)
      account_thread(std::move(spans), rank, report.problems, rank.name + ", thread " + std::to_string(tid));
    report.ranks.push_back(rank);
  }
  TUTTI_CHECK_AS(ConfigError, !report.ranks.empty() && report.ranks[0].steps > 0, "trace '", path,
                 "' holds fewer than two training steps (the first, warm-up, is left out)");
  if (report.ranks.size() >= 2) {
    std::vector<double> compute;
    for (const RankTime& r : report.ranks) compute.push_back(r.compute_per_step());
    std::vector<double> sorted = compute;
    std::sort(sorted.begin(), sorted.end());
    const size_t n = sorted.size();
    report.median_compute = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    report.slowest = int(std::max_element(compute.begin(), compute.end()) - compute.begin());
  }
  return report;
}

std::string format_trace_report(const TraceReport& report) {
  std::string out;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-28s %9s %7s %9s", "share of step time", "first ms", "steps", "step ms");
  out += buf;
  for (size_t p = 0; p < size_t(StepPart::count); ++p) {
    std::snprintf(buf, sizeof buf, " %12s", step_part_name(StepPart(p)));
    out += buf;
  }
  out += "  total  outside steps s\n";
  for (const RankTime& r : report.ranks) {
    std::snprintf(buf, sizeof buf, "%-28s %9.1f %7d %9.2f", r.name.c_str(), 1e3 * r.first_step_seconds, r.steps,
                  r.steps ? 1e3 * r.step_seconds / r.steps : 0.0);
    out += buf;
    double total = 0.0;
    for (size_t p = 0; p < size_t(StepPart::count); ++p) {
      total += r.percent(StepPart(p));
      std::snprintf(buf, sizeof buf, " %11.1f%%", r.percent(StepPart(p)));
      out += buf;
    }
    std::snprintf(buf, sizeof buf, " %5.1f%%  %15.2f\n", total, r.outside_seconds);
    out += buf;
  }
  if (report.slowest >= 0) {
    const RankTime& s = report.ranks[size_t(report.slowest)];
    std::snprintf(buf, sizeof buf, "slowest rank: %s, compute %.2f ms per step, %+.1f%% against the median %.2f ms\n",
                  s.name.c_str(), 1e3 * s.compute_per_step(),
                  report.median_compute > 0 ? 100.0 * (s.compute_per_step() / report.median_compute - 1.0) : 0.0,
                  1e3 * report.median_compute);
    out += buf;
  }
  for (const std::string& p : report.problems) out += "problem: " + p + "\n";
  return out;
}

}  // namespace tutti::train
