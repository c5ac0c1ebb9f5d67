// The mpi backend's front end: checks arguments on the caller's thread, then hands each
// operation to the progress thread (comm/mpi_runtime.hpp) as a closure that posts the
// nonblocking MPI call.
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "comm/backends.hpp"
#include "comm/collective_args.hpp"
#include "comm/mpi_runtime.hpp"

namespace tutti::comm {

namespace {
std::atomic<int64_t> max_message_elements{INT_MAX};
}
int64_t mpi_max_message_elements() { return max_message_elements; }
void set_mpi_max_message_elements(int64_t n) {
  TUTTI_CHECK_AS(InvalidArgument, n >= 1 && n <= INT_MAX, "MPI message size must be in [1, ", INT_MAX, "], got ", n);
  max_message_elements = n;
}

namespace mpi {
namespace {

MPI_Datatype mpi_type(ElemType type) {
  switch (type) {
    case ElemType::f32: return MPI_FLOAT;
    case ElemType::f64: return MPI_DOUBLE;
    case ElemType::i32: return MPI_INT32_T;
    case ElemType::i64: return MPI_INT64_T;
    case ElemType::u8: return MPI_UINT8_T;
  }
  TUTTI_FAIL(InvalidArgument, "unknown element type ", static_cast<int>(type));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  TUTTI_FAIL(InvalidArgument, "unknown reduce op ", static_cast<int>(op));
}

// MPI implementations may reject a null buffer even for zero elements.
void* nonnull(void* p) {
  static unsigned char placeholder;
  return p ? p : &placeholder;
}

MPI_Request* next_request(Op& op) {
  op.requests.push_back(MPI_REQUEST_NULL);
  return &op.requests.back();
}

char* at(const Buffer& b, int64_t element) {
  return static_cast<char*>(b.data) + element * static_cast<int64_t>(elem_size(b.type));
}

// Calls f(offset, count) for consecutive pieces of at most `piece` elements (none when empty).
template <class F>
void for_each_piece(int64_t count, int64_t piece, F f) {
  for (int64_t offset = 0; offset < count; offset += piece) f(offset, static_cast<int>(std::min(piece, count - offset)));
}

// The v-collectives take int counts and int displacements; cutting them up would change which
// rank owns what, so larger layouts are refused rather than truncated.
std::vector<int> int_counts(const char* what, const std::vector<int64_t>& counts, const std::vector<int64_t>& offsets) {
  const int64_t limit = mpi_max_message_elements();
  TUTTI_CHECK_AS(CommError, offsets.back() <= limit, what, ": ", offsets.back(),
                 " elements in all exceed what one MPI call can address (", limit, ")");
  return std::vector<int>(counts.begin(), counts.end());
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::shared_ptr<Runtime> runtime, std::shared_ptr<CommState> state)
      : runtime_(std::move(runtime)), state_(std::move(state)) {}
  ~MpiCommunicator() override { runtime_->retire(state_); }

  int rank() const override { return state_->rank; }
  int size() const override { return state_->size; }
  std::string backend() const override { return "mpi"; }

  WorkHandle barrier() override {
    auto op = std::make_unique<Op>();
    op->start = [](Op& o) { MPI_CHECK(MPI_Ibarrier(o.comm->comm, next_request(o))); };
    return issue(std::move(op), "barrier", true, "");
  }

  // A barrier on this communicator (so a missing rank is named by a timeout like any collective),
  // then MPI_Comm_split, which returns at once because every rank has arrived.
  std::unique_ptr<Communicator> split(int color, int key) override {
    TUTTI_CHECK_AS(InvalidArgument, color >= 0, "split: color must be non-negative, got ", color);
    auto child = std::make_shared<CommState>();
    auto op = std::make_unique<Op>();
    op->start = [](Op& o) { MPI_CHECK(MPI_Ibarrier(o.comm->comm, next_request(o))); };
    op->finish = [runtime = runtime_.get(), child, color, key](Op& o) {
      MPI_Comm comm = MPI_COMM_NULL, control = MPI_COMM_NULL;
      MPI_CHECK(MPI_Comm_split(o.comm->control, color, key, &comm));
      MPI_CHECK(MPI_Comm_dup(comm, &control));
      runtime->adopt(child, comm, control);
    };
    issue(std::move(op), "split", true, "")->wait();
    auto result = std::make_unique<MpiCommunicator>(runtime_, child);
    result->set_step(step());
    result->set_timeout(timeout());
    return result;
  }

