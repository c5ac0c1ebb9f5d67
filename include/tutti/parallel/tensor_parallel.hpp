// Tensor parallelism in the Megatron style: a layer's matrices are split over the ranks of a
// tensor-parallel group, and two paired primitives join the pieces. copy_to_group marks where a
// replicated activation enters column-parallel work (identity forward, all-reduce of the gradient
// backward); reduce_from_group sums the partial results of row-parallel work (all-reduce forward,
// identity backward). The vocabulary-parallel embedding and cross-entropy split the vocabulary
// rows over the group and never gather the full logits. With a group of one, each is the plain op.
#pragma once
#include <cstdint>
#include <vector>

#include "tutti/comm/communicator.hpp"
#include "tutti/core/tensor.hpp"

namespace tutti::parallel {

// How a tensor of the full model is split over a tensor-parallel group of P ranks: along `dim`,
// seen as `parts` equal blocks (3 for the fused q | k | v projection) each cut into P pieces; rank
// t holds piece t of every block, side by side. dim -1: every rank holds the whole tensor.
struct TensorSplit {
  int dim = -1;
  int parts = 1;
  bool replicated() const { return dim < 0; }
};

// Rank `rank`'s shard of `full` (a new contiguous tensor; `full` itself when replicated).
Tensor take_shard(const Tensor& full, TensorSplit split, int rank, int size);
// The full tensor from every rank's shard, in rank order (the first shard when replicated).
Tensor join_shards(const std::vector<Tensor>& shards, TensorSplit split);

// Identity forward; backward all-reduces (sums) the gradient over `group`.
Tensor copy_to_group(const Tensor& x, comm::Communicator& group);
// All-reduce (sum) over `group` forward; identity backward.
Tensor reduce_from_group(const Tensor& x, comm::Communicator& group);

// The embedding of i32 `indices` (...) in a table split by rows: this rank holds rows
// [first, first + table.size(0)) of the full table. Returns the full embedding (..., C) on every
// rank (each rank's rows, summed over the group).
Tensor vocab_parallel_embedding(const Tensor& indices, const Tensor& table, int64_t first, comm::Communicator& group);

// Mean cross-entropy of logits (N, V) split by columns over `group` (this rank: full columns
// [first, first + logits.size(1))) against i32 targets (N) of the full vocabulary. Returns ().
Tensor vocab_parallel_cross_entropy(const Tensor& logits, const Tensor& targets, int64_t first,
                                    comm::Communicator& group);

}  // namespace tutti::parallel
