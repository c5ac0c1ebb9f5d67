// Runs of the `tutti` program, alone or under mpirun, and comparisons of their results: the
// losses in metrics.jsonl and the weights of a checkpoint.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "process_util.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/ckpt/gpt_checkpoint.hpp"
#include "tutti/ckpt/safetensors.hpp"

namespace tutti::test {

inline bool have_mpirun() { return std::system("command -v mpirun >/dev/null 2>&1") == 0; }

inline const std::string kMpirun =
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 "
    "timeout 300 mpirun --oversubscribe --bind-to none ";

// A fixture for tests that launch with mpirun: skipped where there is none, or where tutti was
// built without MPI (its ranks would each be a world of one).
class MpirunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_mpirun()) GTEST_SKIP() << "mpirun not found (apt-get install openmpi-bin)";
    if (!comm::mpi_available()) GTEST_SKIP() << "tutti was built without MPI (cmake -DTUTTI_MPI=ON)";
  }
};

// `tutti ARGS` in one process (np 0) or under mpirun -np np.
inline Result run_tutti(int np, const std::string& args) {
  const std::string cmd = std::string(TUTTI_CLI) + args;
  return shell(np == 0 ? cmd : kMpirun + "-np " + std::to_string(np) + " " + cmd);
}

// step -> training loss of a run directory.
inline std::map<int, double> losses(const fs::path& run) {
  std::map<int, double> out;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out[j["step"].get<int>()] = j["loss"].get<double>();
  }
  return out;
}

// Every step of `a` from first_step on has the same loss in `b` (within `rel`, relative).
inline void expect_same_losses(const fs::path& a, const fs::path& b, int first_step = 1, double rel = 1e-5) {
  const auto la = losses(a), lb = losses(b);
  ASSERT_FALSE(la.empty());
  for (const auto& [step, loss] : la) {
    if (step < first_step) continue;
    ASSERT_TRUE(lb.count(step)) << b << " has no step " << step;
    EXPECT_NEAR(lb.at(step), loss, rel * std::abs(loss)) << "step " << step << ": " << a << " vs " << b;
  }
}

// A failed launch whose every rank printed its error ("(rank r of np): ...") including `what`.
inline void expect_every_rank_says(const Result& r, int np, const std::string& what) {
  EXPECT_NE(r.code, 0);
  for (int rank = 0; rank < np; ++rank)
    EXPECT_NE(r.err.find("(rank " + std::to_string(rank) + " of " + std::to_string(np) + "): "), std::string::npos)
        << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << r.err;
}

inline fs::path checkpoint_of(const fs::path& run, int step) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08d", step);
  return run / "checkpoints" / name;
}

// The weights of checkpoint `step` of two runs (one file or sharded by pipeline stage) differ by at
// most `tolerance` (0: bitwise equal).
inline void expect_same_weights(const fs::path& a, const fs::path& b, int step, int step_b = -1,
                                double tolerance = 1e-5) {
  std::map<std::string, Tensor> wa, wb;
  for (auto& [name, t] : ckpt::read_gpt_tensors(checkpoint_of(a, step).string())) wa.emplace(name, t);
  for (auto& [name, t] : ckpt::read_gpt_tensors(checkpoint_of(b, step_b < 0 ? step : step_b).string())) wb.emplace(name, t);
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [name, ta] : wa) {
    ASSERT_TRUE(wb.count(name)) << name << " is missing in " << b;
    const auto va = ta.to_vector<float>(), vb = wb.at(name).to_vector<float>();
    ASSERT_EQ(va.size(), vb.size()) << name;
    if (tolerance == 0) {
      EXPECT_TRUE(va == vb) << name << " differs";
      continue;
    }
    double worst = 0;
    for (size_t k = 0; k < va.size(); ++k) worst = std::max(worst, double(std::abs(va[k] - vb[k])));
    EXPECT_LE(worst, tolerance) << name;
  }
}

}  // namespace tutti::test
