// The nccl backend on the GPUs of one machine: one process, one thread a rank (every rank must be
// inside make_nccl at once), N = the GPUs visible, at most 4; each test makes its communicators on
// the threads that use them. Each collective against a reference
// computed on the host, over sizes 0, 1, 7 and 1000003 (not divisible by N) and the five element
// types; reduce-scatter and all-gather with equal, near-equal and unequal counts (zeros among
// them), in place and overlapping; point-to-point in a ring and in pairs that both send first;
// split; ordering after the CUDA backend's stream; timeouts. Tests that need 2 GPUs skip with
// fewer; the argument checks need one (the device check none). TUTTI_NCCL_TIMING=1 enables
// NcclTiming.BusBandwidth, a table for bench notes (not a test).
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "test_util.hpp"
#include "tutti/comm/nccl.hpp"

namespace tutti {
namespace {

using comm::Communicator;
using comm::Millis;
using comm::ReduceOp;
using Clock = std::chrono::steady_clock;

constexpr size_t kSizes[] = {0, 1, 7, 1000003};

int world_size() { return std::min(cuda::device_count(), 4); }

void check_cuda(cudaError_t err, const char* call) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(call) + ": " + cudaGetErrorString(err));
}
#define CK(call) check_cuda((call), #call)

// ---- helpers -----------------------------------------------------------------------------------

// A typed array in one GPU's memory (cudaMalloc; copies through the legacy stream).
template <class T>
class DeviceArray {
 public:
  DeviceArray(int device, size_t n) : device_(device), n_(n) {
    CK(cudaSetDevice(device));
    if (n > 0) CK(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)));
  }
  DeviceArray(int device, const std::vector<T>& values) : DeviceArray(device, values.size()) { upload(values); }
  ~DeviceArray() {
    cudaSetDevice(device_);
    cudaFree(data_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void upload(const std::vector<T>& values, size_t at = 0) {
    CK(cudaSetDevice(device_));
    if (!values.empty()) CK(cudaMemcpy(data_ + at, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> values(n_);
    CK(cudaSetDevice(device_));
    if (n_ > 0) CK(cudaMemcpy(values.data(), data_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return values;
  }
  T* data() { return data_; }
  std::span<T> span(size_t offset = 0, size_t count = SIZE_MAX) {
    return {data_ + offset, std::min(count, n_ - offset)};
  }

 private:
  int device_;
  size_t n_;
  T* data_ = nullptr;
};

// Runs f(rank) on one thread per rank, each on its GPU; an exception fails the test naming the rank.
void on_every_rank(int n, const std::function<void(int)>& f) {
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        CK(cudaSetDevice(r));
        f(r);
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < n; ++r)
    if (!errors[size_t(r)].empty()) ADD_FAILURE() << "rank " << r << ": " << errors[size_t(r)];
}

// Runs f(rank, communicator) on one thread per rank, with a communicator of N ranks made on that
// thread (and closed there when f returns).
void with_world(int n, Millis timeout, const std::function<void(int, Communicator&)>& f) {
  const comm::NcclId id = comm::nccl_unique_id();
  on_every_rank(n, [&](int r) {
    auto c = comm::make_nccl(r, n, id, r, std::chrono::seconds(60));
    c->set_timeout(timeout);
    f(r, *c);
  });
}

#define REQUIRE_TWO_GPUS() \
  if (world_size() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << cuda::device_count()

// The value rank r contributes at index i: small integers, exact in every type and op.
template <class T>
T value(int r, size_t i) {
  return static_cast<T>((i * 7 + size_t(r) * 3 + 1) % 11);
}

// "" when equal, else the first difference.
template <class T>
std::string first_mismatch(const std::vector<T>& got, const std::vector<T>& expected) {
  if (got.size() != expected.size()) return "size " + std::to_string(got.size()) + " vs " + std::to_string(expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != expected[i]) {
      std::ostringstream out;
      out << "at " << i << ": got " << +got[i] << ", expected " << +expected[i];
      return out.str();
    }
  }
  return "";
}

// Chunk offsets of a counts vector (size() + 1 entries).
std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}

// The count vectors reduce-scatter and all-gather are tried with, for n ranks.
std::vector<std::vector<int64_t>> count_layouts(int n) {
  std::vector<std::vector<int64_t>> layouts;
  for (int64_t c : {0, 1, 5, 250001}) layouts.push_back(std::vector<int64_t>(size_t(n), c));  // equal
  std::vector<int64_t> shards, unequal, one_owner(size_t(n), 0);
  const int64_t total = 1000003;
  for (int r = 0; r < n; ++r) {
    shards.push_back(total * (r + 1) / n - total * r / n);  // ZeRO's shards: near-equal
    unequal.push_back(r == 0 ? 0 : 1000 * r + 3);           // unequal, a zero first
  }
  one_owner.back() = 77;
  layouts.push_back(shards);
  layouts.push_back(unequal);
  layouts.push_back(one_owner);
  return layouts;
}

std::string text(const std::vector<int64_t>& counts) {
  std::string s;
  for (int64_t c : counts) s += (s.empty() ? "" : ",") + std::to_string(c);
  return "{" + s + "}";
}

// ---- collectives ---------------------------------------------------------------------------------

template <class T>
void check_all_reduce(int r, Communicator& c, ReduceOp op, size_t count) {
  const int n = c.size();
  std::vector<T> mine(count), expected(count);
  for (size_t i = 0; i < count; ++i) {
    mine[i] = value<T>(r, i);
    T acc = value<T>(0, i);
    for (int q = 1; q < n; ++q) {
      const T v = value<T>(q, i);
      acc = op == ReduceOp::sum ? T(acc + v) : op == ReduceOp::max ? std::max(acc, v) : std::min(acc, v);
    }
    expected[i] = acc;
  }
  DeviceArray<T> d(r, mine);
  c.all_reduce(d.span(), op)->wait();
  EXPECT_EQ(first_mismatch(d.download(), expected), "")
      << "rank " << r << ", op " << int(op) << ", " << count << " x " << sizeof(T) << "-byte elements";
}

TEST(Nccl, AllReduceMatchesTheHostForEveryTypeOpAndSize) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
      for (size_t count : kSizes) {
        check_all_reduce<float>(r, c, op, count);
        check_all_reduce<double>(r, c, op, count);
        check_all_reduce<int32_t>(r, c, op, count);
        check_all_reduce<int64_t>(r, c, op, count);
        check_all_reduce<uint8_t>(r, c, op, count);
      }
    }
  });
}

