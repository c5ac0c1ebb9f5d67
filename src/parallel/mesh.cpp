#include "tutti/parallel/mesh.hpp"

namespace tutti::parallel {

void check_mesh_shape(const MeshShape& shape, int world_size) {
  const int64_t product = int64_t(shape.dp) * shape.pp * shape.tp;
  const bool positive = shape.dp >= 1 && shape.pp >= 1 && shape.tp >= 1;
  TUTTI_CHECK_AS(InvalidArgument, positive && product == world_size, "mesh dp x pp x tp = ", shape.dp, " x ",
                 shape.pp, " x ", shape.tp, " = ", product, " does not match the world size ", world_size,
                 positive ? "" : " (every size must be at least 1)");
}

MeshCoord mesh_coord(const MeshShape& shape, int rank) {
  check_mesh_shape(shape, shape.size());
  TUTTI_CHECK_AS(InvalidArgument, rank >= 0 && rank < shape.size(), "rank ", rank, " is outside a mesh of ",
                 shape.size());
  return {rank / (shape.tp * shape.pp), (rank / shape.tp) % shape.pp, rank % shape.tp};
}

int mesh_rank(const MeshShape& shape, MeshCoord c) {
  check_mesh_shape(shape, shape.size());
  TUTTI_CHECK_AS(InvalidArgument,
                 c.dp >= 0 && c.dp < shape.dp && c.pp >= 0 && c.pp < shape.pp && c.tp >= 0 && c.tp < shape.tp,
                 "mesh coordinates (dp ", c.dp, ", pp ", c.pp, ", tp ", c.tp, ") are outside ", shape.dp, " x ",
                 shape.pp, " x ", shape.tp);
  return (c.dp * shape.pp + c.pp) * shape.tp + c.tp;
}

Mesh::Mesh(comm::Communicator& world, MeshShape shape) : world_(world), shape_(shape) {
  check_mesh_shape(shape, world.size());
  const MeshCoord c = mesh_coord(shape, world.rank());
  dp_rank_ = c.dp;
  pp_rank_ = c.pp;
  tp_rank_ = c.tp;
  // Each group: the ranks that agree on the other two coordinates, ordered by its own. Every rank
  // makes the three splits in the same order (split is collective over the world).
  dp_ = world.split(c.pp * shape.tp + c.tp, c.dp);
  pp_ = world.split(c.dp * shape.tp + c.tp, c.pp);
  tp_ = world.split(c.dp * shape.pp + c.pp, c.tp);
}

std::string Mesh::describe() const {
  return detail::concat("rank ", world_.rank(), ": dp ", dp_rank_, "/", shape_.dp, ", pp ", pp_rank_, "/",
                        shape_.pp, ", tp ", tp_rank_, "/", shape_.tp);
}

void Mesh::set_step(int64_t step) {
  for (comm::Communicator* c : {&world_, dp_.get(), pp_.get(), tp_.get()}) c->set_step(step);
}

void Mesh::set_timeout(comm::Millis timeout) {
  for (comm::Communicator* c : {&world_, dp_.get(), pp_.get(), tp_.get()}) c->set_timeout(timeout);
}

}  // namespace tutti::parallel
