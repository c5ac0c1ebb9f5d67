// The training workflow's background tasks: batches prepared ahead, checkpoints written, and
// evaluations run while the training thread goes on, on one oneTBB arena.
//
// Sharing the cores: the training thread keeps its OpenMP team of `threads` kernel threads. The
// arena has a few TBB workers; loading and checkpoint writing are mostly memory copies and file
// I/O, and a task that computes (an evaluation) sets its own OpenMP team size (set_num_threads is
// per calling thread). docs/tasks.md gives the measurements behind the defaults.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include "comm/work.hpp"
#include "tutti/data/token_dataset.hpp"
#include "tutti/train/run_dir.hpp"

namespace tutti::train {

// A task's completion is the project's one completion mechanism, a Work: wait() blocks until the
// task ran and rethrows its error, is_completed() polls.
using Task = comm::CompletionWork;

// Waits for `task`, if any, dropping its error: for destructors, whose owner is going (often
// because of an error of its own, the one to report) while the task may still use its members.
void wait_quietly(const std::shared_ptr<Task>& task);

// Background tasks on a oneTBB arena of `workers` threads (0: none; run() then runs the task on
// the calling thread before returning: the serial workflow, for comparison).
class Tasks {
 public:
  explicit Tasks(int workers);
  ~Tasks();  // waits for every task
  Tasks(const Tasks&) = delete;
  Tasks& operator=(const Tasks&) = delete;

  // Runs `fn` with `kernel_threads` OpenMP threads for its kernels, as a span `name` of `category`
  // in a trace, in the background (or, when `background` is false, here and now). The handle's
  // wait() rethrows what fn threw.
  std::shared_ptr<Task> run(std::string name, const char* category, int kernel_threads, std::function<void()> fn,
                            bool background = true);
  bool background() const { return workers_ > 0; }

 private:
  int workers_;
  std::unique_ptr<tbb::global_control> allow_;  // lets the arena have its workers beside the training thread
  std::unique_ptr<tbb::task_arena> arena_;
  std::vector<std::shared_ptr<Task>> live_;  // enqueued and maybe not finished: waited for at the end
};

// Each step's batches, prepared ahead on the tasks in chunks of `chunk` steps: the next chunk
// starts when the training thread takes the first batch of the current one, so the arena wakes
// once per chunk, not once per step (a waking thread takes a core from the kernels for a moment).
// A data position outside what is prepared (after a rollback) starts again from it. Batches
// depend only on (seed, step), so the losses are those of preparing each in turn.
class BatchLoader {
 public:
  using Make = std::function<std::vector<data::Batch>(int64_t step)>;
  BatchLoader(Tasks& tasks, Make make, int chunk = 8);
  ~BatchLoader();
  // The batches of `step`; the time spent waiting for them is the step's data wait.
  std::vector<data::Batch> take(int64_t step);
  double last_wait_seconds() const { return last_wait_; }

 private:
  struct Chunk {
    int64_t first, count;
    std::shared_ptr<Task> task;
    std::shared_ptr<std::vector<std::vector<data::Batch>>> steps;
  };
  void schedule(int64_t first);

  Tasks& tasks_;
  Make make_;
  int chunk_;
  std::deque<Chunk> queue_;
  int64_t next_ = -1;  // the step take() expects next
  double last_wait_ = 0.0;
};

// Writes checkpoints as background tasks, one at a time: submit() waits for the previous write
// (rethrowing its error) and starts the next. The destructor waits too.
class CheckpointWriter {
 public:
  CheckpointWriter(Tasks& tasks, std::string run_dir, int keep);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  void submit(CheckpointSnapshot snapshot);
  // Waits for the write in flight; returns the newest checkpoint written ("" when none).
  std::string wait();

  struct Timing {
    int64_t step = -1;     // the checkpoint last written (-1: none yet)
    int64_t bytes = 0;     // its files
    double seconds = 0.0;  // the background write, from submit to rename and `latest`
  };
  // The last completed write (call after wait() or submit(), which wait).
  Timing last_timing() const { return timing_; }

 private:
  Tasks& tasks_;
  std::string run_dir_;
  int keep_;
  std::shared_ptr<Task> task_;
  std::string last_;
  Timing timing_;
};

}  // namespace tutti::train