// Output placement: apart (its own buffer), in place (this rank's chunk of the input), or at the
// start of the input (in place for rank 0, an overlap other ranks must receive aside).
enum class Placement { apart, in_place, input_start };

template <class T>
void check_reduce_scatter(int r, Communicator& c, const std::vector<int64_t>& counts, Placement placement) {
  const auto offsets = offsets_of(counts);
  const size_t total = size_t(offsets.back());
  const size_t mine = size_t(counts[size_t(r)]), start = size_t(offsets[size_t(r)]);
  std::vector<T> input(total), expected(mine, T(0));
  for (size_t i = 0; i < total; ++i) input[i] = value<T>(r, i);
  for (size_t j = 0; j < mine; ++j)
    for (int q = 0; q < c.size(); ++q) expected[j] = T(expected[j] + value<T>(q, start + j));
  DeviceArray<T> in(r, input);
  DeviceArray<T> apart(r, std::vector<T>(mine, T(99)));
  std::span<T> out = placement == Placement::apart      ? apart.span()
                     : placement == Placement::in_place ? in.span(start, mine)
                                                        : in.span(0, mine);
  c.reduce_scatter(std::span<const T>(in.span()), out, counts)->wait();
  std::vector<T> got = apart.download();
  if (placement != Placement::apart) {
    const std::vector<T> all = in.download();
    const size_t from = placement == Placement::in_place ? start : 0;
    got.assign(all.begin() + long(from), all.begin() + long(from + mine));
  }
  EXPECT_EQ(first_mismatch(got, expected), "")
      << "rank " << r << ", counts " << text(counts) << ", placement " << int(placement);
}

