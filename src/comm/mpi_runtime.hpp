// The process's MPI: initialisation, finalisation and the one progress thread that makes every
// MPI call (Horovod's design). Callers enqueue operations; the thread starts each as a
// nonblocking MPI call, polls them, and completes their Work handles. Because only this thread
// touches MPI, any thread level works (even MPI_THREAD_FUNNELED: the thread also calls
// MPI_Init_thread and MPI_Finalize), and a gradient all-reduce progresses while the caller's
// thread computes the rest of backward. With nothing in flight the thread sleeps on a condition
// variable; with operations in flight it polls, sleeping between polls an eighth of the time
// since the last event (5 us to 1 ms), so polling adds little latency and burns little CPU.
//
// Arrival tracking, for timeout messages: when a collective #N starts on a rank, that rank sends
// N (8 bytes) to every other rank of the communicator on a private duplicate ("control"), where
// one receive per peer is always posted. A caller whose wait expires reports the ranks whose
// latest announcement is below N. A communicator is freed only once every peer's announcement
// of its last collective has arrived, so none is left over for a later communicator.
#pragma once
#include <mpi.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/work.hpp"

namespace tutti::comm::mpi {

[[noreturn]] void throw_mpi_error(int code, const char* call, const char* file, int line);
// MPI_CHECK(MPI_Isend(...)) throws CommError with MPI's message, the call and file:line.
#define MPI_CHECK(call)                                                                  \
  do {                                                                                   \
    const int tutti_mpi_rc_ = (call);                                                    \
    if (tutti_mpi_rc_ != MPI_SUCCESS)                                                    \
      ::tutti::comm::mpi::throw_mpi_error(tutti_mpi_rc_, #call, __FILE__, __LINE__);     \
  } while (0)

// One communicator's MPI state. The handles and the announcement requests belong to the progress
// thread; the arrivals and the poison are shared with callers under `mutex_`.
struct CommState {
  MPI_Comm comm = MPI_COMM_NULL;     // collectives and point-to-point data
  MPI_Comm control = MPI_COMM_NULL;  // arrival announcements, and the parent of splits
  int rank = 0, size = 1;
  std::vector<int> world_ranks;      // rank of this communicator -> rank in MPI_COMM_WORLD
  bool is_world = false;             // same ranks in the same order as MPI_COMM_WORLD

  // "rank 3" or, in a sub-group, "rank 1 (world rank 3)".
  std::string rank_name(int r) const;
  // The ranks whose announcement of collective `seq` has not been seen, as text ("" if none).
  std::string missing_ranks(int64_t seq);
  void record_arrival(int r, int64_t seq);
  // After a timeout or a failure, every later operation fails at once with this reason.
  void poison(const std::string& reason);
  std::string poison_reason();  // "" while healthy

  // Progress-thread state.
  struct Announcement {
    MPI_Request request = MPI_REQUEST_NULL;
    int64_t seq = 0;
  };
  std::vector<MPI_Request> inbox_requests;  // one receive per peer; MPI_REQUEST_NULL for self
  std::vector<int64_t> inbox;
  std::list<Announcement> outbox;           // sends not yet complete (stable addresses)
  int in_flight = 0;
  int64_t last_seq = 0;  // the last collective started here
  bool retired = false;

 private:
  std::mutex mutex_;
  std::vector<int64_t> arrived_;  // latest collective each rank announced
  std::string poison_;
  std::atomic<bool> poisoned_{false};
  friend class Runtime;
};

// One queued operation. `start` runs on the progress thread and posts nonblocking calls into
// `requests`; `finish`, if set, runs there after they complete and before the Work does.
struct Op {
  std::shared_ptr<CommState> comm;
  std::shared_ptr<CompletionWork> work;
  int64_t seq = 0;            // collective sequence number (1, 2, ...); 0: not a collective
  bool ordered = true;        // completes only after the communicator's earlier ordered ops
  std::function<void(Op&)> start;
  std::function<void(Op&)> finish;
  // Receives: expected element count of each request, checked against its status.
  std::vector<int64_t> expected_counts;
  MPI_Datatype type = MPI_DATATYPE_NULL;

  // Storage that must outlive the nonblocking calls.
  std::vector<MPI_Request> requests;
  std::vector<int> counts, displs;
  std::vector<unsigned char> scratch;

  bool transferred = false;
  std::exception_ptr error;
};

class Runtime {
 public:
  // The process's runtime, initialising MPI on first use. Communicators hold a reference, so
  // MPI_Finalize runs after the last of them is gone (and at exit).
  static std::shared_ptr<Runtime> instance();
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  void submit(std::unique_ptr<Op> op);
  // Runs `task` on the progress thread and waits for it (rethrowing its error).
  void run(const std::function<void()>& task, Millis timeout);
  // Progress-thread only: fills `state` for `comm` and `control` (both owned from now on), posts
  // its announcement receives and starts tracking it.
  void adopt(const std::shared_ptr<CommState>& state, MPI_Comm comm, MPI_Comm control);
  // The communicator is gone: free its handles once its operations are done.
  void retire(std::shared_ptr<CommState> state);

  int tag_upper_bound() const { return tag_ub_; }

 private:
  Runtime();
  void loop(std::promise<void>* started);
  void init_mpi();
  void shutdown_mpi();
  void start(std::unique_ptr<Op> op);
  bool poll();  // whether anything happened (an announcement, a completion)
  bool test_transfer(Op& op);
  bool drain_announcements(CommState& c);  // whether any arrived
  void announce(CommState& c, int64_t seq);
  void release(CommState& c);
  bool busy() const;

  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Op>> queue_;  // under mutex_
  bool stopping_ = false;                   // under mutex_

  // Progress-thread state.
  std::list<std::unique_ptr<Op>> in_flight_;
  std::vector<std::shared_ptr<CommState>> comms_;
  size_t outbox_size_ = 0;
  int retiring_ = 0;  // communicators gone but not yet released
  bool owns_mpi_ = false;
  int thread_level_ = 0;
  int tag_ub_ = 32767;
  std::chrono::microseconds poll_interval_;
};

}  // namespace tutti::comm::mpi
