// The mpi backend under a real launcher: `mpirun -np N comm_mpi_test` (CTest runs N = 2, 3, 4).
// Every rank runs the whole suite; data is deterministic per rank, so each rank computes the
// expected result of every collective by itself. Only rank 0 prints the usual gtest output; other
// ranks print their failures, and the process's exit code is the worst over all ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "comm/backends.hpp"
#include "mpi_test_main.hpp"
#include "test_util.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/parallel/mesh.hpp"

namespace tutti {
namespace {

using comm::Communicator;
using comm::Millis;
using comm::ReduceOp;
using Clock = std::chrono::steady_clock;

Communicator* g_world = nullptr;
Communicator& world() { return *g_world; }
int rank() { return g_world->rank(); }
int nranks() { return g_world->size(); }

using test::message_of;

// Rank r's element i: small integers (sums are exact in every type, u8 sums stay below 256 for
// up to 4 ranks), with negatives for the signed types so max and min differ from sum.
template <class T>
T value(int r, int64_t i, int salt = 0) {
  const int64_t v = (r * 7 + i * 3 + salt * 5) % 23;
  if constexpr (std::is_unsigned_v<T>) return static_cast<T>(v % 60);
  else return static_cast<T>(v - 11);
}

template <class T>
T reduce_ref(ReduceOp op, int64_t i, int salt) {
  T acc = value<T>(0, i, salt);
  for (int r = 1; r < nranks(); ++r) {
    const T v = value<T>(r, i, salt);
    acc = op == ReduceOp::sum ? T(acc + v) : op == ReduceOp::max ? std::max(acc, v) : std::min(acc, v);
  }
  return acc;
}

// The same sizes on every rank: a fixed seed, plus the edge sizes.
std::vector<int64_t> test_sizes() {
  std::mt19937 rng(1234);
  std::vector<int64_t> sizes{0, 1, 2, 3, nranks() - 1, nranks() + 1, 4 * nranks() + 3, 1000, 4097};
  for (int k = 0; k < 4; ++k) sizes.push_back(std::uniform_int_distribution<int64_t>(0, 20000)(rng));
  return sizes;
}

// Uneven chunk counts, some zero, equal on every rank.
std::vector<int64_t> uneven_counts(unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> counts(static_cast<size_t>(nranks()));
  for (auto& c : counts) c = std::uniform_int_distribution<int64_t>(0, 3)(rng) == 0 ? 0 : rng() % 3000;
  counts[seed % counts.size()] = 1;
  return counts;
}

template <class T>
class TypedComm : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, int32_t, int64_t, uint8_t>;
TYPED_TEST_SUITE(TypedComm, ElementTypes);

// ---- collectives against references -----------------------------------------------------------

TYPED_TEST(TypedComm, AllReduceManyOutstandingCompleteInOrder) {
  using T = TypeParam;
  struct Case {
    ReduceOp op;
    int salt;
    std::vector<T> data;
    comm::WorkHandle work;
  };
  std::vector<Case> cases;
  int salt = 0;
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min})
    for (int64_t n : test_sizes()) {
      Case c{op, ++salt, std::vector<T>(size_t(n)), nullptr};
      for (int64_t i = 0; i < n; ++i) c.data[size_t(i)] = value<T>(rank(), i, c.salt);
      cases.push_back(std::move(c));
    }
  for (Case& c : cases) c.work = world().all_reduce(std::span<T>(c.data), c.op);  // all in flight
  cases.back().work->wait();
  for (Case& c : cases) EXPECT_TRUE(c.work->is_completed()) << "a later all_reduce completed before an earlier one";
  for (Case& c : cases) {
    c.work->wait();
    int64_t wrong = 0;
    for (int64_t i = 0; i < int64_t(c.data.size()); ++i) wrong += c.data[size_t(i)] != reduce_ref<T>(c.op, i, c.salt);
    EXPECT_EQ(wrong, 0) << "op " << int(c.op) << ", " << c.data.size() << " elements";
  }
}

