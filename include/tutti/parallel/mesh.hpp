// Mesh: the one rank grid (dp x pp x tp) every process group is derived from. Rank r of the world
// sits at coordinates (d, p, t) with tp varying fastest, then pp, then dp:
// r = (d * pp + p) * tp + t, so a tensor-parallel group is made of neighbouring ranks, i.e. GPUs
// of one host. Groups are built once and passed explicitly; there are no globals.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "tutti/comm/communicator.hpp"

namespace tutti::parallel {

struct MeshShape {
  int dp = 1, pp = 1, tp = 1;
  int size() const { return dp * pp * tp; }
};

// A rank's place in the grid.
struct MeshCoord {
  int dp = 0, pp = 0, tp = 0;
  bool operator==(const MeshCoord&) const = default;
};
// The grid arithmetic on its own (no communicator needed): coordinates of a world rank, and back.
MeshCoord mesh_coord(const MeshShape& shape, int rank);
int mesh_rank(const MeshShape& shape, MeshCoord coord);
// Throws InvalidArgument "mesh dp x pp x tp = A x B x C = N does not match the world size M".
void check_mesh_shape(const MeshShape& shape, int world_size);

class Mesh {
 public:
  // Throws InvalidArgument when dp * pp * tp differs from world.size() or a size is below 1.
  Mesh(comm::Communicator& world, MeshShape shape);

  const MeshShape& shape() const { return shape_; }
  int dp_rank() const { return dp_rank_; }
  int pp_rank() const { return pp_rank_; }
  int tp_rank() const { return tp_rank_; }
  comm::Communicator& world() const { return world_; }
  comm::Communicator& dp_group() const { return *dp_; }  // same (pp, tp), all dp
  comm::Communicator& pp_group() const { return *pp_; }  // same (dp, tp), all pp
  comm::Communicator& tp_group() const { return *tp_; }  // same (dp, pp), all tp
  std::string describe() const;  // "rank 3: dp 1/2, pp 0/1, tp 1/2"
  // The step and timeout named in timeout errors, set on the world and on every group at once.
  void set_step(int64_t step);
  void set_timeout(comm::Millis timeout);

 private:
  comm::Communicator& world_;
  MeshShape shape_;
  int dp_rank_ = 0, pp_rank_ = 0, tp_rank_ = 0;
  std::unique_ptr<comm::Communicator> dp_, pp_, tp_;
};

}  // namespace tutti::parallel
