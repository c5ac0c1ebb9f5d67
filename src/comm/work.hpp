// The one Work implementation every backend completes: a flag, an error and a condition variable.
// The backend's progress side calls finish(); callers block in wait(timeout).
#pragma once
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <string>

#include "tutti/comm/communicator.hpp"

namespace tutti::comm {

class CompletionWork : public Work {
 public:
  // Called when a wait() expires: returns the Timeout message (and may poison the communicator).
  using OnTimeout = std::function<std::string(Millis waited)>;

  // `trace_name` ("all_reduce #12"): the operation's name in a trace (--trace), empty: untraced.
  CompletionWork(Millis default_timeout, OnTimeout on_timeout, std::string trace_name = {});
  // An operation that finished when it was issued (the local backend, empty transfers).
  static std::shared_ptr<CompletionWork> done();

  void wait(Millis timeout) override;
  void wait() override { wait(default_timeout_); }
  bool is_completed() override;

  // Marks the operation finished, with its error if it failed, and wakes every waiter.
  void finish(std::exception_ptr error = nullptr);

 private:
  std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::exception_ptr error_;
  Millis default_timeout_;
  OnTimeout on_timeout_;
  std::string trace_name_;
  double issued_us_ = 0.0;  // when traced
};

}  // namespace tutti::comm