TYPED_TEST(TypedComm, ReduceScatterUnevenCounts) {
  using T = TypeParam;
  for (unsigned seed : {1u, 2u, 3u}) {
    const std::vector<int64_t> counts = uneven_counts(seed);
    std::vector<int64_t> offsets(counts.size() + 1, 0);
    std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
    std::vector<T> in(size_t(offsets.back()));
    for (size_t i = 0; i < in.size(); ++i) in[i] = value<T>(rank(), int64_t(i), int(seed));
    std::vector<T> out(size_t(counts[size_t(rank())]), T(99));
    world().reduce_scatter(std::span<const T>(in), std::span<T>(out), counts)->wait();
    int64_t wrong = 0;
    for (size_t i = 0; i < out.size(); ++i)
      wrong += out[i] != reduce_ref<T>(ReduceOp::sum, offsets[size_t(rank())] + int64_t(i), int(seed));
    EXPECT_EQ(wrong, 0) << "seed " << seed;
  }
}

TYPED_TEST(TypedComm, AllGatherUnevenCountsAndInPlace) {
  using T = TypeParam;
  for (unsigned seed : {4u, 5u}) {
    const std::vector<int64_t> counts = uneven_counts(seed);
    std::vector<int64_t> offsets(counts.size() + 1, 0);
    std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
    const int64_t mine = counts[size_t(rank())], at = offsets[size_t(rank())];
    std::vector<T> in(static_cast<size_t>(mine));
    for (int64_t i = 0; i < mine; ++i) in[size_t(i)] = value<T>(rank(), at + i, int(seed));
    std::vector<T> out(size_t(offsets.back()), T(99));
    std::vector<T> in_place(size_t(offsets.back()), T(99));
    std::copy(in.begin(), in.end(), in_place.begin() + at);
    auto a = world().all_gather(std::span<const T>(in), std::span<T>(out), counts);
    auto b = world().all_gather(std::span<const T>(in_place.data() + at, size_t(mine)), std::span<T>(in_place), counts);
    a->wait();
    b->wait();
    std::vector<T> expected(out.size());
    for (int r = 0; r < nranks(); ++r)
      for (int64_t i = offsets[size_t(r)]; i < offsets[size_t(r) + 1]; ++i) expected[size_t(i)] = value<T>(r, i, int(seed));
    EXPECT_EQ(out, expected) << "seed " << seed;
    EXPECT_EQ(in_place, expected) << "in place, seed " << seed;
  }
}

TYPED_TEST(TypedComm, BroadcastFromEveryRoot) {
  using T = TypeParam;
  for (int root = 0; root < nranks(); ++root)
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(777)}) {
      std::vector<T> data(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) data[size_t(i)] = value<T>(rank(), i, root);
      world().broadcast(std::span<T>(data), root)->wait();
      int64_t wrong = 0;
      for (int64_t i = 0; i < n; ++i) wrong += data[size_t(i)] != value<T>(root, i, root);
      EXPECT_EQ(wrong, 0) << "root " << root << ", " << n << " elements";
    }
}

TYPED_TEST(TypedComm, SendRecvRing) {
  using T = TypeParam;
  const int next = (rank() + 1) % nranks(), prev = (rank() + nranks() - 1) % nranks();
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(5000)}) {
    std::vector<T> out(static_cast<size_t>(n)), in(static_cast<size_t>(n)), self_in(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) out[size_t(i)] = value<T>(rank(), i, 3);
    auto r = world().recv(std::span<T>(in), prev, 7);  // posted before the matching send
    auto self_r = world().recv(std::span<T>(self_in), rank(), 8);
    auto s = world().send(std::span<const T>(out), next, 7);
    auto self_s = world().send(std::span<const T>(out), rank(), 8);
    for (auto& w : {r, self_r, s, self_s}) w->wait();
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) wrong += in[size_t(i)] != value<T>(prev, i, 3);
    EXPECT_EQ(wrong, 0) << n << " elements";
    EXPECT_EQ(self_in, out);
  }
}

