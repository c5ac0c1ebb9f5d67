// The nccl backend (docs/nccl.md). A communicator holds two NCCL communicators, "lanes", each
// with its own CUDA stream: one carries the collectives, the other the point-to-point messages,
// so a message that waits for its peer never holds back a collective, nor the reverse.
//
// NCCL runs the operations of one NCCL communicator one after another, and a send completes only
// when its receive has started: two ranks that each send to the other and then receive would wait
// for each other forever, where MPI's buffered sends go through. So messages are batched: send and
// recv only record the operation, and the first wait() or is_completed() on a message (or the
// next collective) submits all the batched ones as one NCCL group, which NCCL starts together.
//
// Every NCCL communicator here is nonblocking (ncclConfig_t::blocking = 0): a call that needs the
// peers (joining, splitting, and the first operation of a kind, which connects the ranks) answers
// ncclInProgress at once and is polled with a deadline, so a rank that never comes produces
// tutti::Timeout, never a hang; until NCCL has put such an operation on its stream, the lane's
// later ones wait in a queue and the issuing thread goes on. Each operation records an event on
// the CUDA backend's stream of this GPU when issued; the lane's stream waits for it (the operation
// sees what was computed before it was issued), and once NCCL has put the operation on the stream
// the Work's event is recorded after it; Work::wait polls that event.
#include "tutti/comm/nccl.hpp"

#if TUTTI_WITH_NCCL

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <atomic>
#include <exception>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "comm/collective_args.hpp"
#include "tutti/core/trace.hpp"

namespace tutti::comm {
namespace nccl {
namespace {

using Clock = std::chrono::steady_clock;
using ::tutti::detail::concat;

static_assert(sizeof(ncclUniqueId) == sizeof(NcclId::bytes), "NcclId must hold an ncclUniqueId");

[[noreturn]] void fail_nccl(ncclResult_t result, const char* call, const char* file, int line) {
  const char* last = ncclGetLastError(nullptr);
  ::tutti::detail::fail<CommError>(file, line, "NCCL error at ", file, ":", line, ": ", call, " failed: ",
                                   ncclGetErrorString(result),
                                   last != nullptr && *last != '\0' ? concat(" (", last, ")") : std::string());
}

// Every NCCL communicator here is nonblocking, so ncclInProgress is not a failure: the call goes
// on in the background and wait_ready() polls it.
#define NCCL_CHECK(call)                                                                     \
  do {                                                                                       \
    const ncclResult_t tutti_nccl_result_ = (call);                                          \
    if (tutti_nccl_result_ != ncclSuccess && tutti_nccl_result_ != ncclInProgress)           \
      ::tutti::comm::nccl::fail_nccl(tutti_nccl_result_, #call, __FILE__, __LINE__);         \
  } while (0)

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// NVLink multicast (NVLS) can take a shared host's GPUs out of service; it stays off unless the
// user asked for it. Once per process, before NCCL first reads its environment.
void keep_nvlink_multicast_off() {
  static const bool done = [] {
    setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    return true;
  }();
  (void)done;
}

void activate(int device) { CUDA_CHECK(cudaSetDevice(device)); }

ncclDataType_t nccl_type(ElemType type) {
  switch (type) {
    case ElemType::f32: return ncclFloat32;
    case ElemType::f64: return ncclFloat64;
    case ElemType::i32: return ncclInt32;
    case ElemType::i64: return ncclInt64;
    case ElemType::u8: return ncclUint8;
  }
  TUTTI_FAIL(InvalidArgument, "unknown element type ", static_cast<int>(type));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  TUTTI_FAIL(InvalidArgument, "unknown reduce op ", static_cast<int>(op));
}

char* at(const Buffer& b, int64_t element) {
  return static_cast<char*>(b.data) + element * static_cast<int64_t>(elem_size(b.type));
}
size_t bytes_of(const Buffer& b) { return size_t(b.count) * elem_size(b.type); }

// NCCL reads and writes GPU memory only: a host pointer would fault on the device, or worse.
void check_on_device(const char* what, const char* role, const Buffer& b, int device) {
  if (b.count == 0) return;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, b.data) != cudaSuccess) {
    cudaGetLastError();  // an unknown pointer is not a sticky error
    attr.type = cudaMemoryTypeUnregistered;
  }
  TUTTI_CHECK_AS(InvalidArgument, attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, what,
                 ": the ", role, " buffer ", b.data, " (", b.count, " ", elem_name(b.type),
                 ") is host memory; the nccl backend needs memory of cuda:", device);
  TUTTI_CHECK_AS(InvalidArgument, attr.device == device, what, ": the ", role, " buffer is memory of cuda:",
                 attr.device, " but this communicator's GPU is cuda:", device);
}

// Polls before spinning hard: a few yields (small operations finish in microseconds), then sleeps
// that double up to 1 ms.
class Backoff {
 public:
  void pause() {
    if (spins_ < 64) {
      ++spins_;
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, std::chrono::microseconds(1000));
  }

