#include "comm/work.hpp"

#include <algorithm>

namespace tutti::comm {

CompletionWork::CompletionWork(Millis default_timeout, OnTimeout on_timeout)
    : default_timeout_(default_timeout), on_timeout_(std::move(on_timeout)) {}

std::shared_ptr<CompletionWork> CompletionWork::done() {
  auto work = std::make_shared<CompletionWork>(Millis(0), nullptr);
  work->finish();
  return work;
}

void CompletionWork::wait(Millis timeout) {
  // steady_clock::now() + Millis::max() overflows; a century is "forever" here.
  const Millis bounded = std::clamp(timeout, Millis(0), Millis(std::chrono::hours(24 * 365 * 100)));
  std::unique_lock lock(mutex_);
  if (!done_cv_.wait_for(lock, bounded, [&] { return done_; })) {
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
  {
    std::lock_guard lock(mutex_);
    done_ = true;
    error_ = std::move(error);
  }
  done_cv_.notify_all();
}

}  // namespace tutti::comm
