#include "comm/mpi_runtime.hpp"

#include "tutti/core/trace.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include "comm/collective_args.hpp"

namespace tutti::comm::mpi {
namespace {

constexpr int kAnnounceTag = 1;
// How long the runtime waits at exit for operations still in flight before giving up on them.
constexpr auto kShutdownGrace = std::chrono::seconds(10);

// The shortest sleep between two polls of in-flight operations (TUTTI_COMM_POLL_US overrides).
// libnbc advances a collective's schedule only inside MPI_Test, so this bounds the latency added
// to each of its steps: a 1 MiB all_reduce at 2 ranks measured ~110 us at 5 us (as fast as a
// blocking MPI_Allreduce in the same run), ~220 us at 20 us, ~370 us at 100 us.
std::chrono::microseconds poll_interval_from_env() {
  if (const char* text = std::getenv("TUTTI_COMM_POLL_US")) {
    char* end = nullptr;
    const long us = std::strtol(text, &end, 10);
    if (end != text && *end == '\0' && us >= 0 && us <= 100000) return std::chrono::microseconds(us);
    std::fprintf(stderr, "tutti: ignoring TUTTI_COMM_POLL_US='%s' (expected microseconds, 0 to 100000)\n", text);
  }
  return std::chrono::microseconds(5);
}

// The sleep grows with the time since the last event (an operation starting or completing, a peer
// announcing its arrival): an eighth of it, up to kLongestPoll. So polling adds at most ~1/8 to
// an operation's time, a long transfer costs a few dozen polls rather than thousands, and waiting
// for a late peer costs well under 1% of a core (a steady 20 us poll measured a third of one).
constexpr int kPollFraction = 8;
constexpr auto kLongestPoll = std::chrono::microseconds(1000);

}  // namespace

void throw_mpi_error(int code, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) std::snprintf(text, sizeof text, "MPI error %d", code);
  throw CommError(detail::concat(call, " failed: ", text), file, line);
}

// ---- CommState ------------------------------------------------------------------------------

std::string CommState::rank_name(int r) const {
  if (is_world || r < 0 || r >= static_cast<int>(world_ranks.size())) return "rank " + std::to_string(r);
  return detail::concat("rank ", r, " (world rank ", world_ranks[static_cast<size_t>(r)], ")");
}

std::string CommState::missing_ranks(int64_t seq) {
  std::vector<int> missing;
  {
    std::lock_guard lock(mutex_);
    for (int r = 0; r < size; ++r)
      if (arrived_[static_cast<size_t>(r)] < seq) missing.push_back(r);
  }
  std::ostringstream text;
  for (size_t i = 0; i < missing.size(); ++i) {
    if (i > 0) text << ", ";
    const int r = missing[i];
    text << r;
    if (!is_world) text << " (world " << world_ranks[static_cast<size_t>(r)] << ")";
  }
  if (missing.empty()) return "";
  return (missing.size() == 1 ? "rank " : "ranks ") + text.str();
}

void CommState::record_arrival(int r, int64_t seq) {
  std::lock_guard lock(mutex_);
  int64_t& latest = arrived_[static_cast<size_t>(r)];
  latest = std::max(latest, seq);
}

void CommState::poison(const std::string& reason) {
  std::lock_guard lock(mutex_);
  if (poison_.empty()) poison_ = reason;
  poisoned_ = true;
}

std::string CommState::poison_reason() {
  if (!poisoned_) return "";
  std::lock_guard lock(mutex_);
  return poison_;
}

// ---- Runtime: start and stop ------------------------------------------------------------------

std::shared_ptr<Runtime> Runtime::instance() {
  static std::mutex creation;
  static std::shared_ptr<Runtime> runtime;  // released at exit; communicators may outlive it
  std::lock_guard lock(creation);
  if (!runtime) runtime.reset(new Runtime());
  return runtime;
}

Runtime::Runtime() : poll_interval_(poll_interval_from_env()) {
  std::promise<void> started;
  std::future<void> ready = started.get_future();
  thread_ = std::thread([this, &started] { loop(&started); });
  try {
    ready.get();
  } catch (...) {
    thread_.join();
    throw;
  }
}