// One of each collective in flight at once, waited for in reverse order.
TEST(Comm, MixedCollectivesInFlight) {
  const std::vector<int64_t> counts = uneven_counts(9);
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t(0));
  const int64_t mine = counts[size_t(rank())];
  int64_t at = 0;
  for (int r = 0; r < rank(); ++r) at += counts[size_t(r)];
  std::vector<double> rs_in(static_cast<size_t>(total)), rs_out(static_cast<size_t>(mine));
  for (int64_t i = 0; i < total; ++i) rs_in[size_t(i)] = value<double>(rank(), i, 1);
  std::vector<int32_t> ag_in(static_cast<size_t>(mine)), ag_out(static_cast<size_t>(total));
  for (int64_t i = 0; i < mine; ++i) ag_in[size_t(i)] = value<int32_t>(rank(), at + i, 2);
  std::vector<uint8_t> bc(333);
  for (size_t i = 0; i < bc.size(); ++i) bc[i] = value<uint8_t>(rank(), int64_t(i), 3);
  std::vector<float> ar(1001);
  for (size_t i = 0; i < ar.size(); ++i) ar[i] = value<float>(rank(), int64_t(i), 4);
  std::vector<comm::WorkHandle> works{
      world().reduce_scatter(std::span<const double>(rs_in), std::span<double>(rs_out), counts),
      world().all_gather(std::span<const int32_t>(ag_in), std::span<int32_t>(ag_out), counts),
      world().broadcast(std::span<uint8_t>(bc), nranks() / 2),
      world().all_reduce(std::span<float>(ar), ReduceOp::max),
      world().barrier()};
  for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait();
  for (int64_t i = 0; i < mine; ++i) EXPECT_EQ(rs_out[size_t(i)], reduce_ref<double>(ReduceOp::sum, at + i, 1));
  int64_t offset = 0;
  for (int r = 0; r < nranks(); ++r)
    for (int64_t i = 0; i < counts[size_t(r)]; ++i, ++offset)
      EXPECT_EQ(ag_out[size_t(offset)], value<int32_t>(r, offset, 2));
  for (size_t i = 0; i < bc.size(); ++i) EXPECT_EQ(bc[i], value<uint8_t>(nranks() / 2, int64_t(i), 3));
  for (size_t i = 0; i < ar.size(); ++i) EXPECT_EQ(ar[i], reduce_ref<float>(ReduceOp::max, int64_t(i), 4));
}

TEST(Comm, BarrierAndArgumentChecks) {
  world().barrier()->wait();
  std::vector<float> x(4);
  EXPECT_THROW(world().broadcast(std::span<float>(x), nranks()), InvalidArgument);
  EXPECT_THROW(world().send(std::span<const float>(x), -1, 0), InvalidArgument);
  EXPECT_THROW(world().send(std::span<const float>(x), 0, -3), InvalidArgument);
  EXPECT_THROW(world().all_gather(std::span<const float>(x), std::span<float>(x), {4}), InvalidArgument);
  EXPECT_THROW(world().split(-1, 0), InvalidArgument);
  EXPECT_EQ(world().backend(), "mpi");
  world().barrier()->wait();
}

