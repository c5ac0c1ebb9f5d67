// The world of one: every collective is complete when it returns, with the result a single rank
// contributes (all_reduce and broadcast leave the data as it is, reduce_scatter and all_gather
// copy this rank's chunk). No MPI, no thread, no network.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "comm/collective_args.hpp"
#include "comm/work.hpp"

namespace tutti::comm {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "local"; }

  WorkHandle barrier() override { return CompletionWork::done(); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    TUTTI_CHECK_AS(InvalidArgument, color >= 0, "split: color must be non-negative, got ", color);
    auto child = std::make_unique<LocalCommunicator>();
    child->set_step(step());
    child->set_timeout(timeout());
    return child;
  }

  [[noreturn]] void abort(int code) override {
    std::fflush(nullptr);
    std::_Exit(code);
  }

 protected:
  WorkHandle all_reduce_buffer(Buffer data, ReduceOp) override {
    check_buffer("all_reduce", data);
    return CompletionWork::done();
  }
  WorkHandle reduce_scatter_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) override {
    check_chunks("reduce_scatter", input, output, counts, 0, 1);
    copy(input, output);
    return CompletionWork::done();
  }
  WorkHandle all_gather_buffer(Buffer input, Buffer output, const std::vector<int64_t>& counts) override {
    check_chunks("all_gather", output, input, counts, 0, 1);
    copy(input, output);
    return CompletionWork::done();
  }
  WorkHandle broadcast_buffer(Buffer data, int root) override {
    check_buffer("broadcast", data);
    check_rank_arg("broadcast", "root", root, 1);
    return CompletionWork::done();
  }
  WorkHandle send_buffer(Buffer data, int peer, int tag) override { return no_peer("send to", data, peer); }
  WorkHandle recv_buffer(Buffer data, int peer, int tag) override { return no_peer("recv from", data, peer); }

 private:
  static void copy(const Buffer& from, const Buffer& to) {
    if (from.count > 0) std::memmove(to.data, from.data, size_t(from.count) * elem_size(from.type));
  }
  [[noreturn]] static WorkHandle no_peer(const char* what, const Buffer& data, int peer) {
    check_buffer(what, data);
    check_rank_arg(what, "peer", peer, 1);
    TUTTI_FAIL(CommError, what, " rank ", peer, ": no peer in a world of one");
  }
};

}  // namespace

std::unique_ptr<Communicator> make_local() { return std::make_unique<LocalCommunicator>(); }

}  // namespace tutti::comm
