// The local backend (a world of one), the Work handle, argument checks, and the Mesh's grid
// arithmetic for shapes larger than one rank. Multi-rank behaviour is in comm_mpi_test.cpp.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

#include "comm/collective_args.hpp"
#include "comm/work.hpp"
#include "test_util.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/parallel/mesh.hpp"

namespace tutti {
namespace {

using comm::Communicator;
using comm::ElemType;
using comm::Millis;
using comm::ReduceOp;
using parallel::MeshCoord;
using parallel::MeshShape;

using test::message_of;

// ---- local backend --------------------------------------------------------------------------

TEST(LocalComm, WorldOfOne) {
  auto world = comm::make_local();
  EXPECT_EQ(world->rank(), 0);
  EXPECT_EQ(world->size(), 1);
  EXPECT_EQ(world->backend(), "local");
  EXPECT_EQ(comm::make_world("local")->backend(), "local");
  // ctest does not start this test under a launcher, so "auto" is local.
  if (!std::getenv("OMPI_COMM_WORLD_SIZE")) EXPECT_EQ(comm::make_world("auto")->backend(), "local");
  EXPECT_THROW(comm::make_world("nccl"), InvalidArgument);
  if (!comm::mpi_available()) EXPECT_THROW(comm::make_world("mpi"), CommError);
}

template <class T>
void check_all_reduce_identity() {
  auto world = comm::make_local();
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
    for (size_t n : {0, 1, 5, 1000}) {
      std::vector<T> data(n);
      for (size_t i = 0; i < n; ++i) data[i] = static_cast<T>(i % 7 + 1);
      const std::vector<T> before = data;
      auto work = world->all_reduce(std::span<T>(data), op);
      EXPECT_TRUE(work->is_completed());
      work->wait(Millis(0));
      EXPECT_EQ(data, before);
    }
  }
}

TEST(LocalComm, AllReduceIsIdentityForEveryType) {
  check_all_reduce_identity<float>();
  check_all_reduce_identity<double>();
  check_all_reduce_identity<int32_t>();
  check_all_reduce_identity<int64_t>();
  check_all_reduce_identity<uint8_t>();
}

TEST(LocalComm, ReduceScatterAndAllGatherCopy) {
  auto world = comm::make_local();
  std::vector<double> in{1, 2, 3}, out(3, 0);
  world->reduce_scatter(std::span<const double>(in), std::span<double>(out), {3})->wait();
  EXPECT_EQ(out, in);
  std::vector<int64_t> mine{4, 5}, all(2, 0);
  world->all_gather(std::span<const int64_t>(mine), std::span<int64_t>(all), {2})->wait();
  EXPECT_EQ(all, mine);
  // Empty chunks.
  std::vector<float> none;
  world->reduce_scatter(std::span<const float>(none), std::span<float>(none), {0})->wait();
  world->all_gather(std::span<const float>(none), std::span<float>(none), {0})->wait();
  // In place: the same memory as input and output.
  std::vector<int32_t> same{7, 8, 9};
  world->all_gather(std::span<const int32_t>(same), std::span<int32_t>(same), {3})->wait();
  EXPECT_EQ(same, (std::vector<int32_t>{7, 8, 9}));
}

TEST(LocalComm, BadChunkArgumentsAreRejected) {
  auto world = comm::make_local();
  std::vector<float> in(4), out(4), small(3);
  EXPECT_THROW(world->reduce_scatter(std::span<const float>(in), std::span<float>(out), {3}), InvalidArgument);
  EXPECT_THROW(world->reduce_scatter(std::span<const float>(in), std::span<float>(out), {2, 2}), InvalidArgument);
  EXPECT_THROW(world->reduce_scatter(std::span<const float>(in), std::span<float>(small), {4}), InvalidArgument);
  EXPECT_THROW(world->all_gather(std::span<const float>(in), std::span<float>(out), {-1}), InvalidArgument);
  EXPECT_THROW(world->all_gather(std::span<const float>(small), std::span<float>(out), {4}), InvalidArgument);
  const std::string message =
      message_of([&] { world->reduce_scatter(std::span<const float>(in), std::span<float>(out), {5}); });
  EXPECT_NE(message.find("reduce_scatter: the counts sum to 5 elements but the full buffer holds 4"), std::string::npos)
      << message;
}

TEST(LocalComm, BroadcastSendRecvBarrier) {
  auto world = comm::make_local();
  std::vector<uint8_t> bytes{1, 2, 3};
  world->broadcast(std::span<uint8_t>(bytes), 0)->wait();
  EXPECT_EQ(bytes, (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_THROW(world->broadcast(std::span<uint8_t>(bytes), 1), InvalidArgument);
  world->barrier()->wait();
  const std::string message = message_of([&] { world->send(std::span<const uint8_t>(bytes), 0, 0); });
  EXPECT_NE(message.find("no peer in a world of one"), std::string::npos) << message;
  EXPECT_THROW(world->recv(std::span<uint8_t>(bytes), 0, 0), CommError);
  EXPECT_THROW(world->recv(std::span<uint8_t>(bytes), 2, 0), InvalidArgument);
}

TEST(LocalComm, SplitInheritsStepAndTimeout) {
  auto world = comm::make_local();
  world->set_step(12);
  world->set_timeout(Millis(1500));
  auto sub = world->split(3, 0);
  EXPECT_EQ(sub->size(), 1);
  EXPECT_EQ(sub->backend(), "local");
  EXPECT_EQ(sub->step(), 12);
  EXPECT_EQ(sub->timeout(), Millis(1500));
  EXPECT_THROW(world->split(-1, 0), InvalidArgument);
}

TEST(Buffer, CarriesTypeAndCountFromTheSpan) {
  std::vector<int64_t> v(5);
  const comm::Buffer b = comm::Buffer::of(std::span<const int64_t>(v));
  EXPECT_EQ(b.count, 5);
  EXPECT_EQ(b.type, ElemType::i64);
  EXPECT_EQ(b.data, v.data());
  EXPECT_EQ(comm::elem_size(ElemType::u8), 1u);
  EXPECT_EQ(comm::elem_size(ElemType::f64), 8u);
  EXPECT_EQ(comm::format_duration(Millis(250)), "250ms");
  EXPECT_EQ(comm::format_duration(Millis(5000)), "5s");
  EXPECT_EQ(comm::format_duration(Millis(1500)), "1.5s");
  EXPECT_EQ(comm::format_duration(std::chrono::minutes(5)), "5.0min");
}

// ---- Work -------------------------------------------------------------------------------------

TEST(Work, TimeoutMessageComesFromTheBackend) {
  int calls = 0;
  comm::CompletionWork work(Millis(20), [&](Millis waited) {
    ++calls;
    return "all_reduce #3 timed out after " + comm::format_duration(waited);
  });
  EXPECT_FALSE(work.is_completed());
  const std::string message = message_of([&] { work.wait(); });
  EXPECT_EQ(message, "all_reduce #3 timed out after 20ms");
  EXPECT_THROW(work.wait(Millis(1)), Timeout);
  EXPECT_EQ(calls, 2);
  work.finish();
  work.wait(Millis(0));
  work.wait(Millis::max());
}

TEST(Work, WakesWaiterAndRethrowsErrorEveryTime) {
  comm::CompletionWork work(Millis(10000), nullptr);
  std::thread finisher([&] {
    std::this_thread::sleep_for(Millis(30));
    work.finish(std::make_exception_ptr(CommError("transport failed")));
  });
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(work.wait(), CommError);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  finisher.join();
  EXPECT_TRUE(work.is_completed());
  EXPECT_THROW(work.wait(Millis(0)), CommError);
}

// ---- Mesh ---------------------------------------------------------------------------------------

TEST(Mesh, CoordinatesPutTpFastestThenPpThenDp) {
  const MeshShape shape{2, 3, 4};
  EXPECT_EQ(parallel::mesh_coord(shape, 0), (MeshCoord{0, 0, 0}));
  EXPECT_EQ(parallel::mesh_coord(shape, 1), (MeshCoord{0, 0, 1}));
  EXPECT_EQ(parallel::mesh_coord(shape, 4), (MeshCoord{0, 1, 0}));
  EXPECT_EQ(parallel::mesh_coord(shape, 12), (MeshCoord{1, 0, 0}));
  EXPECT_EQ(parallel::mesh_coord(shape, 23), (MeshCoord{1, 2, 3}));
  EXPECT_EQ(parallel::mesh_rank(shape, {1, 1, 2}), 18);
  EXPECT_THROW(parallel::mesh_coord(shape, 24), InvalidArgument);
  EXPECT_THROW(parallel::mesh_rank(shape, {0, 3, 0}), InvalidArgument);
}

TEST(Mesh, EveryShapeIsABijection) {
  for (MeshShape shape : {MeshShape{1, 1, 1}, MeshShape{4, 1, 1}, MeshShape{1, 4, 1}, MeshShape{1, 1, 4},
                          MeshShape{2, 2, 1}, MeshShape{1, 2, 2}, MeshShape{2, 1, 2}, MeshShape{2, 2, 2},
                          MeshShape{3, 2, 5}}) {
    std::set<int> seen;
    for (int d = 0; d < shape.dp; ++d)
      for (int p = 0; p < shape.pp; ++p)
        for (int t = 0; t < shape.tp; ++t) {
          const int r = parallel::mesh_rank(shape, {d, p, t});
          EXPECT_EQ(r, (d * shape.pp + p) * shape.tp + t);
          EXPECT_EQ(parallel::mesh_coord(shape, r), (MeshCoord{d, p, t}));
          seen.insert(r);
        }
    EXPECT_EQ(seen.size(), size_t(shape.size()));
    EXPECT_EQ(*seen.rbegin(), shape.size() - 1);
  }
}

TEST(Mesh, ShapeMustMatchTheWorld) {
  EXPECT_EQ(message_of([] { parallel::check_mesh_shape({2, 1, 2}, 8); }),
            "mesh dp x pp x tp = 2 x 1 x 2 = 4 does not match the world size 8");
  EXPECT_NE(message_of([] { parallel::check_mesh_shape({0, 1, 1}, 0); }).find("every size must be at least 1"),
            std::string::npos);
  EXPECT_THROW(parallel::check_mesh_shape({-2, -1, 2}, 4), InvalidArgument);
  parallel::check_mesh_shape({2, 2, 2}, 8);
  auto world = comm::make_local();
  EXPECT_THROW(parallel::Mesh(*world, {2, 1, 1}), InvalidArgument);
}

TEST(Mesh, WorldOfOneHasGroupsOfOne) {
  auto world = comm::make_local();
  parallel::Mesh mesh(*world, {1, 1, 1});
  EXPECT_EQ(mesh.describe(), "rank 0: dp 0/1, pp 0/1, tp 0/1");
  EXPECT_EQ(mesh.dp_group().size(), 1);
  EXPECT_EQ(mesh.pp_group().size(), 1);
  EXPECT_EQ(mesh.tp_group().size(), 1);
  mesh.set_step(9);
  EXPECT_EQ(world->step(), 9);
  EXPECT_EQ(mesh.dp_group().step(), 9);
  EXPECT_EQ(mesh.tp_group().step(), 9);
  std::vector<float> x{1.5f};
  mesh.dp_group().all_reduce(std::span<float>(x))->wait();
  EXPECT_EQ(x[0], 1.5f);
}

}  // namespace
}  // namespace tutti