TEST(Nccl, ReduceScatterWithEqualAndUnequalCounts) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    for (const auto& counts : count_layouts(c.size())) {
      for (Placement p : {Placement::apart, Placement::in_place, Placement::input_start}) {
        check_reduce_scatter<float>(r, c, counts, p);
        check_reduce_scatter<int64_t>(r, c, counts, p);
      }
      check_reduce_scatter<uint8_t>(r, c, counts, Placement::apart);
    }
  });
}

// Input placement: apart, in place (already at this rank's place in the output), or at the start
// of the output (an overlap for every rank but 0, sent from a copy).
template <class T>
void check_all_gather(int r, Communicator& c, const std::vector<int64_t>& counts, Placement placement) {
  const auto offsets = offsets_of(counts);
  const size_t total = size_t(offsets.back());
  std::vector<T> expected(total);
  for (int q = 0; q < c.size(); ++q)
    for (size_t j = 0; j < size_t(counts[size_t(q)]); ++j) expected[size_t(offsets[size_t(q)]) + j] = value<T>(q, j);
  const size_t mine = size_t(counts[size_t(r)]), start = size_t(offsets[size_t(r)]);
  std::vector<T> contribution(mine);
  for (size_t j = 0; j < mine; ++j) contribution[j] = value<T>(r, j);
  DeviceArray<T> out(r, std::vector<T>(total, T(99)));
  DeviceArray<T> apart(r, contribution);
  std::span<T> in = apart.span();
  if (placement != Placement::apart) {
    const size_t at_element = placement == Placement::in_place ? start : 0;
    out.upload(contribution, at_element);
    in = out.span(at_element, mine);
  }
  c.all_gather(std::span<const T>(in), out.span(), counts)->wait();
  EXPECT_EQ(first_mismatch(out.download(), expected), "")
      << "rank " << r << ", counts " << text(counts) << ", placement " << int(placement);
}

TEST(Nccl, AllGatherWithEqualAndUnequalCounts) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    for (const auto& counts : count_layouts(c.size())) {
      for (Placement p : {Placement::apart, Placement::in_place, Placement::input_start}) {
        check_all_gather<double>(r, c, counts, p);
        check_all_gather<int32_t>(r, c, counts, p);
      }
      check_all_gather<uint8_t>(r, c, counts, Placement::apart);
    }
  });
}

TEST(Nccl, BroadcastFromEveryRoot) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    for (int root = 0; root < c.size(); ++root) {
      for (size_t count : kSizes) {
        std::vector<double> mine(count), expected(count);
        for (size_t i = 0; i < count; ++i) {
          expected[i] = value<double>(root, i);
          mine[i] = r == root ? expected[i] : -1.0;
        }
        DeviceArray<double> d(r, mine);
        c.broadcast(d.span(), root)->wait();
        EXPECT_EQ(first_mismatch(d.download(), expected), "") << "rank " << r << ", root " << root;
      }
    }
  });
}

// ---- point-to-point --------------------------------------------------------------------------------

// Every rank sends to the next and receives from the previous, both posted before either is
// waited: deadlock-free because the first wait submits both as one NCCL group.
TEST(Nccl, SendRecvRing) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    const int n = c.size(), next = (r + 1) % n, prev = (r + n - 1) % n;
    const size_t out_count = 1000003 + size_t(r), in_count = 1000003 + size_t(prev);
    std::vector<float> mine(out_count), expected(in_count);
    for (size_t i = 0; i < out_count; ++i) mine[i] = value<float>(r, i);
    for (size_t i = 0; i < in_count; ++i) expected[i] = value<float>(prev, i);
    DeviceArray<float> out(r, mine), in(r, std::vector<float>(in_count, -1.f));
    auto sent = c.send(std::span<const float>(out.span()), next, 7);
    auto received = c.recv(in.span(), prev, 7);
    received->wait();
    sent->wait();
    EXPECT_EQ(first_mismatch(in.download(), expected), "") << "rank " << r;
  });
}