 private:
  int spins_ = 0;
  std::chrono::microseconds sleep_{5};
};

Clock::time_point deadline_after(Millis timeout) {
  // Clock::now() + Millis::max() overflows; a century is "forever" here.
  return Clock::now() + std::clamp(timeout, Millis(0), Millis(std::chrono::hours(24 * 365 * 100)));
}

// ---- owned resources -----------------------------------------------------------------------------

class CudaStream {
 public:
  CudaStream() { CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)); }
  ~CudaStream() { cudaStreamDestroy(stream_); }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class CudaEvent {
 public:
  CudaEvent() { CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~CudaEvent() { cudaEventDestroy(event_); }  // legal while pending: freed once it completes
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// One ncclComm_t. Closed by State::close (finalize, then destroy) or aborted; the destructor
// aborts one still open, which never waits for a peer.
class NcclComm {
 public:
  NcclComm() = default;
  explicit NcclComm(ncclComm_t comm) : comm_(comm) {}
  ~NcclComm() { abort(); }
  NcclComm(NcclComm&& other) noexcept : comm_(std::exchange(other.comm_, nullptr)) {}
  NcclComm& operator=(NcclComm&& other) noexcept {
    if (this != &other) {
      abort();
      comm_ = std::exchange(other.comm_, nullptr);
    }
    return *this;
  }
  ncclComm_t get() const { return comm_; }
  void abort() {
    if (comm_ != nullptr) ncclCommAbort(std::exchange(comm_, nullptr));
  }
  void destroy() {
    if (comm_ != nullptr) ncclCommDestroy(std::exchange(comm_, nullptr));
  }

 private:
  ncclComm_t comm_ = nullptr;
};

// Polls nonblocking communicators until none is in progress. False at the deadline; throws
// CommError when one failed.
bool wait_ready(std::initializer_list<ncclComm_t> comms, Clock::time_point deadline) {
  Backoff backoff;
  for (;;) {
    bool busy = false;
    for (ncclComm_t comm : comms) {
      if (comm == nullptr) continue;
      ncclResult_t state = ncclSuccess;
      NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
      if (state == ncclInProgress) busy = true;
      else if (state != ncclSuccess) fail_nccl(state, "an asynchronous NCCL operation", __FILE__, __LINE__);
    }
    if (!busy) return true;
    if (Clock::now() >= deadline) return false;
    backoff.pause();
  }
}

// ncclCommSplit of a nonblocking communicator. NCCL makes the child in the background and writes
// its handle only then (the parent shows ncclInProgress meanwhile): the handle's storage must
// outlive that, and is read once the parent is ready. Null when the deadline passed (the storage
// is then left to NCCL, which may still write it).
NcclComm split_comm(ncclComm_t parent, int color, int key, Clock::time_point deadline) {
  ncclConfig_t config = nonblocking_config();
  auto child = std::make_unique<ncclComm_t>(nullptr);
  const ncclResult_t result = ncclCommSplit(parent, color, key, child.get(), &config);
  if (result != ncclSuccess && result != ncclInProgress) fail_nccl(result, "ncclCommSplit", __FILE__, __LINE__);
  if (!wait_ready({parent}, deadline)) {
    (void)child.release();
    return NcclComm();
  }
  NcclComm owned(*child);
  TUTTI_CHECK_AS(CommError, owned.get() != nullptr, "ncclCommSplit made no communicator for color ", color);
  if (!wait_ready({owned.get()}, deadline)) return NcclComm();
  return owned;
}

// ---- the state every Work of a communicator shares -----------------------------------------------

enum LaneKind : int { kCollectives = 0, kMessages = 1 };
constexpr int kLanes = 2;
constexpr const char* kLaneNames[] = {"collectives", "messages"};

class NcclWork;
struct Lane;
// CUDA calls that follow a submission's NCCL calls on the lane's stream (a copy out of scratch
// memory, its release). Run once NCCL has put the submission on the stream.
using AfterNccl = std::function<void(cudaStream_t)>;
// A submission's NCCL calls (and the CUDA calls before them), made when the lane is free.
using NcclCalls = std::function<AfterNccl(Lane&)>;

// What goes to NCCL in one go: a collective, or a batch of messages in one NCCL group.
struct Submission {
  std::vector<std::shared_ptr<NcclWork>> works;
  NcclCalls calls;
};

// An NCCL communicator, the stream its operations run on, the submission NCCL may still be
// putting on that stream (the first of a kind connects the ranks first, which needs the peers to
// reach it too), and the submissions after it. No call is made on the communicator or the stream
// while one is pending: the next ones wait here, in order, and the issuing thread goes on.
struct Lane {
  CudaStream stream;
  std::vector<std::shared_ptr<NcclWork>> pending;
  AfterNccl after;
  std::deque<Submission> queue;
  NcclComm comm;  // last: aborted before its stream goes
};

class State {
 public:
  State(int rank, int size, int device, std::array<NcclComm, kLanes> comms) : rank(rank), size(size), device(device) {
    for (size_t i = 0; i < lanes.size(); ++i) lanes[i].comm = std::move(comms[i]);
    CUDA_CHECK(cudaMalloc(&barrier_word, sizeof(int32_t)));
  }
  ~State() {
    cudaSetDevice(device);
    cudaFree(barrier_word);  // the lanes abort whatever close() did not close
  }
  State(const State&) = delete;
  State& operator=(const State&) = delete;

  std::string rank_name() const { return concat("rank ", rank, " of ", size, " (cuda:", device, ")"); }

  // Everything below with the mutex held.

  // Queues a submission on a lane, then progress().
  void submit(LaneKind lane, Submission submission);
  // Adds a message to the batch that the next flush_messages() submits.
  void add_message(std::shared_ptr<NcclWork> work, std::function<void(Lane&)> call);
  // Submits the batched messages as one NCCL group (NCCL starts them together, so two ranks that
  // both send before they receive do not wait for each other).
  void flush_messages();
  // Moves the lane on as far as NCCL allows: once the pending submission is on the stream, the
  // CUDA calls after it and its events; then the next queued submission's NCCL calls. True when
  // nothing is pending; throws CommError if NCCL failed.
  bool progress(LaneKind lane);
  // flush_messages(), then progress() until the lane is idle; at `timeout`, aborts and throws
  // Timeout.
  void finish_pending(LaneKind lane, Millis timeout);
  // Marks every operation still in flight as failed, then aborts the NCCL communicators (their
  // kernels stop waiting for peers). Later operations throw CommError naming `reason`.
  void abort(const std::string& reason);
  // The first asynchronous NCCL error of a lane ("" when none).
  std::string async_error(LaneKind lane);
  // Finalizes and destroys the NCCL communicators once their operations have completed; aborts
  // them after `timeout` (a peer gone, an operation never matched). Never throws.
  void close(Millis timeout);

  const int rank, size, device;
  std::array<Lane, kLanes> lanes;
  int32_t* barrier_word = nullptr;  // device memory: the barrier's one-element all-reduce
  std::mutex mutex;                 // NCCL calls on the lanes, the queues and the batch, `failure`
  std::string failure;              // why the communicator stopped ("" while it works)

 private:
  std::vector<std::weak_ptr<NcclWork>> in_flight_;
  Submission batch_;  // messages issued since the last flush
  std::vector<std::function<void(Lane&)>> batch_calls_;
};

// ---- Work: an event recorded after the operation ----------------------------------------------

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<State> state, LaneKind lane, std::string description, bool collective,
           Millis default_timeout)
      : state_(std::move(state)), lane_(lane), description_(std::move(description)), collective_(collective),
        default_timeout_(default_timeout) {}

  const std::string& description() const { return description_; }
  cudaEvent_t ready_event() const { return ready_event_.get(); }  // on the compute stream, at issue
  cudaEvent_t event() const { return done_event_.get(); }
  // Called by State::progress once the event is recorded.
  void mark_on_stream() { on_stream_ = true; }

  void wait() override { wait(default_timeout_); }

  void wait(Millis timeout) override {
    const Clock::time_point deadline = deadline_after(timeout);
    Backoff backoff;
    // The host blocked until the GPU finished the transfer: exposed communication in a trace.
    const trace::Scope blocked("wait " + description_, trace::cat::comm, trace::enabled() && !poll());
    while (!poll()) {
      if (Clock::now() >= deadline) {
        const std::string message = timeout_message(timeout);
        set_error(std::make_exception_ptr(Timeout(message, __FILE__, __LINE__)));
        std::lock_guard lock(state_->mutex);
        state_->abort(message);  // so no rank waits forever on the operations behind this one
        break;
      }
      backoff.pause();
    }
    std::lock_guard lock(mutex_);
    if (error_) std::rethrow_exception(error_);
  }

  bool is_completed() override { return poll(); }

  // Called by State::abort (state mutex held): an operation not yet finished failed.
  void fail_if_pending(const std::string& reason) {
    std::lock_guard lock(mutex_);
    if (done_ || error_) return;
    if (on_stream_) {  // an event never recorded would read as complete
      const cudaError_t query = cudaEventQuery(done_event_.get());
      cudaGetLastError();
      if (query == cudaSuccess) {
        done_ = true;
        return;
      }
    }
    error_ = std::make_exception_ptr(
        CommError(concat(description_, " did not complete: the communicator was aborted (", reason, ")")));
  }

  // Whether the operation has finished, successfully or not, as far as known without polling.
  bool finished() {
    std::lock_guard lock(mutex_);
    return done_ || error_ != nullptr;
  }

 private:
  // True once the operation has finished, successfully or not.
  bool poll() {
    if (finished()) return true;
    // Moves this operation's lane on (a batched message is submitted now), and looks for an
    // asynchronous NCCL error (a failed peer or network shows so, not as a completed event). The
    // state's mutex may be held a while by an operation being connected: try again next time.
    {
      std::unique_lock lock(state_->mutex, std::try_to_lock);
      if (!lock.owns_lock()) return false;
      try {
        if (!on_stream_) {
          if (lane_ == kMessages) state_->flush_messages();
          if (!state_->progress(lane_)) return false;
        }
        const std::string error = state_->async_error(lane_);
        if (!error.empty()) TUTTI_FAIL(CommError, error);
      } catch (const std::exception& e) {
        const std::string message = concat(description_, " failed on ", state_->rank_name(), ": ", e.what());
        set_error(std::make_exception_ptr(CommError(message, __FILE__, __LINE__)));
        state_->abort(message);
        return true;
      }
      if (!on_stream_) return finished();  // aborted meanwhile
    }
    std::lock_guard lock(mutex_);
    if (done_ || error_) return true;
    const cudaError_t query = cudaEventQuery(done_event_.get());
    cudaGetLastError();  // "not ready" is recorded as the thread's last error: clear it
    if (query == cudaSuccess) done_ = true;
    else if (query != cudaErrorNotReady)
      error_ = std::make_exception_ptr(CommError(concat(description_, " failed on ", state_->rank_name(),
                                                        ": CUDA error ", cudaGetErrorName(query), " (",
                                                        cudaGetErrorString(query), ")")));
    return done_ || error_;
  }

  void set_error(std::exception_ptr error) {
    std::lock_guard lock(mutex_);
    if (!done_ && !error_) error_ = std::move(error);
  }

  std::string timeout_message(Millis waited) const {
    std::string message = concat(description_, " timed out after ", format_duration(waited), " on ",
                                 state_->rank_name(), ": ");
    if (!on_stream_) message += "NCCL was still connecting the ranks (not every rank reached it)";
    else if (collective_) message += "NCCL cannot tell which ranks had not arrived";
    else message += "the peer never matched it";
    return message + "; the communicator was aborted";
  }

  std::shared_ptr<State> state_;
  LaneKind lane_;
  std::string description_;  // "all_reduce #3 (step 7)", "send #2 to rank 1 with tag 4"
  bool collective_;
  Millis default_timeout_;
  CudaEvent ready_event_, done_event_;
  std::atomic<bool> on_stream_{false};  // set with the state's mutex held
  std::mutex mutex_;                    // done_, error_ (never held while taking the state's mutex)
  bool done_ = false;
  std::exception_ptr error_;
};

// Starts and ends an NCCL group; a group left by an exception is still ended.
class NcclGroup {
 public:
  NcclGroup() { NCCL_CHECK(ncclGroupStart()); }
  ~NcclGroup() {
    if (!ended_) ncclGroupEnd();
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  void end() {
    ended_ = true;
    NCCL_CHECK(ncclGroupEnd());
  }

 private:
  bool ended_ = false;
};

void State::submit(LaneKind kind, Submission submission) {
  std::erase_if(in_flight_, [](const std::weak_ptr<NcclWork>& w) {
    const auto live = w.lock();
    return !live || live->finished();
  });
  for (const auto& work : submission.works) in_flight_.push_back(work);
  lanes[kind].queue.push_back(std::move(submission));
  progress(kind);  // most operations go on the stream at once
}

void State::add_message(std::shared_ptr<NcclWork> work, std::function<void(Lane&)> call) {
  batch_.works.push_back(std::move(work));
  batch_calls_.push_back(std::move(call));
}

void State::flush_messages() {
  if (batch_.works.empty()) return;
  Submission batch = std::exchange(batch_, Submission{});
  batch.calls = [calls = std::exchange(batch_calls_, {})](Lane& lane) -> AfterNccl {
    NcclGroup group;
    for (const auto& call : calls) call(lane);
    group.end();
    return nullptr;
  };
  submit(kMessages, std::move(batch));
}

bool State::progress(LaneKind kind) {
  Lane& lane = lanes[kind];
  if (lane.comm.get() == nullptr) {  // aborted (the works failed with it) or closed (none left)
    TUTTI_CHECK_AS(CommError, lane.pending.empty() && lane.queue.empty(), "the lane of ", kLaneNames[kind],
                   " has operations but no NCCL communicator");
    return true;
  }
  for (;;) {
    if (!lane.pending.empty()) {
      ncclResult_t state = ncclSuccess;
      NCCL_CHECK(ncclCommGetAsyncError(lane.comm.get(), &state));
      if (state == ncclInProgress) return false;
      if (state != ncclSuccess) fail_nccl(state, lane.pending[0]->description().c_str(), __FILE__, __LINE__);
      activate(device);
      if (lane.after) lane.after(lane.stream.get());
      for (const auto& work : lane.pending) {
        CUDA_CHECK(cudaEventRecord(work->event(), lane.stream.get()));
        work->mark_on_stream();
      }
      lane.pending.clear();
      lane.after = nullptr;
    }
    if (lane.queue.empty()) return true;
    Submission next = std::move(lane.queue.front());
    lane.queue.pop_front();
    activate(device);
    // The operations see what the compute stream had done when they were issued.
    for (const auto& work : next.works)
      CUDA_CHECK(cudaStreamWaitEvent(lane.stream.get(), work->ready_event(), 0));
    lane.pending = std::move(next.works);
    try {
      lane.after = next.calls(lane);
    } catch (const std::exception& e) {
      TUTTI_FAIL(CommError, lane.pending[0]->description(), ": ", e.what());
    }
  }
}

void State::finish_pending(LaneKind kind, Millis timeout) {
  if (kind == kMessages) flush_messages();
  const Clock::time_point deadline = deadline_after(timeout);
  Backoff backoff;
  while (!progress(kind)) {
    if (Clock::now() >= deadline) {
      const std::string message =
          concat(lanes[kind].pending[0]->description(), " timed out after ", format_duration(timeout), " on ",
                 rank_name(), ": NCCL was still connecting the ranks (not every rank reached it)");
      abort(message);
      TUTTI_FAIL(Timeout, message);
    }
    backoff.pause();
  }
}

void State::abort(const std::string& reason) {
  if (!failure.empty()) return;
  failure = reason;
  for (const auto& weak : in_flight_)
    if (const auto work = weak.lock()) work->fail_if_pending(reason);
  for (const auto& work : batch_.works) work->fail_if_pending(reason);
  in_flight_.clear();
  batch_ = Submission{};
  batch_calls_.clear();
  for (Lane& lane : lanes) {
    lane.pending.clear();
    lane.queue.clear();
    lane.after = nullptr;  // scratch memory of an operation never on the stream is lost
    lane.comm.abort();
  }
}

std::string State::async_error(LaneKind lane) {
  ncclComm_t comm = lanes[lane].comm.get();
  if (comm == nullptr) return "";
  ncclResult_t state = ncclSuccess;
  if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) return "";
  if (state == ncclSuccess || state == ncclInProgress) return "";
  const char* last = ncclGetLastError(comm);
  return concat("NCCL error on the lane of ", kLaneNames[lane], ": ", ncclGetErrorString(state),
                last != nullptr && *last != '\0' ? concat(" (", last, ")") : std::string());
}

void State::close(Millis timeout) {
  if (!failure.empty()) return;  // aborted
  try {
    activate(device);
    for (LaneKind kind : {kCollectives, kMessages}) finish_pending(kind, timeout);
    for (Lane& lane : lanes) NCCL_CHECK(ncclCommFinalize(lane.comm.get()));
    if (!wait_ready({lanes[0].comm.get(), lanes[1].comm.get()}, deadline_after(timeout))) {
      abort(concat("the communicator of ", rank_name(), " was closed with operations that never completed"));
      return;
    }
    for (Lane& lane : lanes) lane.comm.destroy();
    failure = "the communicator was closed";
  } catch (const std::exception& e) {
    abort(concat("closing the communicator failed: ", e.what()));
  }
}

// ---- the communicator ------------------------------------------------------------------------------

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<State> state)
      : state_(std::move(state)), compute_(tutti::cuda::stream(state_->device)) {}
  ~NcclCommunicator() override {
    std::lock_guard lock(state_->mutex);
    state_->close(timeout());
  }

  int rank() const override { return state_->rank; }
  int size() const override { return state_->size; }
  std::string backend() const override { return "nccl"; }

  // A one-element all-reduce: complete once every rank has reached it.
  WorkHandle barrier() override {
    return issue_collective("barrier", "", [word = state_->barrier_word](Lane& lane) -> AfterNccl {
      NCCL_CHECK(ncclAllReduce(word, word, 1, ncclInt32, ncclSum, lane.comm.get(), lane.stream.get()));
      return nullptr;
    });
  }

  // ncclCommSplit of each lane, polled with the timeout (a rank that never calls it gives Timeout).
  std::unique_ptr<Communicator> split(int color, int key) override {
    TUTTI_CHECK_AS(InvalidArgument, color >= 0, "split: color must be non-negative, got ", color);
    std::lock_guard lock(state_->mutex);
    const std::string description = describe("split", ++collectives_, "");
    check_usable(description);
    std::array<NcclComm, kLanes> children;
    try {
      for (LaneKind kind : {kCollectives, kMessages}) state_->finish_pending(kind, timeout());
      activate(state_->device);
      const Clock::time_point deadline = deadline_after(timeout());
      for (size_t i = 0; i < children.size(); ++i) {
        children[i] = split_comm(state_->lanes[i].comm.get(), color, key, deadline);
        if (children[i].get() == nullptr) {
          const std::string message = concat(description, " timed out after ", format_duration(timeout()), " on ",
                                             state_->rank_name(), ": not every rank called split");
          state_->abort(message);
          TUTTI_FAIL(Timeout, message);
        }
      }
    } catch (const std::exception& e) {
      state_->abort(concat(description, " failed on ", state_->rank_name(), ": ", e.what()));
      throw;
    }
    int child_rank = 0, child_size = 0;
    NCCL_CHECK(ncclCommUserRank(children[0].get(), &child_rank));
    NCCL_CHECK(ncclCommCount(children[0].get(), &child_size));
    auto result = std::make_unique<NcclCommunicator>(
        std::make_shared<State>(child_rank, child_size, state_->device, std::move(children)));
    result->set_step(step());
    result->set_timeout(timeout());
    return result;
  }

  // Aborts the NCCL communicators (this process's kernels stop waiting) and ends this process.
  // Other processes are not reached: their operations with this rank time out, or the launcher
  // (mpirun) ends them; a job bootstrapped over MPI should call the MPI communicator's abort.
  [[noreturn]] void abort(int code) override {
    {
      std::lock_guard lock(state_->mutex);
      state_->abort(concat("abort(", code, ") on ", state_->rank_name()));
    }
    std::fflush(nullptr);
    std::_Exit(code);
  }

 protected:
  WorkHandle all_reduce_buffer(Buffer data, ReduceOp op) override {
    check_buffer("all_reduce", data);
    check_on_device("all_reduce", "data", data, state_->device);
    return issue_collective("all_reduce", "", [data, op](Lane& lane) -> AfterNccl {
      if (data.count > 0)
        NCCL_CHECK(ncclAllReduce(data.data, data.data, size_t(data.count), nccl_type(data.type), nccl_op(op),
                                 lane.comm.get(), lane.stream.get()));
      return nullptr;
    });
  }

  // Equal counts: ncclReduceScatter. Unequal: one ncclReduce per chunk to the rank that owns it,
  // in one group (NCCL runs them together; each rank sends the chunks of the others once, as a
  // ring reduce-scatter does). An output that overlaps the input other than at this rank's own
  // chunk (the in-place layout) is received into scratch and copied.
  WorkHandle reduce_scatter_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) override {
    const auto offsets = check_chunks("reduce_scatter", input, output, counts, rank(), size());
    check_on_device("reduce_scatter", "input", input, state_->device);
    check_on_device("reduce_scatter", "output", output, state_->device);
    const bool equal = std::all_of(counts.begin(), counts.end(), [&](int64_t c) { return c == counts[0]; });
    const bool aside = overlaps(input, output) && output.data != at(input, offsets[size_t(rank())]);
    return issue_collective(
        "reduce_scatter", "", [input, output, counts, offsets, equal, aside, rank = rank()](Lane& lane) -> AfterNccl {
          if (offsets.back() == 0) return nullptr;
          void* scratch = nullptr;
          if (aside) CUDA_CHECK(cudaMallocAsync(&scratch, bytes_of(output), lane.stream.get()));
          void* out = aside ? scratch : output.data;
          const ncclDataType_t type = nccl_type(input.type);
          if (equal) {
            NCCL_CHECK(ncclReduceScatter(input.data, out, size_t(counts[0]), type, ncclSum, lane.comm.get(),
                                         lane.stream.get()));
          } else {
            NcclGroup group;
            for (int r = 0; r < int(counts.size()); ++r) {
              if (counts[size_t(r)] == 0) continue;
              NCCL_CHECK(ncclReduce(at(input, offsets[size_t(r)]), r == rank ? out : nullptr,
                                    size_t(counts[size_t(r)]), type, ncclSum, r, lane.comm.get(), lane.stream.get()));
            }
            group.end();
          }
          if (!aside) return nullptr;
          return [output, scratch](cudaStream_t stream) {
            CUDA_CHECK(cudaMemcpyAsync(output.data, scratch, bytes_of(output), cudaMemcpyDeviceToDevice, stream));
            CUDA_CHECK(cudaFreeAsync(scratch, stream));
          };
        });
  }

  // Equal counts: ncclAllGather. Unequal: one ncclBroadcast per chunk from the rank that owns it,
  // in one group. Input already at this rank's place in the output is gathered in place; input
  // that overlaps the output anywhere else is sent from a copy.
  WorkHandle all_gather_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) override {
    const auto offsets = check_chunks("all_gather", output, input, counts, rank(), size());
    check_on_device("all_gather", "input", input, state_->device);
    check_on_device("all_gather", "output", output, state_->device);
    const bool equal = std::all_of(counts.begin(), counts.end(), [&](int64_t c) { return c == counts[0]; });
    const bool in_place = input.count > 0 && input.data == at(output, offsets[size_t(rank())]);
    const bool aside = !in_place && overlaps(input, output);
    return issue_collective(
        "all_gather", "", [input, output, counts, offsets, equal, aside, rank = rank()](Lane& lane) -> AfterNccl {
          if (offsets.back() == 0) return nullptr;
          void* scratch = nullptr;
          if (aside) {
            CUDA_CHECK(cudaMallocAsync(&scratch, bytes_of(input), lane.stream.get()));
            CUDA_CHECK(
                cudaMemcpyAsync(scratch, input.data, bytes_of(input), cudaMemcpyDeviceToDevice, lane.stream.get()));
          }
          const void* send = aside ? scratch : input.data;
          const ncclDataType_t type = nccl_type(output.type);
          if (equal) {
            NCCL_CHECK(ncclAllGather(send, output.data, size_t(counts[0]), type, lane.comm.get(), lane.stream.get()));
          } else {
            NcclGroup group;
            for (int r = 0; r < int(counts.size()); ++r) {
              if (counts[size_t(r)] == 0) continue;
              void* chunk = at(output, offsets[size_t(r)]);
              NCCL_CHECK(ncclBroadcast(r == rank ? send : chunk, chunk, size_t(counts[size_t(r)]), type, r,
                                       lane.comm.get(), lane.stream.get()));
            }
            group.end();
          }
          if (!aside) return nullptr;
          return [scratch](cudaStream_t stream) { CUDA_CHECK(cudaFreeAsync(scratch, stream)); };
        });
  }

  WorkHandle broadcast_buffer(Buffer data, int root) override {
    check_buffer("broadcast", data);
    check_rank_arg("broadcast", "root", root, size());
    check_on_device("broadcast", "data", data, state_->device);
    return issue_collective("broadcast", concat(" from rank ", root), [data, root](Lane& lane) -> AfterNccl {
      if (data.count > 0)
        NCCL_CHECK(ncclBroadcast(data.data, data.data, size_t(data.count), nccl_type(data.type), root,
                                 lane.comm.get(), lane.stream.get()));
      return nullptr;
    });
  }

  // NCCL has no tags: the messages from one rank to another are received in the order they were
  // sent, whatever their tags (checked for range, then only named in errors). An empty message is
  // not sent at all, on both sides.
  WorkHandle send_buffer(Buffer data, int peer, int tag) override {
    check_p2p("send", data, peer, tag);
    return issue_message("send", concat(" to rank ", peer, " with tag ", tag), [data, peer](Lane& lane) {
      if (data.count > 0)
        NCCL_CHECK(ncclSend(data.data, size_t(data.count), nccl_type(data.type), peer, lane.comm.get(),
                            lane.stream.get()));
    });
  }

  WorkHandle recv_buffer(Buffer data, int peer, int tag) override {
    check_p2p("recv", data, peer, tag);
    return issue_message("recv", concat(" from rank ", peer, " with tag ", tag), [data, peer](Lane& lane) {
      if (data.count > 0)
        NCCL_CHECK(ncclRecv(data.data, size_t(data.count), nccl_type(data.type), peer, lane.comm.get(),
                            lane.stream.get()));
    });
  }

 private:
  void check_p2p(const char* what, const Buffer& data, int peer, int tag) const {
    check_buffer(what, data);
    check_rank_arg(what, "peer", peer, size());
    TUTTI_CHECK_AS(InvalidArgument, peer != rank(), what, ": peer ", peer,
                   " is this rank; the nccl backend has no messages to self");
    TUTTI_CHECK_AS(InvalidArgument, tag >= 0, what, ": tag ", tag, " is negative");
    check_on_device(what, "data", data, state_->device);
  }

  std::string describe(const char* what, int64_t number, const std::string& suffix) const {
    std::string text = concat(what, " #", number);
    if (step() >= 0) text += concat(" (step ", step(), ")");
    return text + suffix;
  }

  void check_usable(const std::string& description) const {
    TUTTI_CHECK_AS(CommError, state_->failure.empty(), description, " on a communicator that can no longer be used: ",
                   state_->failure);
  }

  // The Work of a new operation, with its place on the compute stream recorded: what it reads was
  // computed by the work queued there before it.
  std::shared_ptr<NcclWork> new_work(LaneKind kind, const std::string& description, bool collective) {
    activate(state_->device);
    auto work = std::make_shared<NcclWork>(state_, kind, description, collective, timeout());
    CUDA_CHECK(cudaEventRecord(work->ready_event(), compute_));
    return work;
  }

  // A collective (numbered in one sequence, the same on every rank) goes to its lane at once; it
  // never waits for a peer: while NCCL is still putting an earlier one on the stream (connecting
  // the ranks), it waits in the lane's queue. Batched messages are submitted first.
  WorkHandle issue_collective(const char* what, const std::string& suffix, NcclCalls calls) {
    std::lock_guard lock(state_->mutex);
    const std::string description = describe(what, ++collectives_, suffix);
    check_usable(description);
    try {
      state_->flush_messages();
      auto work = new_work(kCollectives, description, true);
      state_->submit(kCollectives, Submission{{work}, std::move(calls)});
      return work;
    } catch (const std::exception& e) {
      state_->abort(concat(description, " failed on ", state_->rank_name(), ": ", e.what()));
      throw;
    }
  }

  // A message (numbered apart) joins the batch that the first wait() or is_completed() on any
  // message, or the next collective, submits as one group.
  WorkHandle issue_message(const char* what, const std::string& suffix, std::function<void(Lane&)> call) {
    std::lock_guard lock(state_->mutex);
    const std::string description = describe(what, ++point_to_point_, suffix);
    check_usable(description);
    try {
      auto work = new_work(kMessages, description, false);
      state_->add_message(work, std::move(call));
      return work;
    } catch (const std::exception& e) {
      state_->abort(concat(description, " failed on ", state_->rank_name(), ": ", e.what()));
      throw;
    }
  }

  std::shared_ptr<State> state_;
  cudaStream_t compute_;  // the CUDA backend's stream of this GPU (not owned)
  int64_t collectives_ = 0, point_to_point_ = 0;
};

