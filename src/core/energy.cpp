#include "tutti/core/energy.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;

namespace tutti {
namespace {

bool read_u64(const fs::path& file, uint64_t& value) {
  std::ifstream in(file);
  return static_cast<bool>(in >> value);
}

}  // namespace

// The few NVML entry points used, resolved from libnvidia-ml.so.1 (their C ABI is stable).
struct EnergyMeter::Nvml {
  using Init = int (*)();
  using Handle = int (*)(unsigned, void**);
  using Energy = int (*)(void*, unsigned long long*);
  using Shutdown = int (*)();
  void* lib = nullptr;
  Shutdown shutdown = nullptr;
  Energy energy = nullptr;
  void* device = nullptr;
  unsigned long long start_mj = 0, last_mj = 0;
  ~Nvml() {
    if (shutdown) shutdown();
    if (lib) dlclose(lib);
  }
};

EnergyMeter::EnergyMeter(Device device, const std::string& powercap_root) {
  if (device.is_cuda()) {
    auto n = std::make_unique<Nvml>();
    n->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!n->lib) {
      source_ = "no NVML (libnvidia-ml.so.1 not found)";
      return;
    }
    auto init = reinterpret_cast<Nvml::Init>(dlsym(n->lib, "nvmlInit_v2"));
    auto handle = reinterpret_cast<Nvml::Handle>(dlsym(n->lib, "nvmlDeviceGetHandleByIndex_v2"));
    n->energy = reinterpret_cast<Nvml::Energy>(dlsym(n->lib, "nvmlDeviceGetTotalEnergyConsumption"));
    auto shutdown = reinterpret_cast<Nvml::Shutdown>(dlsym(n->lib, "nvmlShutdown"));
    if (!init || !handle || !n->energy || !shutdown || init() != 0) {
      source_ = "no NVML energy counter (NVML did not initialise)";
      return;
    }
    n->shutdown = shutdown;
    if (handle(static_cast<unsigned>(device.index), &n->device) != 0 || n->energy(n->device, &n->start_mj) != 0) {
      source_ = "no NVML energy counter for " + device.str() + " (a GPU older than Volta?)";
      return;
    }
    n->last_mj = n->start_mj;
    nvml_ = std::move(n);
    available_ = true;
    source_ = "NVML, " + device.str();
    return;
  }
  std::error_code ec;
  if (fs::is_directory(powercap_root, ec))
    for (const auto& e : fs::directory_iterator(powercap_root, ec)) {
      const std::string name = e.path().filename().string();
      // Top-level package domains only ("intel-rapl:0"); "intel-rapl:0:0" is a part of its package.
      if (name.rfind("intel-rapl:", 0) != 0 || std::count(name.begin(), name.end(), ':') != 1) continue;
      Rapl r{(e.path() / "energy_uj").string()};
      if (read_u64(e.path() / "max_energy_range_uj", r.range) && read_u64(r.file, r.last)) rapl_.push_back(r);
    }
  if (rapl_.empty()) {
    source_ = "no RAPL energy counters under " + powercap_root + " (virtual machines usually hide them)";
    return;
  }
  available_ = true;
  source_ = "RAPL, " + std::to_string(rapl_.size()) + " package domain(s)";
}

EnergyMeter::~EnergyMeter() = default;

double EnergyMeter::read_rapl() {
  double delta = 0.0;
  for (Rapl& r : rapl_) {
    uint64_t now = r.last;
    if (!read_u64(r.file, now)) continue;
    const uint64_t step = now >= r.last ? now - r.last : now + (r.range - r.last);  // wrapped
    delta += double(step) * 1e-6;
    r.last = now;
  }
  return delta;
}

double EnergyMeter::read_nvml() {
  unsigned long long now = 0;
  if (nvml_->energy(nvml_->device, &now) != 0) return 0.0;
  const double delta = double(now - nvml_->last_mj) * 1e-3;  // millijoules, 64-bit: no wrap
  nvml_->last_mj = now;
  return delta;
}

double EnergyMeter::joules() {
  if (!available_) return 0.0;
  total_ += nvml_ ? read_nvml() : read_rapl();
  return total_;
}

}  // namespace tutti
