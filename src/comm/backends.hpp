// Factories of the backends, declared without any vendor header so communicator.cpp can choose
// among them. The MPI ones exist only in builds with TUTTI_WITH_MPI.
#pragma once
#include <cstdint>
#include <memory>

#include "tutti/comm/communicator.hpp"

namespace tutti::comm {

std::unique_ptr<Communicator> make_mpi_world();

// Largest element count one MPI call carries; longer all_reduce, broadcast, send and recv are cut
// into pieces of this size (MPI counts are int). Settable so tests can exercise the cutting.
int64_t mpi_max_message_elements();
void set_mpi_max_message_elements(int64_t n);

}  // namespace tutti::comm