// Messages longer than one MPI call may carry are cut into pieces (here, pieces of 7 elements);
// the v-collectives refuse them instead.
TEST(Comm, LongMessagesAreCut) {
  comm::set_mpi_max_message_elements(7);
  std::vector<int64_t> data(100), bytes(50), p2p(23), got(23);
  for (size_t i = 0; i < data.size(); ++i) data[i] = value<int64_t>(rank(), int64_t(i));
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = value<int64_t>(rank(), int64_t(i), 1);
  for (size_t i = 0; i < p2p.size(); ++i) p2p[i] = value<int64_t>(rank(), int64_t(i), 2);
  world().all_reduce(std::span<int64_t>(data))->wait();
  world().broadcast(std::span<int64_t>(bytes), nranks() - 1)->wait();
  const int next = (rank() + 1) % nranks(), prev = (rank() + nranks() - 1) % nranks();
  auto r = world().recv(std::span<int64_t>(got), prev, 1);
  world().send(std::span<const int64_t>(p2p), next, 1)->wait();
  r->wait();
  std::vector<int64_t> counts(size_t(nranks()), 4), whole(size_t(4 * nranks())), part(4);
  const std::string refused = message_of([&] {
    world().all_gather(std::span<const int64_t>(part), std::span<int64_t>(whole), counts);
  });
  comm::set_mpi_max_message_elements(INT32_MAX);
  for (size_t i = 0; i < data.size(); ++i) EXPECT_EQ(data[i], reduce_ref<int64_t>(ReduceOp::sum, int64_t(i), 0));
  for (size_t i = 0; i < bytes.size(); ++i) EXPECT_EQ(bytes[i], value<int64_t>(nranks() - 1, int64_t(i), 1));
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], value<int64_t>(prev, int64_t(i), 2));
  if (4 * nranks() > 7) EXPECT_NE(refused.find("exceed what one MPI call can address"), std::string::npos) << refused;
}

// A receive shorter than the message fails (MPI truncation), one longer says what arrived; the
// communicator is then unusable, so this uses a copy of the world.
TEST(Comm, MismatchedReceiveFails) {
  auto sub = world().split(0, rank());
  if (sub->size() >= 2 && rank() < 2) {
    std::vector<float> five(5, 1.0f), three(3), ten(10);
    if (rank() == 0) {
      sub->send(std::span<const float>(five), 1, 1)->wait();
      sub->send(std::span<const float>(five), 1, 2)->wait();
    } else {
      EXPECT_THROW(sub->recv(std::span<float>(three), 0, 1)->wait(), CommError);
      const std::string message = message_of([&] { sub->recv(std::span<float>(ten), 0, 2)->wait(); });
      EXPECT_NE(message.find("already failed"), std::string::npos) << message;
    }
  }
  world().barrier()->wait();
}

// ---- groups -------------------------------------------------------------------------------------

// The world ranks of `group`'s members, in group rank order.
std::vector<int32_t> members(Communicator& group) {
  std::vector<int32_t> mine{rank()}, all(size_t(group.size()));
  group.all_gather(std::span<const int32_t>(mine), std::span<int32_t>(all),
                   std::vector<int64_t>(size_t(group.size()), 1))->wait();
  return all;
}

TEST(Comm, SplitEvenOdd) {
  auto parity = world().split(rank() % 2, rank());
  std::vector<int32_t> expected;
  for (int r = rank() % 2; r < nranks(); r += 2) expected.push_back(r);
  EXPECT_EQ(members(*parity), expected);
  EXPECT_EQ(parity->rank(), rank() / 2);
  // Reversed keys reverse the order; collectives on both groups at once.
  auto reversed = world().split(rank() % 2, nranks() - rank());
  std::reverse(expected.begin(), expected.end());
  std::vector<int64_t> sum{rank()}, max_rank{rank()};
  auto a = parity->all_reduce(std::span<int64_t>(sum));
  auto b = reversed->all_reduce(std::span<int64_t>(max_rank), ReduceOp::max);
  a->wait();
  b->wait();
  EXPECT_EQ(sum[0], std::accumulate(expected.begin(), expected.end(), int64_t(0)));
  EXPECT_EQ(max_rank[0], expected.front());
  EXPECT_EQ(members(*reversed), expected);
  std::vector<double> token{double(rank())};
  reversed->broadcast(std::span<double>(token), 0)->wait();
  EXPECT_EQ(token[0], double(expected.front()));
}