Runtime::~Runtime() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void Runtime::init_mpi() {
  int initialized = 0;
  MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) {
    // The program initialised MPI itself; it also finalises it.
    MPI_CHECK(MPI_Query_thread(&thread_level_));
  } else {
    // Open MPI's libnbc runs an in-place MPI_Iallreduce as reduce-to-root plus broadcast, which
    // moves twice the data of a ring: 64 MiB at 2 ranks measured ~2x slower than the blocking
    // MPI_Allreduce. Ask for its ring unless the user chose (read by Open MPI only; other MPIs
    // ignore it).
    setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "ring", /*overwrite=*/0);
    MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &thread_level_));
    owns_mpi_ = true;
  }
  // Errors come back as codes (MPI_CHECK turns them into CommError) on tutti's communicators;
  // a program that initialised MPI itself keeps its own handler on MPI_COMM_WORLD.
  if (owns_mpi_) MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  int* tag_ub = nullptr;
  int found = 0;
  MPI_CHECK(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &found));
  if (found && tag_ub) tag_ub_ = *tag_ub;
}

void Runtime::shutdown_mpi() {
  for (auto& c : comms_) release(*c);
  comms_.clear();
  retiring_ = 0;
  if (!owns_mpi_) return;
  if (!in_flight_.empty()) {
    // MPI_Finalize with operations pending can hang; leaving without it makes the launcher end
    // the job with an error, which is the truth.
    std::fprintf(stderr, "tutti: %zu communication operation(s) still pending at exit; not finalising MPI\n",
                 in_flight_.size());
    return;
  }
  MPI_Finalize();
}

void Runtime::loop(std::promise<void>* started) {
  trace::name_thread("mpi progress");
#if defined(__linux__)
  prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us: the shortest poll sleeps are 5 us, the default slack 50
#endif
  try {
    init_mpi();
  } catch (...) {
    started->set_exception(std::current_exception());
    return;
  }
  started->set_value();

  std::chrono::steady_clock::time_point give_up{};
  auto last_event = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<std::unique_ptr<Op>> fresh;
    bool stop = false;
    {
      std::unique_lock lock(mutex_);
      if (!busy()) wake_.wait(lock, [&] { return !queue_.empty() || stopping_; });
      fresh.swap(queue_);
      stop = stopping_;
    }
    for (auto& op : fresh) start(std::move(op));
    const bool progressed = poll() || !fresh.empty();
    if (stop) {
      if (give_up == std::chrono::steady_clock::time_point{}) give_up = std::chrono::steady_clock::now() + kShutdownGrace;
      if (!busy() || std::chrono::steady_clock::now() > give_up) break;
    }
    const auto now = std::chrono::steady_clock::now();
    if (progressed) last_event = now;
    const auto quiet = std::chrono::duration_cast<std::chrono::microseconds>(now - last_event);
    const auto sleep = std::clamp(quiet / kPollFraction, poll_interval_, std::max(kLongestPoll, poll_interval_));
    if (busy() && !progressed) {
      // Sleep until the next poll, or until a new operation arrives.
      std::unique_lock lock(mutex_);
      wake_.wait_for(lock, sleep, [&] { return !queue_.empty(); });
    }
  }
  shutdown_mpi();
}

bool Runtime::busy() const { return !in_flight_.empty() || outbox_size_ > 0 || retiring_ > 0; }

// ---- Runtime: operations ------------------------------------------------------------------------

void Runtime::submit(std::unique_ptr<Op> op) {
  {
    std::lock_guard lock(mutex_);
    queue_.push_back(std::move(op));
  }
  wake_.notify_one();
}

void Runtime::run(const std::function<void()>& task, Millis timeout) {
  auto op = std::make_unique<Op>();
  op->work = std::make_shared<CompletionWork>(timeout, [](Millis waited) {
    return "an MPI setup call did not return within " + format_duration(waited);
  });
  op->ordered = false;
  op->start = [task](Op&) { task(); };  // a copy: after a timeout the op outlives this call
  auto work = op->work;
  submit(std::move(op));
  work->wait();
}

