#include "comm/collective_args.hpp"

#include <cstdio>

namespace tutti::comm {

size_t elem_size(ElemType type) {
  switch (type) {
    case ElemType::f32: return 4;
    case ElemType::f64: return 8;
    case ElemType::i32: return 4;
    case ElemType::i64: return 8;
    case ElemType::u8: return 1;
  }
  TUTTI_FAIL(InvalidArgument, "unknown element type ", static_cast<int>(type));
}

const char* elem_name(ElemType type) {
  switch (type) {
    case ElemType::f32: return "f32";
    case ElemType::f64: return "f64";
    case ElemType::i32: return "i32";
    case ElemType::i64: return "i64";
    case ElemType::u8: return "u8";
  }
  return "?";
}

std::string format_duration(Millis d) {
  const int64_t ms = d.count();
  if (ms < 1000) return std::to_string(ms) + "ms";
  if (ms % 1000 == 0 && ms < 120000) return std::to_string(ms / 1000) + "s";
  char text[32];
  if (ms < 120000) std::snprintf(text, sizeof text, "%.1fs", double(ms) / 1000.0);
  else std::snprintf(text, sizeof text, "%.1fmin", double(ms) / 60000.0);
  return text;
}

bool overlaps(const Buffer& a, const Buffer& b) {
  if (a.count == 0 || b.count == 0) return false;
  const auto* a0 = static_cast<const char*>(a.data);
  const auto* b0 = static_cast<const char*>(b.data);
  const auto* a1 = a0 + a.count * static_cast<int64_t>(elem_size(a.type));
  const auto* b1 = b0 + b.count * static_cast<int64_t>(elem_size(b.type));
  return a0 < b1 && b0 < a1;
}

void check_buffer(const char* what, const Buffer& b) {
  (void)elem_size(b.type);
  TUTTI_CHECK_AS(InvalidArgument, b.count >= 0, what, ": negative element count ", b.count);
  TUTTI_CHECK_AS(InvalidArgument, b.count == 0 || b.data != nullptr, what, ": null buffer of ", b.count,
                 " elements");
}

void check_rank_arg(const char* what, const char* role, int r, int size) {
  TUTTI_CHECK_AS(InvalidArgument, r >= 0 && r < size, what, ": ", role, " ", r,
                 " is not a rank of this communicator (size ", size, ")");
}

void check_same_type(const char* what, const Buffer& a, const Buffer& b) {
  TUTTI_CHECK_AS(InvalidArgument, a.type == b.type, what, ": input is ", elem_name(a.type), " but output is ",
                 elem_name(b.type));
}

std::vector<int64_t> check_chunks(const char* what, const Buffer& whole, const Buffer& part,
                                  const std::vector<int64_t>& counts, int rank, int size) {
  check_buffer(what, whole);
  check_buffer(what, part);
  check_same_type(what, part, whole);
  TUTTI_CHECK_AS(InvalidArgument, counts.size() == static_cast<size_t>(size), what, ": ", counts.size(),
                 " counts for a communicator of size ", size);
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) {
    TUTTI_CHECK_AS(InvalidArgument, counts[r] >= 0, what, ": negative count ", counts[r], " for rank ", r);
    offsets[r + 1] = offsets[r] + counts[r];
  }
  TUTTI_CHECK_AS(InvalidArgument, whole.count == offsets.back(), what, ": the counts sum to ", offsets.back(),
                 " elements but the full buffer holds ", whole.count);
  TUTTI_CHECK_AS(InvalidArgument, part.count == counts[static_cast<size_t>(rank)], what, ": rank ", rank,
                 "'s chunk is ", counts[static_cast<size_t>(rank)], " elements but its buffer holds ", part.count);
  return offsets;
}

}  // namespace tutti::comm
