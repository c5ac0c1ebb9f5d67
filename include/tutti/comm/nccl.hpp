// The nccl backend of Communicator: the same collectives as "local" and "mpi", on GPU memory
// (every Buffer's data is a pointer into the communicator's GPU, cuda:N). One rank per GPU; ranks
// may be threads of one process or separate processes. The ranks meet through an NcclId made by
// one of them and handed to the others by any means (an MPI broadcast, a file, a socket): see
// make_nccl_from for the usual case. Design and limits: docs/nccl.md. This header includes no
// CUDA or NCCL header, so it compiles in every build; without NCCL the factories throw CommError.
#pragma once
#include <array>
#include <chrono>
#include <cstdint>
#include <memory>

#include "tutti/comm/communicator.hpp"

namespace tutti::comm {

// NCCL's ncclUniqueId (128 opaque bytes): where rank 0 listens for the others.
struct NcclId {
  std::array<uint8_t, 128> bytes{};
};

// Whether this build has the nccl backend (built with CUDA and an NCCL library found).
bool nccl_available();

// A fresh id (ncclGetUniqueId). Made once, by one rank, for each communicator to create.
NcclId nccl_unique_id();

// Rank `rank` of `size` on GPU cuda:`device`. Every rank must call it with the same id, at the
// same time (one thread or process per rank): it returns when all have joined, or throws Timeout
// after `init_timeout`. Throws InvalidArgument for a rank outside [0, size) or a GPU that is not
// there. Sets NCCL_NVLS_ENABLE=0 (NVLink multicast off) unless the environment already sets it.
std::unique_ptr<Communicator> make_nccl(int rank, int size, const NcclId& id, int device,
                                        Millis init_timeout = std::chrono::minutes(5));

// The nccl communicator of the ranks of `bootstrap` (an mpi or local communicator, host
// memory): rank 0 makes the id and broadcasts it over `bootstrap`, then every rank calls
// make_nccl with its own rank on GPU `device`. Collective over `bootstrap`; the result takes its
// step and timeout.
std::unique_ptr<Communicator> make_nccl_from(Communicator& bootstrap, int device);

}  // namespace tutti::comm
