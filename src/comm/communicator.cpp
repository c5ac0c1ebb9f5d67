// Choosing the world's backend.
#include "tutti/comm/communicator.hpp"

#include <cstdlib>

#include "comm/backends.hpp"

namespace tutti::comm {
namespace {

// Whether an MPI launcher started this process. A plain `tutti train` must not call MPI_Init (a
// singleton init would start Open MPI's runtime for nothing).
bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

}  // namespace

bool mpi_available() {
#if TUTTI_WITH_MPI
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Communicator> make_world(const std::string& backend) {
  if (backend == "local") return make_local();
  if (backend == "mpi") {
    TUTTI_CHECK_AS(CommError, mpi_available(), "the mpi backend was asked for but this build of tutti has no MPI");
    return make_mpi_world();
  }
  TUTTI_CHECK_AS(InvalidArgument, backend == "auto", "unknown communicator backend '", backend,
                 "' (expected auto, local or mpi)");
  if (mpi_available() && launched_by_mpi()) return make_mpi_world();
  return make_local();
}

#if !TUTTI_WITH_MPI
std::unique_ptr<Communicator> make_mpi_world() {
  TUTTI_FAIL(CommError, "this build of tutti has no MPI");
}
#endif

}  // namespace tutti::comm
