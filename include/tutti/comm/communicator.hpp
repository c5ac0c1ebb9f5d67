// Communicator: the collectives every kind of parallelism is built on, over typed spans (counts
// come from the span, never from byte sizes), all asynchronous: each call returns a Work handle.
// Backends: "local" (a world of one: no MPI, no network) and "mpi" (Open MPI). This header
// includes no MPI header, so a CPU-only build and user programs compile without MPI.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tutti/core/error.hpp"

namespace tutti::comm {

using Millis = std::chrono::milliseconds;

enum class ReduceOp { sum, max, min };

// The element types collectives carry.
enum class ElemType { f32, f64, i32, i64, u8 };
template <class T> constexpr ElemType elem_type_of();
template <> constexpr ElemType elem_type_of<float>() { return ElemType::f32; }
template <> constexpr ElemType elem_type_of<double>() { return ElemType::f64; }
template <> constexpr ElemType elem_type_of<int32_t>() { return ElemType::i32; }
template <> constexpr ElemType elem_type_of<int64_t>() { return ElemType::i64; }
template <> constexpr ElemType elem_type_of<uint8_t>() { return ElemType::u8; }

// A typed view of memory for the virtual interface: built only from spans.
struct Buffer {
  void* data = nullptr;
  int64_t count = 0;
  ElemType type = ElemType::f32;
  template <class T>
  static Buffer of(std::span<T> s) {
    return {const_cast<std::remove_const_t<T>*>(s.data()), static_cast<int64_t>(s.size()),
            elem_type_of<std::remove_const_t<T>>()};
  }
};

// Handle to an asynchronous operation (PyTorch c10d's Work). The error of a failed operation is
// kept and rethrown by every wait().
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation completes. Throws tutti::Timeout when it has not completed within
  // `timeout` (the message names the collective, its sequence number, the step, and the ranks that
  // had not arrived), or CommError when it failed.
  virtual void wait(Millis timeout) = 0;
  // wait() with the communicator's timeout.
  virtual void wait() = 0;
  virtual bool is_completed() = 0;
};
using WorkHandle = std::shared_ptr<Work>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "local" | "mpi"

  // -- collectives (typed front ends) ---------------------------------------------------------
  // In place: every rank ends with op over all ranks' `data`.
  template <class T>
  WorkHandle all_reduce(std::span<T> data, ReduceOp op = ReduceOp::sum) {
    return all_reduce_buffer(Buffer::of(data), op);
  }
  // `input` holds size() chunks laid end to end, chunk r of counts[r] elements; this rank receives
  // the sum over ranks of its chunk in `output` (counts[rank()] elements). Counts may be 0 and
  // need not be equal.
  template <class T>
  WorkHandle reduce_scatter(std::span<const T> input, std::span<T> output, const std::vector<int64_t>& counts) {
    return reduce_scatter_buffer(Buffer::of(input), Buffer::of(output), counts);
  }
  // Each rank contributes counts[rank()] elements; `output` gets every rank's chunk in rank order.
  template <class T>
  WorkHandle all_gather(std::span<const T> input, std::span<T> output, const std::vector<int64_t>& counts) {
    return all_gather_buffer(Buffer::of(input), Buffer::of(output), counts);
  }
  template <class T>
  WorkHandle broadcast(std::span<T> data, int root) {
    return broadcast_buffer(Buffer::of(data), root);
  }
  template <class T>
  WorkHandle send(std::span<const T> data, int peer, int tag) {
    return send_buffer(Buffer::of(data), peer, tag);
  }
  template <class T>
  WorkHandle recv(std::span<T> data, int peer, int tag) {
    return recv_buffer(Buffer::of(data), peer, tag);
  }
  virtual WorkHandle barrier() = 0;

  // A sub-group: ranks with the same `color` form a communicator, ordered by `key` (MPI_Comm_split).
  // Collective over this communicator.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // -- diagnostics ----------------------------------------------------------------------------
  // The training step, named in timeout errors.
  void set_step(int64_t step) { step_ = step; }
  int64_t step() const { return step_; }
  void set_timeout(Millis timeout) { timeout_ = timeout; }
  Millis timeout() const { return timeout_; }
  // Ends every process of the job (after an error on one rank), never returns. Only main() calls it.
  [[noreturn]] virtual void abort(int code) = 0;

 protected:
  virtual WorkHandle all_reduce_buffer(Buffer data, ReduceOp op) = 0;
  virtual WorkHandle reduce_scatter_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) = 0;
  virtual WorkHandle all_gather_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) = 0;
  virtual WorkHandle broadcast_buffer(Buffer data, int root) = 0;
  virtual WorkHandle send_buffer(Buffer data, int peer, int tag) = 0;
  virtual WorkHandle recv_buffer(Buffer data, int peer, int tag) = 0;

 private:
  int64_t step_ = -1;
  Millis timeout_ = std::chrono::minutes(5);
};

// The world communicator. backend "auto": MPI when this process was started by an MPI launcher
// (mpirun, srun) and tutti was built with MPI, else local. "local" and "mpi" force a choice
// ("mpi" without MPI support throws CommError).
std::unique_ptr<Communicator> make_world(const std::string& backend = "auto");

// A world of one (always available).
std::unique_ptr<Communicator> make_local();

// Whether this build has the MPI backend.
bool mpi_available();

}  // namespace tutti::comm
