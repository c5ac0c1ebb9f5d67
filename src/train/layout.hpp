// How a training run is laid out on the rank grid: the batch split over data-parallel replicas and
// micro-batches, the model split into pipeline stages (balanced by cost) and tensor-parallel
// shards, and the moves between the split model and the single-process checkpoint layout.
#pragma once
#include <string>
#include <vector>

#include "tutti/nn/gpt.hpp"
#include "tutti/parallel/mesh.hpp"
#include "tutti/parallel/pipeline.hpp"
#include "tutti/train/config.hpp"
#include "tutti/train/run_dir.hpp"

namespace tutti::train {

struct Layout {
  parallel::MeshShape mesh;
  int per_rank = 0;        // sequences per step on each data-parallel replica
  int micro = 0;           // sequences per micro-batch
  int micro_batches = 0;   // per replica and step (gradient accumulation, pipeline micro-batches)
  parallel::Schedule schedule = parallel::Schedule::one_f_one_b;
  std::vector<int> stage_layers;  // pp + 1 boundaries: stage s holds blocks [b[s], b[s + 1])
  std::string warning;            // e.g. fewer micro-batches than stages; empty when none
};

// Checks every setting of the layout against the world size and the model, before any allocation
// or communicator is set up; throws ConfigError naming the numbers.
Layout plan_layout(const TrainConfig& config, int world_size);

// The part of the model a rank at `coord` holds (tp: its tensor-parallel group).
nn::GPTPartition partition_of(const Layout& layout, parallel::MeshCoord coord, comm::Communicator* tp);

// "rank 3: dp 1/2, pp 0/2 (blocks 0-1, embeddings), tp 1/2 (heads 2-3, vocabulary rows 128-255)"
std::string describe_part(const Layout& layout, const nn::GPTConfig& model, int rank, parallel::MeshCoord coord);

// This pipeline stage's whole tensors (tensor-parallel shards joined) on its rank of dp 0 and tp 0
// (empty elsewhere), in the stage's parameter order; collective over the tp group of replica 0.
NamedTensors gather_stage(const parallel::Mesh& mesh, const NamedTensors& local, const std::vector<std::string>& suffixes);

// The whole model's tensors in the single-process layout on world rank 0 (empty elsewhere), from
// every stage's and every tensor-parallel rank's part of replica dp 0. `local` are this rank's
// tensors under GPT parameter names, optionally with a suffix (".exp_avg"); collective over the
// mesh. Duplicates (the last stage's copy of wte) are dropped; the order is the whole model's.
NamedTensors gather_whole(const parallel::Mesh& mesh, const NamedTensors& local, const nn::GPTConfig& model,
                          const std::vector<std::string>& suffixes);

// This rank's shards of whole-model tensors: for every parameter of `model` and every suffix, the
// shard of `whole` named name + suffix. Missing tensors throw CheckpointError.
NamedTensors shards_of(const NamedTensors& whole, const nn::GPT& model, const std::vector<std::string>& suffixes);

}  // namespace tutti::train