// A duplicate of `comm` (same ranks, same order), for another lane.
NcclComm duplicate(ncclComm_t comm, int rank, Clock::time_point deadline, const char* what) {
  NcclComm dup = split_comm(comm, 0, rank, deadline);
  TUTTI_CHECK_AS(Timeout, dup.get() != nullptr, what, ": rank ", rank,
                 " timed out while the ranks set up the message lane");
  return dup;
}

}  // namespace
}  // namespace nccl

bool nccl_available() { return true; }

NcclId nccl_unique_id() {
  nccl::keep_nvlink_multicast_off();
  ncclUniqueId raw;
  NCCL_CHECK(ncclGetUniqueId(&raw));
  NcclId id;
  std::memcpy(id.bytes.data(), &raw, sizeof raw);
  return id;
}

std::unique_ptr<Communicator> make_nccl(int rank, int size, const NcclId& id, int device, Millis init_timeout) {
  TUTTI_CHECK_AS(InvalidArgument, size >= 1, "make_nccl: size must be at least 1, got ", size);
  TUTTI_CHECK_AS(InvalidArgument, rank >= 0 && rank < size, "make_nccl: rank ", rank, " is outside [0, ", size, ")");
  const int gpus = tutti::cuda::device_count();
  TUTTI_CHECK_AS(InvalidArgument, device >= 0 && device < gpus, "make_nccl: device cuda:", device,
                 " is not available: ", gpus, " CUDA device(s) visible");
  nccl::keep_nvlink_multicast_off();
  nccl::activate(device);
  ncclUniqueId raw;
  std::memcpy(&raw, id.bytes.data(), sizeof raw);
  ncclConfig_t config = nccl::nonblocking_config();
  ncclComm_t comm = nullptr;
  const ncclResult_t result = ncclCommInitRankConfig(&comm, size, raw, rank, &config);
  nccl::NcclComm world(comm);
  if (result != ncclSuccess && result != ncclInProgress) nccl::fail_nccl(result, "ncclCommInitRankConfig", __FILE__, __LINE__);
  const auto deadline = nccl::deadline_after(init_timeout);
  TUTTI_CHECK_AS(Timeout, nccl::wait_ready({comm}, deadline), "make_nccl: rank ", rank, " of ", size,
                 " timed out after ", format_duration(init_timeout), " waiting for the other ranks to join");
  nccl::NcclComm messages = nccl::duplicate(comm, rank, deadline, "make_nccl");
  std::array<nccl::NcclComm, nccl::kLanes> lanes{std::move(world), std::move(messages)};
  return std::make_unique<nccl::NcclCommunicator>(std::make_shared<nccl::State>(rank, size, device, std::move(lanes)));
}