  [[noreturn]] void abort(int code) override {
    std::fflush(nullptr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 protected:
  WorkHandle all_reduce_buffer(Buffer data, ReduceOp reduce) override {
    check_buffer("all_reduce", data);
    auto op = std::make_unique<Op>();
    op->start = [data, type = mpi_type(data.type), mpi_reduce = mpi_op(reduce),
                 piece = mpi_max_message_elements()](Op& o) {
      for_each_piece(data.count, piece, [&](int64_t offset, int n) {
        MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, at(data, offset), n, type, mpi_reduce, o.comm->comm, next_request(o)));
      });
    };
    return issue(std::move(op), "all_reduce", true, "");
  }

  WorkHandle reduce_scatter_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) override {
    const auto offsets = check_chunks("reduce_scatter", input, output, counts, rank(), size());
    auto op = std::make_unique<Op>();
    op->counts = int_counts("reduce_scatter", counts, offsets);
    // MPI forbids aliased buffers; an output inside the input is received aside and copied.
    const bool aside = overlaps(input, output);
    const size_t bytes = size_t(output.count) * elem_size(output.type);
    if (aside) op->scratch.resize(bytes);
    op->start = [input, output, aside, type = mpi_type(input.type)](Op& o) {
      void* recv = aside ? o.scratch.data() : output.data;
      MPI_CHECK(MPI_Ireduce_scatter(nonnull(input.data), nonnull(recv), o.counts.data(), type, MPI_SUM, o.comm->comm,
                                    next_request(o)));
    };
    if (aside) op->finish = [output, bytes](Op& o) { std::memcpy(output.data, o.scratch.data(), bytes); };
    return issue(std::move(op), "reduce_scatter", true, "");
  }

  WorkHandle all_gather_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) override {
    const auto offsets = check_chunks("all_gather", output, input, counts, rank(), size());
    auto op = std::make_unique<Op>();
    op->counts = int_counts("all_gather", counts, offsets);
    op->displs.assign(offsets.begin(), offsets.end() - 1);
    // Input already in this rank's slot of the output: MPI_IN_PLACE. Input overlapping some other
    // part of the output would be overwritten while it is sent: send a copy.
    const bool in_place = input.count > 0 && at(output, offsets[size_t(rank())]) == input.data;
    const bool aside = !in_place && overlaps(input, output);
    if (aside) {
      op->scratch.resize(size_t(input.count) * elem_size(input.type));
      std::memcpy(op->scratch.data(), input.data, op->scratch.size());
    }
    op->start = [input, output, in_place, aside, type = mpi_type(input.type)](Op& o) {
      const void* send = in_place ? MPI_IN_PLACE : aside ? o.scratch.data() : nonnull(input.data);
      MPI_CHECK(MPI_Iallgatherv(send, o.counts[size_t(o.comm->rank)], type, nonnull(output.data), o.counts.data(),
                                o.displs.data(), type, o.comm->comm, next_request(o)));
    };
    return issue(std::move(op), "all_gather", true, "");
  }

  WorkHandle broadcast_buffer(Buffer data, int root) override {
    check_buffer("broadcast", data);
    check_rank_arg("broadcast", "root", root, size());
    auto op = std::make_unique<Op>();
    op->start = [data, root, type = mpi_type(data.type), piece = mpi_max_message_elements()](Op& o) {
      for_each_piece(data.count, piece, [&](int64_t offset, int n) {
        MPI_CHECK(MPI_Ibcast(at(data, offset), n, type, root, o.comm->comm, next_request(o)));
      });
    };
    return issue(std::move(op), "broadcast", true, detail::concat(" from ", state_->rank_name(root)));
  }

