#include "tutti/data/token_dataset.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "tutti/core/random.hpp"

namespace tutti::data {

MappedFile::MappedFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TUTTI_CHECK_AS(DataError, fd >= 0, "cannot open data file '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    TUTTI_FAIL(DataError, "data file '", path, "' is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    TUTTI_FAIL(DataError, "data file '", path, "' is empty");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);  // the mapping keeps the file
  TUTTI_CHECK_AS(DataError, p != MAP_FAILED, "cannot map data file '", path, "': ", std::strerror(errno));
  data_ = static_cast<const uint8_t*>(p);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

namespace {
constexpr int64_t kSyntheticTokens = int64_t{1} << 40;  // as many as a run could want
}

TokenDataset::TokenDataset(const std::string& path, int context, double val_fraction, int vocab)
    : path_(path), file_(path == "synthetic" ? nullptr : std::make_unique<MappedFile>(path)), context_(context),
      vocab_(vocab) {
  TUTTI_CHECK_AS(DataError, context > 0, "context must be positive, got ", context);
  TUTTI_CHECK_AS(DataError, val_fraction > 0 && val_fraction < 1, "validation fraction must be in (0, 1), got ",
                 val_fraction);
  TUTTI_CHECK_AS(DataError, vocab >= 2, "vocabulary must have at least 2 tokens, got ", vocab);
  if (!file_) return;
  val_begin_ = static_cast<size_t>(static_cast<double>(file_->size()) * (1.0 - val_fraction));
  for (Split s : {Split::train, Split::val})
    TUTTI_CHECK_AS(DataError, tokens(s) >= context + 1, "data file '", path, "' (", file_->size(), " bytes) is too short: the ",
                   s == Split::train ? "training" : "validation", " split has ", tokens(s),
                   " tokens, a context of ", context, " needs at least ", context + 1);
}

int64_t TokenDataset::tokens(Split split) const {
  if (!file_) return kSyntheticTokens;
  return static_cast<int64_t>(split == Split::train ? val_begin_ : file_->size() - val_begin_);
}

Batch TokenDataset::batch(Split split, uint64_t seed, uint64_t step, int64_t first, int count) const {
  TUTTI_CHECK_AS(InvalidArgument, count > 0 && first >= 0, "batch of ", count, " samples from ", first,
                 ": count must be positive and first non-negative");
  const uint64_t split_bit = split == Split::train ? 0 : (1ull << 62);
  Batch b{Tensor::empty({count, context_}, DType::i32), Tensor::empty({count, context_}, DType::i32)};
  int32_t* x = b.inputs.data<int32_t>();
  int32_t* y = b.targets.data<int32_t>();
  if (!file_) {  // synthetic: context + 1 random tokens per sample
    for (int i = 0; i < count; ++i) {
      Rng rng = Rng::stream(seed, step, split_bit | static_cast<uint64_t>(first + i));
      int32_t prev = static_cast<int32_t>(rng.below(uint64_t(vocab_)));
      for (int t = 0; t < context_; ++t) {
        const int32_t next = static_cast<int32_t>(rng.below(uint64_t(vocab_)));
        x[int64_t(i) * context_ + t] = prev;
        y[int64_t(i) * context_ + t] = prev = next;
      }
    }
    return b;
  }
  const uint8_t* base = file_->data() + (split == Split::train ? 0 : val_begin_);
  const uint64_t windows = static_cast<uint64_t>(tokens(split) - context_);  // valid start offsets
  for (int i = 0; i < count; ++i) {
    Rng rng = Rng::stream(seed, step, split_bit | static_cast<uint64_t>(first + i));
    const uint8_t* w = base + rng.below(windows);
    for (int t = 0; t < context_; ++t) {
      x[int64_t(i) * context_ + t] = w[t];
      y[int64_t(i) * context_ + t] = w[t + 1];
    }
  }
  return b;
}

}  // namespace tutti::data
