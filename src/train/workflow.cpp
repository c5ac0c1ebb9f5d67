#include "train/workflow.hpp"

#include <chrono>
#include <filesystem>

#include "tutti/core/threads.hpp"
#include "tutti/core/trace.hpp"

namespace fs = std::filesystem;

namespace tutti::train {

// ---- Task ---------------------------------------------------------------------------------------

void wait_quietly(const std::shared_ptr<Task>& task) {
  if (!task) return;
  try {
    task->wait();
  } catch (...) {
  }
}

// ---- Tasks --------------------------------------------------------------------------------------

Tasks::Tasks(int workers) : workers_(workers) {
  if (workers_ == 0) return;
  // TBB's default allows one worker less than the cores; the arena's workers mostly wait on
  // files and memory, so they may exist beside the training thread's full OpenMP team.
  const size_t allowed = std::max<size_t>(size_t(workers_) + 1,
                                          tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism));
  allow_ = std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism, allowed);
  arena_ = std::make_unique<tbb::task_arena>(workers_, 0);  // no slot reserved: the training thread never joins
}

Tasks::~Tasks() {
  for (const auto& task : live_) wait_quietly(task);
}

std::shared_ptr<Task> Tasks::run(std::string name, const char* category, int kernel_threads, std::function<void()> fn,
                                 bool background) {
  auto task = std::make_shared<Task>(comm::Millis::max(), nullptr);
  auto body = [task, name = std::move(name), category, kernel_threads, fn = std::move(fn)] {
    std::exception_ptr error;
    const int saved = num_threads();
    set_num_threads(kernel_threads);
    try {
      const trace::Scope span(name, category);
      fn();
    } catch (...) {
      error = std::current_exception();
    }
    set_num_threads(saved);
    task->finish(error);
  };
  if (!arena_ || !background) {
    body();
    return task;
  }
  std::erase_if(live_, [](const std::shared_ptr<Task>& t) { return t->is_completed(); });
  live_.push_back(task);
  // enqueue, not execute: the training thread never joins the arena, so it never waits for a
  // slot while the workers are busy.
  arena_->enqueue([body = std::move(body)] {
    thread_local const bool named = (trace::name_thread("tbb worker"), true);
    (void)named;
    body();
  });
  return task;
}

// ---- BatchLoader --------------------------------------------------------------------------------

BatchLoader::BatchLoader(Tasks& tasks, Make make, int chunk) : tasks_(tasks), make_(std::move(make)), chunk_(chunk) {}

BatchLoader::~BatchLoader() {
  for (const Chunk& c : queue_) wait_quietly(c.task);  // the tasks use make_: they must end first
}

void BatchLoader::schedule(int64_t first) {
  const int64_t count = tasks_.background() ? chunk_ : 1;  // serial: each step's batches when asked
  auto steps = std::make_shared<std::vector<std::vector<data::Batch>>>(size_t(count));
  auto task = tasks_.run("load steps " + std::to_string(first + 1) + "-" + std::to_string(first + count),
                         trace::cat::data, 1, [this, first, count, steps] {
                           for (int64_t i = 0; i < count; ++i) (*steps)[size_t(i)] = make_(first + i);
                         });
  queue_.push_back({first, count, std::move(task), std::move(steps)});
}

std::vector<data::Batch> BatchLoader::take(int64_t step) {
  const auto t0 = std::chrono::steady_clock::now();  // serial: the loading itself is the wait
  if (step != next_) {  // a jump (a rollback): what was prepared is for other steps
    for (Chunk& c : queue_) c.task->wait();
    queue_.clear();
  }
  next_ = step + 1;
  if (queue_.empty()) schedule(step);
  Chunk& current = queue_.front();
  if (tasks_.background() && step == current.first && queue_.size() == 1) schedule(current.first + current.count);
  {
    const trace::Scope span("data wait", trace::cat::data, !current.task->is_completed());
    current.task->wait();
  }
  last_wait_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<data::Batch> batches = std::move((*current.steps)[size_t(step - current.first)]);
  if (step == current.first + current.count - 1) queue_.pop_front();
  return batches;
}

// ---- CheckpointWriter ---------------------------------------------------------------------------

CheckpointWriter::CheckpointWriter(Tasks& tasks, std::string run_dir, int keep)
    : tasks_(tasks), run_dir_(std::move(run_dir)), keep_(keep) {}

CheckpointWriter::~CheckpointWriter() { wait_quietly(task_); }

void CheckpointWriter::submit(CheckpointSnapshot snap) {
  wait();
  const std::string name = "write checkpoint " + std::to_string(snap.state.step);
  task_ = tasks_.run(name, trace::cat::checkpoint, 1, [this, snap = std::move(snap)] {
    const auto t0 = std::chrono::steady_clock::now();
    last_ = save_checkpoint(run_dir_, snap, keep_);
    if (snap.shard > 0) return;  // shard 0 commits, renaming the directory: it times the whole save
    Timing t{snap.state.step, 0, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
    for (const auto& e : fs::directory_iterator(last_))
      if (e.is_regular_file()) t.bytes += static_cast<int64_t>(e.file_size());
    timing_ = t;
  });
}

std::string CheckpointWriter::wait() {
  if (task_) std::exchange(task_, nullptr)->wait();
  return last_;
}

}  // namespace tutti::train