// Communicators made and dropped in a loop, each after a broadcast whose root finishes before the
// other ranks have started it: the context ids are reused, and nothing of an old communicator
// (its arrival announcements) may leak into a new one.
TEST(Comm, ShortLivedGroupsAfterBroadcasts) {
  for (int k = 0; k < 40; ++k) {
    auto group = world().split(k % 2, rank());
    std::vector<int64_t> token{rank() == 0 ? k : -1};
    if (rank() != 0) std::this_thread::sleep_for(std::chrono::microseconds(200 * (rank() + k % 3)));
    group->broadcast(std::span<int64_t>(token), 0)->wait();
    EXPECT_EQ(token[0], k) << "round " << k;
  }
  std::vector<int64_t> sum{1};
  world().all_reduce(std::span<int64_t>(sum))->wait();
  EXPECT_EQ(sum[0], nranks());
}

TEST(Comm, MeshGroups) {
  std::vector<parallel::MeshShape> shapes{{nranks(), 1, 1}, {1, nranks(), 1}, {1, 1, nranks()}};
  if (nranks() == 4) shapes.insert(shapes.end(), {{1, 2, 2}, {2, 2, 1}, {2, 1, 2}});
  for (const parallel::MeshShape& shape : shapes) {
    parallel::Mesh mesh(world(), shape);
    const parallel::MeshCoord c = parallel::mesh_coord(shape, rank());
    EXPECT_EQ(mesh.dp_rank(), c.dp);
    EXPECT_EQ(mesh.pp_rank(), c.pp);
    EXPECT_EQ(mesh.tp_rank(), c.tp);
    std::vector<int32_t> dp, pp, tp;
    for (int d = 0; d < shape.dp; ++d) dp.push_back(parallel::mesh_rank(shape, {d, c.pp, c.tp}));
    for (int p = 0; p < shape.pp; ++p) pp.push_back(parallel::mesh_rank(shape, {c.dp, p, c.tp}));
    for (int t = 0; t < shape.tp; ++t) tp.push_back(parallel::mesh_rank(shape, {c.dp, c.pp, t}));
    const std::string where = mesh.describe();
    EXPECT_EQ(members(mesh.dp_group()), dp) << where;
    EXPECT_EQ(members(mesh.pp_group()), pp) << where;
    EXPECT_EQ(members(mesh.tp_group()), tp) << where;
    EXPECT_EQ(where, "rank " + std::to_string(rank()) + ": dp " + std::to_string(c.dp) + "/" + std::to_string(shape.dp) +
                         ", pp " + std::to_string(c.pp) + "/" + std::to_string(shape.pp) + ", tp " +
                         std::to_string(c.tp) + "/" + std::to_string(shape.tp));
  }
  const std::string message = message_of([] { parallel::Mesh(world(), {nranks(), 2, 1}); });
  EXPECT_NE(message.find("does not match the world size " + std::to_string(nranks())), std::string::npos) << message;
}

// ---- timeouts -----------------------------------------------------------------------------------

// Rank 1 of a group (in reversed world order, so messages must name world ranks too) arrives
// 1.5 s late at the group's first all_reduce; everyone else gives up after 300 ms with a message
// naming the collective, its number, the step and the late rank. The late rank then arrives, the
// collective completes everywhere (so the job ends cleanly), and the group stays poisoned on the
// ranks that timed out.
TEST(Comm, TimeoutNamesTheMissingRank) {
  auto group = world().split(0, nranks() - rank());
  group->set_step(42);
  const int late_world_rank = nranks() - 2;
  std::vector<float> data{float(rank())};
  if (group->rank() == 1) {
    std::this_thread::sleep_for(Millis(1500));
    group->all_reduce(std::span<float>(data))->wait(Millis(30000));
  } else {
    auto work = group->all_reduce(std::span<float>(data));
    const auto t0 = Clock::now();
    std::string message;
    try {
      work->wait(Millis(300));
      ADD_FAILURE() << "no timeout";
    } catch (const Timeout& e) {
      message = e.what();
    }
    EXPECT_LT(Clock::now() - t0, Millis(1400));
    const std::string expected = "all_reduce #1 (step 42) timed out after 300ms on rank " +
                                 std::to_string(group->rank()) + " (world rank " + std::to_string(rank()) +
                                 "): rank 1 (world " + std::to_string(late_world_rank) + ") had not arrived";
    EXPECT_EQ(message, expected);
    work->wait(Millis(30000));  // the late rank arrives: the collective itself completes
    const std::string refused = message_of([&] { group->barrier(); });
    EXPECT_NE(refused.find("barrier on a communicator that already failed: all_reduce #1 (step 42) timed out"),
              std::string::npos)
        << refused;
  }
  EXPECT_EQ(data[0], float(nranks() * (nranks() - 1) / 2));
  world().barrier()->wait();
}