// Pairs (0, 1), (2, 3): both send two messages, then receive two; messages of one direction
// arrive in the order sent, whatever their tags; empty messages are allowed. Then a send waited
// alone (rendezvous: it completes once the peer, later, receives it).
TEST(Nccl, PairsThatBothSendFirstReceiveInOrder) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    const int peer = r ^ 1;
    if (peer >= c.size()) return;
    DeviceArray<int64_t> first(r, std::vector<int64_t>(1000, r * 10 + 1));
    DeviceArray<int64_t> second(r, std::vector<int64_t>(5, r * 10 + 2));
    DeviceArray<int64_t> got_first(r, 1000), got_second(r, 5), empty(r, 0);
    std::vector<comm::WorkHandle> works;
    works.push_back(c.send(std::span<const int64_t>(first.span()), peer, 1));
    works.push_back(c.send(std::span<const int64_t>(empty.span()), peer, 9));
    works.push_back(c.send(std::span<const int64_t>(second.span()), peer, 2));
    works.push_back(c.recv(got_first.span(), peer, 1));
    works.push_back(c.recv(empty.span(), peer, 9));
    works.push_back(c.recv(got_second.span(), peer, 2));
    for (auto& w : works) w->wait();
    EXPECT_EQ(got_first.download(), std::vector<int64_t>(1000, peer * 10 + 1)) << "rank " << r;
    EXPECT_EQ(got_second.download(), std::vector<int64_t>(5, peer * 10 + 2)) << "rank " << r;
    if (r % 2 == 0) {
      c.send(std::span<const int64_t>(first.span()), peer, 3)->wait();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      c.recv(got_first.span(), peer, 3)->wait();
      EXPECT_EQ(got_first.download(), std::vector<int64_t>(1000, peer * 10 + 1)) << "rank " << r;
    }
  });
}

// ---- ordering, barrier, split --------------------------------------------------------------------

void sleep_200ms(void*) { std::this_thread::sleep_for(std::chrono::milliseconds(200)); }

// The CUDA backend's stream is held for 200 ms, then copies the data in; the all-reduce issued
// at once must still see the copied data, not the zeros before it.
TEST(Nccl, OperationsFollowTheComputeStream) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    const size_t count = 1 << 20;
    const int n = c.size();
    DeviceArray<float> source(r, std::vector<float>(count, float(r + 1)));
    DeviceArray<float> data(r, std::vector<float>(count, 0.f));
    cudaStream_t compute = cuda::stream(r);
    CK(cudaLaunchHostFunc(compute, sleep_200ms, nullptr));
    CK(cudaMemcpyAsync(data.data(), source.data(), count * sizeof(float), cudaMemcpyDeviceToDevice, compute));
    auto work = c.all_reduce(data.span());
    work->wait();
    EXPECT_TRUE(work->is_completed());
    EXPECT_EQ(first_mismatch(data.download(), std::vector<float>(count, float(n * (n + 1) / 2))), "")
        << "rank " << r;
    for (int i = 0; i < 3; ++i) c.barrier()->wait();
  });
}

// Two groups by parity, ordered by descending world rank (key = -rank).
TEST(Nccl, SplitByParity) {
  REQUIRE_TWO_GPUS();
  with_world(world_size(), std::chrono::seconds(20), [](int r, Communicator& c) {
    const int n = c.size();
    auto group = c.split(r % 2, -r);
    int members = 0, above = 0, sum = 0;
    for (int q = r % 2; q < n; q += 2) {
      ++members;
      sum += q;
      if (q > r) ++above;
    }
    EXPECT_EQ(group->backend(), "nccl");
    EXPECT_EQ(group->size(), members) << "rank " << r;
    EXPECT_EQ(group->rank(), above) << "rank " << r;
    DeviceArray<int32_t> d(r, std::vector<int32_t>{r});
    group->all_reduce(d.span())->wait();
    EXPECT_EQ(d.download(), std::vector<int32_t>{sum}) << "rank " << r;
    if (group->size() >= 2) {  // a ring inside the group
      const int g = group->rank(), next = (g + 1) % group->size(), prev = (g + group->size() - 1) % group->size();
      DeviceArray<int32_t> out(r, std::vector<int32_t>{r}), in(r, 1);
      auto sent = group->send(std::span<const int32_t>(out.span()), next, 0);
      group->recv(in.span(), prev, 0)->wait();
      sent->wait();
      EXPECT_EQ(in.download(), std::vector<int32_t>{r + 2 * g - 2 * prev}) << "rank " << r;  // group rank h: r + 2(g - h)
    }
    c.barrier()->wait();  // the parent still works after the split
  });
}

