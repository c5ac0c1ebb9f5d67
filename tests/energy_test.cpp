// Energy counters: RAPL read from a powercap tree of the test's own (packages summed, sub-domains
// left out, wraparound), and the honest "no counter" where there is none.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "process_util.hpp"
#include "tutti/core/energy.hpp"

using namespace tutti;
using tutti::test::scratch;
namespace fs = std::filesystem;

namespace {

void write(const fs::path& p, uint64_t v) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << v << "\n";
}

TEST(Energy, RaplPackagesSummedAcrossAWrap) {
  const fs::path root = scratch() / "powercap";
  write(root / "intel-rapl:0" / "energy_uj", 1'000'000);
  write(root / "intel-rapl:0" / "max_energy_range_uj", 10'000'000);
  write(root / "intel-rapl:1" / "energy_uj", 5'000'000);
  write(root / "intel-rapl:1" / "max_energy_range_uj", 10'000'000);
  write(root / "intel-rapl:0:0" / "energy_uj", 0);  // the cores of package 0: not counted again
  write(root / "intel-rapl:0:0" / "max_energy_range_uj", 10'000'000);
  EnergyMeter meter(Device::cpu(), root.string());
  ASSERT_TRUE(meter.available()) << meter.source();
  EXPECT_EQ(meter.source(), "RAPL, 2 package domain(s)");
  EXPECT_DOUBLE_EQ(meter.joules(), 0.0);
  write(root / "intel-rapl:0" / "energy_uj", 3'500'000);  // +2.5 J
  write(root / "intel-rapl:1" / "energy_uj", 1'000'000);  // wrapped: +6 J
  write(root / "intel-rapl:0:0" / "energy_uj", 9'000'000);
  EXPECT_NEAR(meter.joules(), 8.5, 1e-9);
  write(root / "intel-rapl:0" / "energy_uj", 4'000'000);  // +0.5 J
  EXPECT_NEAR(meter.joules(), 9.0, 1e-9);
}

TEST(Energy, NoCounterSaysWhyAndReadsZero) {
  EnergyMeter meter(Device::cpu(), (scratch() / "no-such-powercap").string());
  EXPECT_FALSE(meter.available());
  EXPECT_NE(meter.source().find("no RAPL energy counters"), std::string::npos) << meter.source();
  EXPECT_EQ(meter.joules(), 0.0);
}

}  // namespace