  // Point-to-point: a long message goes as several pieces with one tag; MPI's non-overtaking
  // rule keeps them in order.
  WorkHandle send_buffer(Buffer data, int peer, int tag) override {
    check_p2p("send", data, peer, tag);
    auto op = std::make_unique<Op>();
    op->start = [data, peer, tag, type = mpi_type(data.type), piece = mpi_max_message_elements()](Op& o) {
      for_each_piece(data.count, piece, [&](int64_t offset, int n) {
        MPI_CHECK(MPI_Isend(at(data, offset), n, type, peer, tag, o.comm->comm, next_request(o)));
      });
    };
    return issue(std::move(op), "send", false, detail::concat(" to ", state_->rank_name(peer), " with tag ", tag));
  }

  WorkHandle recv_buffer(Buffer data, int peer, int tag) override {
    check_p2p("recv", data, peer, tag);
    auto op = std::make_unique<Op>();
    op->type = mpi_type(data.type);
    const int64_t piece = mpi_max_message_elements();
    for_each_piece(data.count, piece, [&](int64_t, int n) { op->expected_counts.push_back(n); });
    op->start = [data, peer, tag, piece](Op& o) {
      for_each_piece(data.count, piece, [&](int64_t offset, int n) {
        MPI_CHECK(MPI_Irecv(at(data, offset), n, o.type, peer, tag, o.comm->comm, next_request(o)));
      });
    };
    return issue(std::move(op), "recv", false, detail::concat(" from ", state_->rank_name(peer), " with tag ", tag));
  }

 private:
  void check_p2p(const char* what, const Buffer& data, int peer, int tag) const {
    check_buffer(what, data);
    check_rank_arg(what, "peer", peer, size());
    TUTTI_CHECK_AS(InvalidArgument, tag >= 0 && tag <= runtime_->tag_upper_bound(), what, ": tag ", tag,
                   " outside [0, ", runtime_->tag_upper_bound(), "]");
  }

  // Numbers the operation, builds its Work (whose timeout message names it) and queues it.
  // Collectives share one sequence (the same on every rank) and complete in issue order;
  // point-to-point operations are numbered apart and complete when their transfer does, so a
  // receive posted early never holds back a later collective.
  WorkHandle issue(std::unique_ptr<Op> op, const char* what, bool collective, const std::string& suffix) {
    std::lock_guard lock(issue_mutex_);
    if (const std::string reason = state_->poison_reason(); !reason.empty())
      TUTTI_FAIL(CommError, what, " on a communicator that already failed: ", reason);
    const int64_t number = collective ? ++collectives_ : ++point_to_point_;
    op->comm = state_;
    op->seq = collective ? number : 0;
    op->ordered = collective;
    op->work = std::make_shared<CompletionWork>(
        timeout(), [state = state_, name = detail::concat(what, " #", number), suffix, step = step(), collective,
                    number](Millis waited) {
          std::string message = name;
          if (step >= 0) message += detail::concat(" (step ", step, ")");
          message += detail::concat(suffix, " timed out after ", format_duration(waited), " on ",
                                    state->rank_name(state->rank));
          if (collective) {
            const std::string missing = state->missing_ranks(number);
            message += missing.empty() ? ": every rank had arrived but the transfer did not finish"
                                       : ": " + missing + " had not arrived";
          }
          state->poison(message);
          return message;
        },
        detail::concat(what, suffix));
    WorkHandle work = op->work;
    runtime_->submit(std::move(op));
    return work;
  }

  std::shared_ptr<Runtime> runtime_;
  std::shared_ptr<CommState> state_;
  std::mutex issue_mutex_;
  int64_t collectives_ = 0, point_to_point_ = 0;
};

}  // namespace
}  // namespace mpi

std::unique_ptr<Communicator> make_mpi_world() {
  auto runtime = mpi::Runtime::instance();
  auto state = std::make_shared<mpi::CommState>();
  runtime->run(
      [runtime = runtime.get(), state] {
        MPI_Comm comm = MPI_COMM_NULL, control = MPI_COMM_NULL;
        MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
        MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &control));
        runtime->adopt(state, comm, control);
      },
      std::chrono::minutes(5));
  return std::make_unique<mpi::MpiCommunicator>(runtime, state);
}

}  // namespace tutti::comm
