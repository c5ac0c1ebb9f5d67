// Energy counters: the joules the hardware itself reports, never an estimate. On the CPU, the
// RAPL package domains the kernel exposes under /sys/class/powercap (intel-rapl:N, also on AMD);
// on an NVIDIA GPU, NVML's total energy since the driver loaded (Volta and later), read through
// libnvidia-ml.so.1 loaded at run time, so tutti needs no NVML at build time. Where neither
// exists (a VM usually hides RAPL), available() is false and why() says so.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tutti/core/device.hpp"

namespace tutti {

class EnergyMeter {
 public:
  // The counter of `device`'s hardware. `powercap_root` is where RAPL is looked for (tests point
  // it at a directory of their own).
  explicit EnergyMeter(Device device, const std::string& powercap_root = "/sys/class/powercap");
  ~EnergyMeter();
  EnergyMeter(const EnergyMeter&) = delete;
  EnergyMeter& operator=(const EnergyMeter&) = delete;

  bool available() const { return available_; }
  // "RAPL, 2 package domains" / "NVML, cuda:0"; or, when not available, why.
  const std::string& source() const { return source_; }
  // Joules since construction (0 when not available). Counter wraparounds are accounted for as
  // long as this is called at least once per wrap (RAPL: minutes at full power).
  double joules();

 private:
  struct Rapl {
    std::string file;
    uint64_t range = 0, last = 0;
  };
  double read_rapl();
  double read_nvml();

  bool available_ = false;
  std::string source_;
  std::vector<Rapl> rapl_;
  double total_ = 0.0;
  struct Nvml;
  std::unique_ptr<Nvml> nvml_;
};

}  // namespace tutti
