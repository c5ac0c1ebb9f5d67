// libFuzzer target: ckpt::parse_manifest on arbitrary text. It must accept or throw
// CheckpointError; an accepted manifest must format and parse back to the same value.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tutti/ckpt/manifest.hpp"
#include "tutti/core/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  tutti::ckpt::Manifest m;
  try {
    m = tutti::ckpt::parse_manifest(text, "manifest.json");
  } catch (const tutti::CheckpointError&) {
    return 0;
  }
  const tutti::ckpt::Manifest again = tutti::ckpt::parse_manifest(tutti::ckpt::format_manifest(m), "manifest.json");
  if (!(again == m)) std::abort();
  return 0;
}
