// Argument checks and small helpers shared by every backend, so "local" and "mpi" reject the same
// calls with the same messages.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tutti/comm/communicator.hpp"

namespace tutti::comm {

size_t elem_size(ElemType type);
const char* elem_name(ElemType type);
// "250ms", "5s", "1.5s", "2min".
std::string format_duration(Millis d);
// Whether the byte ranges of two buffers intersect (empty buffers intersect nothing).
bool overlaps(const Buffer& a, const Buffer& b);

// Each throws InvalidArgument naming the collective and the values.
void check_buffer(const char* what, const Buffer& b);
void check_rank_arg(const char* what, const char* role, int r, int size);
void check_same_type(const char* what, const Buffer& a, const Buffer& b);
// For reduce_scatter and all_gather: `whole` holds size() chunks of counts[r] elements, `part`
// is this rank's chunk. Returns the element offset of every chunk (size() + 1 entries).
std::vector<int64_t> check_chunks(const char* what, const Buffer& whole, const Buffer& part,
                                  const std::vector<int64_t>& counts, int rank, int size);

}  // namespace tutti::comm
