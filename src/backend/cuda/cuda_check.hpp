// CUDA_CHECK and CUBLAS_CHECK: a failed runtime or cuBLAS call throws tutti::Error naming the call,
// the library's error name and text, and file:line. Host-compiled code only (it pulls in error.hpp).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "tutti/core/error.hpp"

namespace tutti::cuda::detail {

[[noreturn]] inline void fail_cuda(cudaError_t err, const char* call, const char* file, int line) {
  ::tutti::detail::fail<::tutti::Error>(file, line, "CUDA error at ", file, ":", line, ": ", call, " failed: ",
                                        cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

[[noreturn]] inline void fail_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  ::tutti::detail::fail<::tutti::Error>(file, line, "cuBLAS error at ", file, ":", line, ": ", call, " failed: ",
                                        cublasGetStatusName(status), " (", cublasGetStatusString(status), ")");
}

}  // namespace tutti::cuda::detail

#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    const cudaError_t tutti_cuda_err_ = (call);                                            \
    if (tutti_cuda_err_ != cudaSuccess)                                                    \
      ::tutti::cuda::detail::fail_cuda(tutti_cuda_err_, #call, __FILE__, __LINE__);        \
  } while (0)

#define CUBLAS_CHECK(call)                                                                 \
  do {                                                                                     \
    const cublasStatus_t tutti_cublas_status_ = (call);                                    \
    if (tutti_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                     \
      ::tutti::cuda::detail::fail_cublas(tutti_cublas_status_, #call, __FILE__, __LINE__); \
  } while (0)
