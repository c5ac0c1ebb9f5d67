// The timeline of a process: spans of named work on each thread, written as Chrome trace /
// Perfetto JSON ("X" complete events, "b"/"e" async events for operations in flight).
//
// The recorder is one per process, like a logger, because the spans come from every layer
// (pipeline, communicators' progress threads, background tasks) and passing a handle through each
// would touch every signature for an off-by-default diagnostic. It records nothing until
// start(); recording costs one relaxed atomic load when off. Each thread appends to its own
// buffer (no lock contention between threads); take_events() collects them.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace tutti::trace {

// Categories `tutti inspect trace` sorts time into (the "cat" field).
namespace cat {
inline constexpr const char* step = "step";              // one training step, everything in it
inline constexpr const char* compute = "compute";        // forward, backward, optimizer
inline constexpr const char* comm = "comm";              // a thread blocked on a transfer
inline constexpr const char* bubble = "bubble";          // pipeline idle time
inline constexpr const char* data = "data";              // waiting for or preparing batches
inline constexpr const char* checkpoint = "checkpoint";  // gathering, writing
inline constexpr const char* eval = "eval";              // evaluation and samples
inline constexpr const char* in_flight = "in_flight";    // an asynchronous operation, issue to completion
inline constexpr const char* host = "host";              // the step's own host work (counters, logs)
}  // namespace cat

bool enabled();
// Starts recording (clears what was recorded before); the origin of timestamps is now.
void start();
void stop();

// Microseconds on the recorder's clock (steady, shifted to the Unix epoch once at start() so
// that processes on different hosts line up as well as their wall clocks do).
double now_us();

// A span [begin, end) on the calling thread. `args` is a JSON object's text, or empty.
void complete(std::string_view name, const char* category, double begin_us, double end_us,
              std::string_view args = {});
// An operation that overlaps others on its thread (a collective in flight): its own track.
void async_span(std::string_view name, const char* category, double begin_us, double end_us, uint64_t id);
// The calling thread's name in the trace ("train", "loader", "mpi progress", ...).
void name_thread(std::string name);

// Every thread's events since start() as Chrome trace JSON objects, comma-separated, with `pid`
// and metadata naming the process `process_name`; the buffers are emptied.
std::string take_events(int pid, const std::string& process_name);

// RAII: records the span from construction to destruction on the calling thread.
class Scope {
 public:
  // Records nothing when `record` is false (or the recorder is off).
  Scope(std::string_view name, const char* category, bool record = true)
      : on_(record && enabled()), category_(category), begin_(on_ ? now_us() : 0.0) {
    if (on_) name_ = name;
  }
  ~Scope() {
    if (on_) complete(name_, category_, begin_, now_us());
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  bool on_;
  const char* category_;
  double begin_;
  std::string name_;
};

}  // namespace tutti::trace
