// main() of a *_mpi_test: every rank runs the whole suite under `mpirun -np N`; only rank 0
// prints gtest's usual output, other ranks print their failures, and the exit code is the worst
// over all ranks. Include once, in the test's .cpp, and return mpi_test_main from main.
#pragma once
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "tutti/comm/communicator.hpp"

namespace tutti::test {

class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int r) : rank_(r) {}
  void OnTestStart(const ::testing::TestInfo& info) override {
    name_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (result.failed())
      std::fprintf(stderr, "[rank %d] %s failed at %s:%d\n%s\n", rank_, name_.c_str(),
                   result.file_name() ? result.file_name() : "?", result.line_number(), result.summary());
  }

 private:
  int rank_;
  std::string name_;
};

// Runs every test on this rank with `world` (timeout 30 s: a broken test fails, never hangs).
inline int run_mpi_tests(int argc, char** argv, comm::Communicator& world, const char* name) {
  ::testing::InitGoogleTest(&argc, argv);
  world.set_timeout(std::chrono::seconds(30));
  if (world.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(world.rank()));
  }
  int64_t failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  world.all_reduce(std::span<int64_t>(&failed, 1), comm::ReduceOp::max)->wait();
  if (world.rank() == 0 && failed) std::fprintf(stderr, "%s: a test failed on some rank\n", name);
  return failed ? 1 : 0;
}

// The whole main() of an *_mpi_test: `world` points at the mpi world while the tests run.
inline int mpi_test_main(int argc, char** argv, const char* name, comm::Communicator*& world) {
  std::unique_ptr<comm::Communicator> owned = comm::make_world("mpi");
  world = owned.get();
  const int code = run_mpi_tests(argc, argv, *owned, name);
  world = nullptr;
  return code;
}

}  // namespace tutti::test
