// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
// header length, a JSON header {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// "__metadata__": {...}}, then the raw little-endian tensor bytes.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tutti/core/tensor.hpp"

namespace tutti::ckpt {

struct SafetensorsFile {
  std::vector<std::pair<std::string, Tensor>> tensors;  // in file order, on the CPU
  std::map<std::string, std::string> metadata;
};

// Reads and validates the whole file before use: header length within the file and below
// 100 MB, well-formed JSON, known dtypes (F32, BF16, F16, I32, I64), data offsets in range,
// sorted without overlap or gaps, size equal to shape x dtype size, and the file length exactly
// header + data. Throws CheckpointError naming the file and the problem.
SafetensorsFile read_safetensors(const std::string& path);

// Writes atomically: a temporary file beside `path`, fsync, rename over `path`, fsync of the
// directory. Tensors are written contiguous in the given order; names must be unique.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes a small text file atomically (same protocol).
void write_file_atomic(const std::string& path, const std::string& contents);
// Creates a directory's entries durably (fsync of the directory).
void fsync_directory(const std::string& path);

}  // namespace tutti::ckpt
