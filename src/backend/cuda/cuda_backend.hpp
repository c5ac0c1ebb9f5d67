// The CUDA backend: one per GPU, created on first use. Memory comes from cudaMalloc (the core's
// caching allocator sits above it), all work of a device is ordered on one stream that the backend
// owns, matrix products go through cuBLAS in full fp32, everything else is tutti's own kernels
// (cuda_kernels.cu). This header includes no CUDA header: backend.cpp's registry includes it.
#pragma once
#include "backend/backend.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace tutti::cuda {

// GPUs visible to this process; 0 (never an exception) when there is no driver or no GPU.
int device_count();

// The backend of GPU `index`; throws InvalidArgument when that GPU is not there.
Backend& cuda_backend(int index);

// The stream on which the backend of GPU `index` enqueues all its work, for code that must order
// its own work after it (NCCL collectives, events). The backend owns it.
CUstream_st* stream(int index);

}  // namespace tutti::cuda
