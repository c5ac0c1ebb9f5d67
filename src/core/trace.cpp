#include "tutti/core/trace.hpp"

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

namespace tutti::trace {
namespace {

struct Event {
  std::string name;
  const char* category;
  double ts, dur;
  uint64_t id;  // async events only
  char phase;   // 'X' complete, 'A' async (written as a "b"/"e" pair)
  std::string args;
};

struct ThreadBuffer {
  int tid;
  std::mutex mutex;  // the owner appends, take_events() drains: uncontended but for that
  std::string name;
  std::vector<Event> events;
};

struct Recorder {
  std::atomic<bool> on{false};
  std::atomic<double> epoch_offset_us{0.0};  // Unix time minus steady time, fixed at start()
  std::mutex mutex;
  std::vector<std::shared_ptr<ThreadBuffer>> threads;
};

Recorder& recorder() {
  static Recorder* r = new Recorder;  // never destroyed: threads may record during exit
  return *r;
}

ThreadBuffer& this_thread() {
  thread_local std::shared_ptr<ThreadBuffer> mine = [] {
    Recorder& r = recorder();
    std::lock_guard lock(r.mutex);
    auto b = std::make_shared<ThreadBuffer>();
    b->tid = static_cast<int>(r.threads.size());
    r.threads.push_back(b);
    return b;
  }();
  return *mine;
}

double steady_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void append(Event e) {
  ThreadBuffer& b = this_thread();
  std::lock_guard lock(b.mutex);
  b.events.push_back(std::move(e));
}

}  // namespace

bool enabled() { return recorder().on.load(std::memory_order_relaxed); }

void start() {
  Recorder& r = recorder();
  const double unix_us =
      std::chrono::duration<double, std::micro>(std::chrono::system_clock::now().time_since_epoch()).count();
  r.epoch_offset_us = unix_us - steady_us();
  {
    std::lock_guard lock(r.mutex);
    for (auto& t : r.threads) {
      std::lock_guard tl(t->mutex);
      t->events.clear();
    }
  }
  r.on = true;
}

void stop() { recorder().on = false; }

double now_us() { return steady_us() + recorder().epoch_offset_us.load(std::memory_order_relaxed); }

void complete(std::string_view name, const char* category, double begin_us, double end_us, std::string_view args) {
  if (!enabled()) return;
  append({std::string(name), category, begin_us, end_us - begin_us, 0, 'X', std::string(args)});
}

void async_span(std::string_view name, const char* category, double begin_us, double end_us, uint64_t id) {
  if (!enabled()) return;
  append({std::string(name), category, begin_us, end_us - begin_us, id, 'A', {}});
}

void name_thread(std::string name) {
  ThreadBuffer& b = this_thread();
  std::lock_guard lock(b.mutex);
  b.name = std::move(name);
}

std::string take_events(int pid, const std::string& process_name) {
  using nlohmann::json;
  std::string out;
  auto add = [&](const json& j) {
    if (!out.empty()) out += ",\n";
    out += j.dump();
  };
  add({{"ph", "M"}, {"pid", pid}, {"tid", 0}, {"name", "process_name"}, {"args", {{"name", process_name}}}});
  add({{"ph", "M"}, {"pid", pid}, {"tid", 0}, {"name", "process_sort_index"}, {"args", {{"sort_index", pid}}}});
  Recorder& r = recorder();
  std::lock_guard lock(r.mutex);
  for (auto& t : r.threads) {
    std::lock_guard tl(t->mutex);
    if (t->events.empty()) continue;
    const std::string thread_name = t->name.empty() ? "thread " + std::to_string(t->tid) : t->name;
    add({{"ph", "M"}, {"pid", pid}, {"tid", t->tid}, {"name", "thread_name"}, {"args", {{"name", thread_name}}}});
    for (const Event& e : t->events) {
      json j = {{"name", e.name}, {"cat", e.category}, {"pid", pid}, {"tid", t->tid}};
      if (e.phase == 'X') {
        j["ph"] = "X";
        j["ts"] = e.ts;
        j["dur"] = e.dur;
        if (!e.args.empty()) j["args"] = json::parse(e.args);
        add(j);
      } else {  // an async pair: the id keeps overlapping operations on separate rows
        j["id"] = e.id;
        j["ph"] = "b";
        j["ts"] = e.ts;
        add(j);
        j["ph"] = "e";
        j["ts"] = e.ts + e.dur;
        add(j);
      }
    }
    t->events.clear();
  }
  return out;
}

}  // namespace tutti::trace
