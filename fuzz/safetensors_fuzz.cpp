// libFuzzer target: ckpt::read_safetensors on arbitrary bytes. The reader must accept or throw
// CheckpointError; anything else (a crash, an ASan report, another exception) is a finding.
// Accepted files are written back and must read back to the same tensors.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tutti/ckpt/safetensors.hpp"
#include "tutti/core/error.hpp"

namespace {

// The input lives in an anonymous in-memory file, opened by path through /proc.
struct MemFile {
  int fd = ::memfd_create("safetensors_fuzz", 0);
  std::string path = "/proc/self/fd/" + std::to_string(fd);
};

std::string scratch_path() {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/safetensors_fuzz_" + std::to_string(::getpid()) + ".st";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static MemFile file;
  if (file.fd < 0) std::abort();
  if (::ftruncate(file.fd, 0) != 0 || ::pwrite(file.fd, data, size, 0) != static_cast<ssize_t>(size)) std::abort();
  tutti::ckpt::SafetensorsFile parsed;
  try {
    parsed = tutti::ckpt::read_safetensors(file.path);
  } catch (const tutti::CheckpointError&) {
    return 0;  // rejected: the expected outcome for most inputs
  }
  // Round trip: what was accepted is written and read back identically.
  static const std::string copy = scratch_path();
  tutti::ckpt::write_safetensors(copy, parsed.tensors, parsed.metadata);
  const tutti::ckpt::SafetensorsFile again = tutti::ckpt::read_safetensors(copy);
  if (again.tensors.size() != parsed.tensors.size() || again.metadata != parsed.metadata) std::abort();
  for (size_t i = 0; i < parsed.tensors.size(); ++i) {
    const auto& [name, t] = parsed.tensors[i];
    const auto& [name2, t2] = again.tensors[i];
    if (t.dtype() != t2.dtype() || !(t.shape() == t2.shape()) || t.nbytes() != t2.nbytes() ||
        std::memcmp(t.raw_data(), t2.raw_data(), t.nbytes()) != 0)
      std::abort();
    (void)name;
    (void)name2;
  }
  ::unlink(copy.c_str());
  return 0;
}