void Runtime::adopt(const std::shared_ptr<CommState>& state, MPI_Comm comm, MPI_Comm control) {
  CommState& c = *state;
  c.comm = comm;
  c.control = control;
  MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_set_errhandler(control, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(comm, &c.rank));
  MPI_CHECK(MPI_Comm_size(comm, &c.size));
  MPI_Group group = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  MPI_CHECK(MPI_Comm_group(comm, &group));
  MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
  std::vector<int> ranks(static_cast<size_t>(c.size));
  for (int r = 0; r < c.size; ++r) ranks[static_cast<size_t>(r)] = r;
  c.world_ranks.assign(static_cast<size_t>(c.size), -1);
  MPI_CHECK(MPI_Group_translate_ranks(group, c.size, ranks.data(), world, c.world_ranks.data()));
  MPI_Group_free(&group);
  MPI_Group_free(&world);
  int world_size = 0;
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size));
  c.is_world = c.size == world_size && c.world_ranks == ranks;
  {
    std::lock_guard lock(c.mutex_);
    c.arrived_.assign(static_cast<size_t>(c.size), 0);
  }
  c.inbox.assign(static_cast<size_t>(c.size), 0);
  c.inbox_requests.assign(static_cast<size_t>(c.size), MPI_REQUEST_NULL);
  for (int r = 0; r < c.size; ++r)
    if (r != c.rank)
      MPI_CHECK(MPI_Irecv(&c.inbox[size_t(r)], 1, MPI_INT64_T, r, kAnnounceTag, c.control, &c.inbox_requests[size_t(r)]));
  comms_.push_back(state);
}

void Runtime::retire(std::shared_ptr<CommState> state) {
  auto op = std::make_unique<Op>();
  op->ordered = false;
  op->start = [this, state](Op&) {
    state->retired = true;
    ++retiring_;
  };
  submit(std::move(op));
}

void Runtime::announce(CommState& c, int64_t seq) {
  c.record_arrival(c.rank, seq);
  c.last_seq = seq;
  for (int r = 0; r < c.size; ++r) {
    if (r == c.rank) continue;
    CommState::Announcement& a = c.outbox.emplace_back();
    a.seq = seq;
    ++outbox_size_;
    MPI_CHECK(MPI_Isend(&a.seq, 1, MPI_INT64_T, r, kAnnounceTag, c.control, &a.request));
  }
}

void Runtime::start(std::unique_ptr<Op> op) {
  try {
    if (op->comm) {
      ++op->comm->in_flight;
      if (op->seq > 0) announce(*op->comm, op->seq);
    }
    if (op->start) op->start(*op);
  } catch (...) {
    op->error = std::current_exception();
  }
  in_flight_.push_back(std::move(op));
}

// Whether every request of `op` has completed (errors are kept in the op).
bool Runtime::test_transfer(Op& op) {
  if (op.transferred) return true;
  try {
    int done = 0;
    const int n = static_cast<int>(op.requests.size());
    if (op.expected_counts.empty()) {
      MPI_CHECK(MPI_Testall(n, op.requests.data(), &done, MPI_STATUSES_IGNORE));
    } else {
      std::vector<MPI_Status> statuses(op.requests.size());
      MPI_CHECK(MPI_Testall(n, op.requests.data(), &done, statuses.data()));
      for (size_t i = 0; done && i < statuses.size(); ++i) {
        int got = 0;
        MPI_CHECK(MPI_Get_count(&statuses[i], op.type, &got));
        TUTTI_CHECK_AS(CommError, got == op.expected_counts[i], "recv: expected ", op.expected_counts[i],
                       " elements but the matching send carried ", got);
      }
    }
    op.transferred = done != 0;
  } catch (...) {
    if (!op.error) op.error = std::current_exception();
    op.transferred = true;  // a failed request is complete; its partners see the failure as theirs
  }
  return op.transferred;
}

