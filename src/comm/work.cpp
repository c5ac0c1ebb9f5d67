#include "comm/work.hpp"

#include <algorithm>

#include "tutti/core/trace.hpp"

namespace tutti::comm {

CompletionWork::CompletionWork(Millis default_timeout, OnTimeout on_timeout, std::string trace_name)
    : default_timeout_(default_timeout), on_timeout_(std::move(on_timeout)),
      trace_name_(trace::enabled() ? std::move(trace_name) : std::string()),
      issued_us_(trace_name_.empty() ? 0.0 : trace::now_us()) {}

std::shared_ptr<CompletionWork> CompletionWork::done() {
  auto work = std::make_shared<CompletionWork>(Millis(0), nullptr);
  work->finish();
  return work;
}

void CompletionWork::wait(Millis timeout) {
  // steady_clock::now() + Millis::max() overflows; a century is "forever" here.
  const Millis bounded = std::clamp(timeout, Millis(0), Millis(std::chrono::hours(24 * 365 * 100)));
  std::unique_lock lock(mutex_);
  // The time the caller spends blocked here is the communication its computation did not hide.
  const double blocked_since = !done_ && !trace_name_.empty() ? trace::now_us() : -1.0;
  const bool finished = done_cv_.wait_for(lock, bounded, [&] { return done_; });
  if (blocked_since >= 0) trace::complete("wait " + trace_name_, trace::cat::comm, blocked_since, trace::now_us());
  if (!finished) {
    lock.unlock();
    TUTTI_FAIL(Timeout, on_timeout_ ? on_timeout_(timeout) : "operation timed out");
  }
  if (error_) std::rethrow_exception(error_);
}

bool CompletionWork::is_completed() {
  std::lock_guard lock(mutex_);
  return done_;
}

void CompletionWork::finish(std::exception_ptr error) {
  if (!trace_name_.empty())
    trace::async_span(trace_name_, trace::cat::in_flight, issued_us_, trace::now_us(), reinterpret_cast<uintptr_t>(this));
  {
    std::lock_guard lock(mutex_);
    done_ = true;
    error_ = std::move(error);
  }
  done_cv_.notify_all();
}

}  // namespace tutti::comm