// ---- bad arguments ---------------------------------------------------------------------------------

using tutti::test::message_of;

TEST(NcclArgs, DeviceAndRankOutOfRange) {
  const std::string device = message_of([] { comm::make_nccl(0, 1, comm::NcclId{}, 99); });
  EXPECT_NE(device.find("cuda:99"), std::string::npos) << device;
  EXPECT_THROW(comm::make_nccl(0, 1, comm::NcclId{}, 99), InvalidArgument);
  EXPECT_THROW(comm::make_nccl(2, 2, comm::NcclId{}, 0), InvalidArgument);
  EXPECT_THROW(comm::make_nccl(0, 0, comm::NcclId{}, 0), InvalidArgument);
  EXPECT_TRUE(comm::nccl_available());
}

// A world of one on cuda:0 (NCCL allows one rank): what every rank checks alone.
TEST(NcclArgs, HostPointersCountsAndPeers) {
  if (cuda::device_count() < 1) GTEST_SKIP() << "no CUDA device";
  auto world = comm::make_nccl(0, 1, comm::nccl_unique_id(), 0);
  EXPECT_EQ(world->backend(), "nccl");
  std::vector<float> host(8, 1.f);
  const std::string host_message = message_of([&] { world->all_reduce(std::span<float>(host)); });
  EXPECT_NE(host_message.find("host memory"), std::string::npos) << host_message;
  EXPECT_THROW(world->all_reduce(std::span<float>(host)), InvalidArgument);

  DeviceArray<float> d(0, std::vector<float>(8, 2.f)), out(0, 8);
  const std::string counts = message_of([&] {
    world->reduce_scatter(std::span<const float>(d.span()), out.span(0, 4), {8});
  });
  EXPECT_NE(counts.find("4"), std::string::npos) << counts;
  EXPECT_THROW(world->reduce_scatter(std::span<const float>(d.span()), out.span(0, 4), {8}), InvalidArgument);
  EXPECT_THROW(world->all_gather(std::span<const float>(d.span()), out.span(), {4}), InvalidArgument);
  EXPECT_THROW(world->send(std::span<const float>(d.span()), 0, 0), InvalidArgument);  // to itself
  EXPECT_THROW(world->recv(d.span(), 1, 0), InvalidArgument);
  EXPECT_THROW(world->broadcast(d.span(), 1), InvalidArgument);

  // A world of one still computes: reduce-scatter and all-gather copy, all-reduce keeps.
  world->reduce_scatter(std::span<const float>(d.span()), out.span(), {8})->wait();
  EXPECT_EQ(out.download(), std::vector<float>(8, 2.f));
  world->all_reduce(d.span(), ReduceOp::max)->wait();
  EXPECT_EQ(d.download(), std::vector<float>(8, 2.f));

  if (cuda::device_count() >= 2) {
    DeviceArray<float> other(1, 8);
    const std::string device = message_of([&] { world->all_reduce(other.span()); });
    EXPECT_NE(device.find("cuda:1"), std::string::npos) << device;
  }
}

// ---- timeouts --------------------------------------------------------------------------------------