TEST(Comm, ReceiveTimeoutNamesThePeer) {
  auto group = world().split(0, rank());
  group->set_step(7);
  std::vector<int32_t> box{rank()};
  if (rank() == 0) {
    auto work = group->recv(std::span<int32_t>(box), 1, 99);
    const std::string message = message_of([&] { work->wait(Millis(200)); });
    EXPECT_EQ(message, "recv #1 (step 7) from rank 1 with tag 99 timed out after 200ms on rank 0");
    world().send(std::span<const int32_t>(box), 1, 100)->wait();  // `group` refuses work now
    work->wait(Millis(30000));
    EXPECT_EQ(box[0], 1);
  } else if (rank() == 1) {
    std::vector<int32_t> go(1);
    world().recv(std::span<int32_t>(go), 0, 100)->wait();  // only after rank 0 has timed out
    group->send(std::span<const int32_t>(box), 0, 99)->wait();
  }
  world().barrier()->wait();
}

// ---- speed (printed, not asserted) ----------------------------------------------------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times of all_reduce through the progress thread beside a blocking MPI_Allreduce called
// directly on the same data in the same run (the machine's load varies by the minute).
TEST(CommSpeed, AllReduceTimes) {
  int level = 0;
  MPI_Query_thread(&level);
  for (int64_t mib : {1, 64}) {
    const int64_t n = mib * (1 << 20) / 4;
    std::vector<float> data(static_cast<size_t>(n), 1.0f);
    const int reps = mib == 1 ? 50 : 8;
    std::vector<double> tutti_s, mpi_s;
    for (int k = 0; k < reps + 2; ++k) {
      world().barrier()->wait();
      auto t0 = Clock::now();
      world().all_reduce(std::span<float>(data))->wait();
      if (k >= 2) tutti_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      if (level != MPI_THREAD_MULTIPLE) continue;  // the direct call needs a second thread in MPI
      world().barrier()->wait();
      t0 = Clock::now();
      MPI_Allreduce(MPI_IN_PLACE, data.data(), int(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      if (k >= 2) mpi_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    // The slowest rank's time of each repetition.
    world().all_reduce(std::span<double>(tutti_s), ReduceOp::max)->wait();
    world().all_reduce(std::span<double>(mpi_s), ReduceOp::max)->wait();
    if (rank() != 0) continue;
    std::printf("[ speed    ] all_reduce %2lld MiB f32, %d ranks, poll %s us: tutti best %8.1f us, median %8.1f us",
                (long long)mib, nranks(), std::getenv("TUTTI_COMM_POLL_US") ? std::getenv("TUTTI_COMM_POLL_US") : "default",
                *std::min_element(tutti_s.begin(), tutti_s.end()) * 1e6, median(tutti_s) * 1e6);
    if (!mpi_s.empty())
      std::printf(" | MPI_Allreduce best %8.1f us, median %8.1f us", *std::min_element(mpi_s.begin(), mpi_s.end()) * 1e6,
                  median(mpi_s) * 1e6);
    std::printf("\n");
  }
}

}  // namespace
}  // namespace tutti

int main(int argc, char** argv) {
  return tutti::test::mpi_test_main(argc, argv, "comm_mpi_test", tutti::g_world);
}
