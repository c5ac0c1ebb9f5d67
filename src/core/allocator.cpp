// The caching allocator: exact-size free lists over a backend's raw allocator. Training repeats
// the same tensor sizes every step, so after the first step nearly every request is a cache hit.
#include "tutti/core/allocator.hpp"

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.hpp"

namespace tutti {
namespace {

constexpr size_t kRound = 256;

class CachingAllocator final : public Allocator {
 public:
  explicit CachingAllocator(Device device) : device_(device) {}
  ~CachingAllocator() override { release_all(); }

  void* allocate(size_t bytes) override {
    const size_t size = round(bytes);
    std::lock_guard lock(mutex_);
    auto it = free_.find(size);
    void* p = nullptr;
    if (it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      stats_.bytes_cached -= static_cast<int64_t>(size);
    } else {
      p = backend_for(device_).raw_allocate(size);
      ++stats_.system_allocations;
    }
    stats_.bytes_in_use += static_cast<int64_t>(size);
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    return p;
  }

  void deallocate(void* ptr, size_t bytes) override {
    const size_t size = round(bytes);
    std::lock_guard lock(mutex_);
    free_[size].push_back(ptr);
    stats_.bytes_in_use -= static_cast<int64_t>(size);
    stats_.bytes_cached += static_cast<int64_t>(size);
  }

  Device device() const override { return device_; }

  AllocatorStats stats() {
    std::lock_guard lock(mutex_);
    return stats_;
  }

  void release_all() {
    std::lock_guard lock(mutex_);
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) backend_for(device_).raw_deallocate(p, size);
    free_.clear();
    stats_.bytes_cached = 0;
  }

 private:
  static size_t round(size_t bytes) { return (std::max<size_t>(bytes, 1) + kRound - 1) / kRound * kRound; }

  Device device_;
  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  AllocatorStats stats_;
};

constexpr int kMaxCudaDevices = 16;

CachingAllocator& caching_allocator(Device device) {
  // Leaked on purpose: tensors in static objects may be freed after main returns.
  static auto* cpu = new CachingAllocator(Device::cpu());
  static std::array<std::unique_ptr<CachingAllocator>, kMaxCudaDevices>* cuda =
      new std::array<std::unique_ptr<CachingAllocator>, kMaxCudaDevices>();
  static std::mutex mutex;
  if (device.is_cpu()) return *cpu;
  TUTTI_CHECK_AS(InvalidArgument, device.index >= 0 && device.index < kMaxCudaDevices, "bad device ", device.str());
  std::lock_guard lock(mutex);
  auto& slot = (*cuda)[static_cast<size_t>(device.index)];
  if (!slot) slot = std::make_unique<CachingAllocator>(device);
  return *slot;
}

}  // namespace

Allocator& allocator_for(Device device) { return caching_allocator(device); }
AllocatorStats allocator_stats(Device device) { return caching_allocator(device).stats(); }
void empty_cache(Device device) { caching_allocator(device).release_all(); }

}  // namespace tutti