// Rank 0 waits for an all-reduce that rank 1 never joins: Timeout within the wait's limit, naming
// the operation, its number and the step; the communicator is then aborted, so later operations
// fail at once.
TEST(NcclTimeout, CollectiveARankNeverJoins) {
  REQUIRE_TWO_GPUS();
  std::atomic<bool> rank0_done{false};
  with_world(2, std::chrono::seconds(2), [&](int r, Communicator& c) {
    DeviceArray<float> d(r, std::vector<float>(4096, 1.f));
    c.all_reduce(d.span())->wait();  // connects the ranks for this size
    if (r == 1) {
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return;
    }
    c.set_step(42);
    const auto start = Clock::now();
    std::string message;
    try {
      c.all_reduce(d.span())->wait(Millis(500));
      ADD_FAILURE() << "the all-reduce completed without rank 1";
    } catch (const Timeout& e) {
      message = e.what();
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    EXPECT_LT(seconds, 5.0);
    EXPECT_NE(message.find("all_reduce #2 (step 42)"), std::string::npos) << message;
    EXPECT_NE(message.find("timed out after 500ms"), std::string::npos) << message;
    EXPECT_THROW(c.barrier(), CommError);
    std::printf("rank 0 got, after %.2f s: %s\n", seconds, message.c_str());
    rank0_done = true;
  });
}

// A receive whose send never comes: Timeout naming the peer and the tag.
TEST(NcclTimeout, ReceiveThatIsNeverSent) {
  REQUIRE_TWO_GPUS();
  std::atomic<bool> rank0_done{false};
  with_world(2, std::chrono::seconds(1), [&](int r, Communicator& c) {
    if (r == 1) {
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return;
    }
    DeviceArray<float> d(r, 16);
    const auto start = Clock::now();
    std::string message;
    try {
      c.recv(d.span(), 1, 3)->wait(Millis(500));
      ADD_FAILURE() << "the receive completed without a send";
    } catch (const Timeout& e) {
      message = e.what();
    }
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 5.0);
    EXPECT_NE(message.find("recv #1 from rank 1 with tag 3"), std::string::npos) << message;
    rank0_done = true;
  });
}

// ---- bus bandwidth (TUTTI_NCCL_TIMING=1) ----------------------------------------------------------

// Seconds per operation, from a barrier, over `iterations` back-to-back calls.
double time_per_op(Communicator& c, int iterations, const std::function<comm::WorkHandle()>& op) {
  for (int i = 0; i < 3; ++i) op()->wait();
  c.barrier()->wait();
  const auto start = Clock::now();
  comm::WorkHandle last;
  for (int i = 0; i < iterations; ++i) last = op();
  last->wait();
  return std::chrono::duration<double>(Clock::now() - start).count() / iterations;
}

TEST(NcclTiming, BusBandwidth) {
  if (std::getenv("TUTTI_NCCL_TIMING") == nullptr) GTEST_SKIP() << "set TUTTI_NCCL_TIMING=1 to time";
  REQUIRE_TWO_GPUS();
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int n = world_size();
  const size_t count = (size_t(256) << 20) / sizeof(float);  // 256 MiB of f32
  const double bytes = double(count * sizeof(float)), ring = double(n - 1) / n;
  std::printf("nccl, %d x %s, one process, 256 MiB f32 (busbw: all_reduce 2(N-1)/N bytes/t, others (N-1)/N)\n", n,
              prop.name);
  with_world(n, std::chrono::seconds(60), [&](int r, Communicator& c) {
    DeviceArray<float> a(r, std::vector<float>(count, 1.f)), b(r, count);
    auto report = [&](const char* name, double seconds, double factor) {
      if (r == 0)
        std::printf("  %-34s %8.3f ms  algbw %7.1f GB/s  busbw %7.1f GB/s\n", name, seconds * 1e3,
                    bytes / seconds / 1e9, factor * bytes / seconds / 1e9);
    };
    report("all_reduce", time_per_op(c, 10, [&] { return c.all_reduce(a.span()); }), 2 * ring);
    std::vector<int64_t> equal(size_t(n), int64_t(count) / n), unequal = equal;
    unequal[0] += 1;  // one element moved: the grouped paths
    unequal[1] -= 1;
    for (const auto* counts : {&equal, &unequal}) {
      const size_t total = size_t(std::accumulate(counts->begin(), counts->end(), int64_t(0)));
      const size_t mine = size_t((*counts)[size_t(r)]);
      const bool eq = counts == &equal;
      report(eq ? "reduce_scatter, equal counts" : "reduce_scatter, unequal (grouped)",
             time_per_op(c, 10, [&] {
               return c.reduce_scatter(std::span<const float>(a.span(0, total)), b.span(0, mine), *counts);
             }),
             ring);
      report(eq ? "all_gather, equal counts" : "all_gather, unequal (grouped)",
             time_per_op(c, 10, [&] {
               return c.all_gather(std::span<const float>(b.span(0, mine)), a.span(0, total), *counts);
             }),
             ring);
    }
  });
}

}  // namespace
}  // namespace tutti
