// A byte-level token file, memory-mapped, split into train (first 90%) and validation (last 10%).
// Batches are drawn from a stream that depends only on (seed, step), so a resumed run or a run on
// any number of ranks sees exactly the same batches.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "tutti/core/tensor.hpp"

namespace tutti::data {

enum class Split { train, val };

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws DataError: missing, unreadable, empty
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct Batch {
  Tensor inputs;   // (B, T) i32
  Tensor targets;  // (B, T) i32: inputs shifted by one
};

class TokenDataset {
 public:
  // Throws DataError when a split is shorter than context + 1 tokens. The path "synthetic" is no
  // file: uniformly random tokens in [0, vocab) drawn from the same (seed, step, sample) streams
  // (speed runs of models with any vocabulary).
  TokenDataset(const std::string& path, int context, double val_fraction = 0.1, int vocab = 256);
  bool synthetic() const { return !file_; }
  const std::string& path() const { return path_; }
  int64_t tokens(Split split) const;
  // Random windows for training step `step` (or evaluation batch `step`): samples
  // [first, first + count) of that step's global batch. Sample i of a step depends only on
  // (seed, step, i), so a rank reads just its own slice and every world size sees the same batch.
  Batch batch(Split split, uint64_t seed, uint64_t step, int64_t first, int count) const;
  Batch batch(Split split, int batch_size, uint64_t seed, uint64_t step) const {
    return batch(split, seed, step, 0, batch_size);
  }

 private:
  std::string path_;
  std::unique_ptr<MappedFile> file_;
  int context_;
  int vocab_;
  size_t val_begin_;
};

}  // namespace tutti::data
