// Causal attention in bf16 through cuDNN's fused flash attention (its SDPA graphs, built with the
// backend API): the forward writes y and each row's log-sum-exp (natural log), the backward reads
// them back with dy and writes dqkv. Q, K and V are read in place from the packed (B, T, 3C)
// qkv that the c_attn product writes (head h of Q at column h D, of K at C + h D, of V at 2C + h D)
// and dqkv is written in the same layout. Plans are built at a shape's first use and kept.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace tutti::cuda {

class CudnnAttention {
 public:
  explicit CudnnAttention(cudaStream_t stream);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // True when cuDNN has plans for both passes of this shape (built and kept at the first call);
  // false, with the reason in why_not(), where cuDNN declines (an older GPU or cuDNN, a head size it
  // does not fuse), and the caller runs its own kernels for both passes.
  bool supports(int64_t B, int64_t T, int64_t C, int64_t H);
  const std::string& why_not() const { return why_not_; }
  // The device workspace the passes of a supported shape need (bytes).
  size_t workspace_bytes(int64_t B, int64_t T, int64_t C, int64_t H);
  // qkv (B, T, 3C), y (B, T, C), dy (B, T, C) and dqkv (B, T, 3C) in bf16 (their bits), lse (B, H, T)
  // fp32; workspace of workspace_bytes(). Only for shapes supports() accepted.
  void forward(const uint16_t* qkv, uint16_t* y, float* lse, int64_t B, int64_t T, int64_t C, int64_t H,
               void* workspace);
  void backward(const uint16_t* qkv, const uint16_t* y, const float* lse, const uint16_t* dy, uint16_t* dqkv,
                int64_t B, int64_t T, int64_t C, int64_t H, void* workspace);


 private:
  struct Plan;  // an execution plan and its workspace size (cuda_cudnn_attention.cpp)
  struct Plans;
  using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t>;
  const Plans* plans(int64_t B, int64_t T, int64_t C, int64_t H);

  void* handle_ = nullptr;  // cudnnHandle_t
  std::mutex mutex_;
  std::map<Shape, std::unique_ptr<Plans>> plans_;  // null: declined
  std::string why_not_;
};

}  // namespace tutti::cuda
