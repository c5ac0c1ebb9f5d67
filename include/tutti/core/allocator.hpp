// Device memory: each device has one caching allocator that keeps freed blocks for reuse, so a
// training step that allocates the same sizes every iteration stops calling the system after step 1.
#pragma once
#include <cstddef>
#include <cstdint>

#include "tutti/core/device.hpp"

namespace tutti {

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr, size_t bytes) = 0;
  virtual Device device() const = 0;
};

struct AllocatorStats {
  int64_t bytes_in_use = 0;      // handed out to tensors now
  int64_t bytes_cached = 0;      // held in free lists
  int64_t peak_bytes_in_use = 0;
  int64_t system_allocations = 0;  // calls that reached the device's raw allocator
};

// The caching allocator of a device (created on first use).
Allocator& allocator_for(Device device);
AllocatorStats allocator_stats(Device device);
// Returns every cached block of the device to the system.
void empty_cache(Device device);

}  // namespace tutti