bool Runtime::poll() {
  bool progressed = false;
  for (auto& c : comms_) progressed |= drain_announcements(*c);
  for (auto& c : comms_) {
    for (auto it = c->outbox.begin(); it != c->outbox.end();) {
      int done = 0;
      if (MPI_Test(&it->request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done) {
        it = c->outbox.erase(it);
        --outbox_size_;
      } else {
        ++it;
      }
    }
  }
  // Ordered operations of one communicator complete in issue order: a finished one waits for its
  // unfinished predecessors (few communicators, so a short list of the blocked ones).
  std::vector<CommState*> blocked;
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    Op& op = **it;
    const bool waits = op.ordered && op.comm &&
                       std::find(blocked.begin(), blocked.end(), op.comm.get()) != blocked.end();
    if (!test_transfer(op) || waits) {
      if (op.ordered && op.comm) blocked.push_back(op.comm.get());
      ++it;
      continue;
    }
    if (op.finish && !op.error) {
      try {
        op.finish(op);
      } catch (...) {
        op.error = std::current_exception();
      }
    }
    if (op.comm) {
      --op.comm->in_flight;
      if (op.error) {
        try {
          std::rethrow_exception(op.error);
        } catch (const std::exception& e) {
          op.comm->poison(e.what());
        }
      }
    }
    if (op.work) op.work->finish(op.error);
    it = in_flight_.erase(it);
    progressed = true;
  }
  // Free the handles of communicators that are gone and idle, once every peer's announcement of
  // the last collective has arrived: one arriving after the free would wait in Open MPI's queue
  // for a communicator that no longer exists, and be handed to the next communicator that reuses
  // its context id (a root finishes a broadcast before the others have even started it).
  for (auto it = comms_.begin(); it != comms_.end();) {
    if ((*it)->retired && (*it)->in_flight == 0 && (*it)->missing_ranks((*it)->last_seq).empty()) {
      --retiring_;
      release(**it);
      it = comms_.erase(it);
    } else {
      ++it;
    }
  }
  return progressed;
}

bool Runtime::drain_announcements(CommState& c) {
  if (c.size <= 1 || c.comm == MPI_COMM_NULL) return false;
  std::vector<int> indices(static_cast<size_t>(c.size));
  for (bool any = false;; any = true) {
    int completed = 0;
    if (MPI_Testsome(c.size, c.inbox_requests.data(), &completed, indices.data(), MPI_STATUSES_IGNORE) != MPI_SUCCESS ||
        completed == MPI_UNDEFINED || completed == 0)
      return any;
    for (int i = 0; i < completed; ++i) {
      const int r = indices[static_cast<size_t>(i)];
      c.record_arrival(r, c.inbox[static_cast<size_t>(r)]);
      MPI_Irecv(&c.inbox[size_t(r)], 1, MPI_INT64_T, r, kAnnounceTag, c.control, &c.inbox_requests[size_t(r)]);
    }
  }
}

void Runtime::release(CommState& c) {
  if (c.comm == MPI_COMM_NULL) return;
  for (MPI_Request& request : c.inbox_requests) {
    if (request == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&request);
    MPI_Wait(&request, MPI_STATUS_IGNORE);
  }
  // Announcements are 8-byte eager sends: complete as soon as they are pushed out.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  while (!c.outbox.empty() && std::chrono::steady_clock::now() < deadline) {
    int done = 0;
    if (MPI_Test(&c.outbox.front().request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done) {
      c.outbox.pop_front();
      --outbox_size_;
    }
  }
  // A send still pending after that (its peer is gone) keeps its 8-byte buffer forever: freeing
  // the request lets MPI finish it, and the list nodes are deliberately leaked for it to write.
  for (auto& a : c.outbox) MPI_Request_free(&a.request);
  outbox_size_ -= c.outbox.size();
  if (!c.outbox.empty()) new std::list<CommState::Announcement>(std::move(c.outbox));
  c.outbox.clear();
  MPI_Comm_free(&c.comm);
  MPI_Comm_free(&c.control);
}

}  // namespace tutti::comm::mpi