std::unique_ptr<Communicator> make_nccl_from(Communicator& bootstrap, int device) {
  // Checked before the broadcast, so a bad device fails on its own rank at once.
  const int gpus = tutti::cuda::device_count();
  TUTTI_CHECK_AS(InvalidArgument, device >= 0 && device < gpus, "make_nccl_from: device cuda:", device,
                 " is not available: ", gpus, " CUDA device(s) visible");
  NcclId id;
  if (bootstrap.rank() == 0) id = nccl_unique_id();
  bootstrap.broadcast(std::span<uint8_t>(id.bytes), 0)->wait();
  auto comm = make_nccl(bootstrap.rank(), bootstrap.size(), id, device, bootstrap.timeout());
  comm->set_step(bootstrap.step());
  comm->set_timeout(bootstrap.timeout());
  return comm;
}

#else  // a build without NCCL: the factories say so

namespace tutti::comm {

namespace {
[[noreturn]] void no_nccl() {
  TUTTI_FAIL(CommError, "this build of tutti has no NCCL (it needs CUDA and an NCCL library: docs/nccl.md)");
}
}  // namespace

bool nccl_available() { return false; }
NcclId nccl_unique_id() { no_nccl(); }
std::unique_ptr<Communicator> make_nccl(int, int, const NcclId&, int, Millis) { no_nccl(); }
std::unique_ptr<Communicator> make_nccl_from(Communicator&, int) { no_nccl(); }

#endif

}  // namespace tutti::comm
