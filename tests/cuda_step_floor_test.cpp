// Where a GPT-2 124M training step in bf16 (batch 16, context 1024, flash attention, fused GEMM
// epilogues) spends its time, kernel by kernel against each kernel's floor. Not a test:
// TUTTI_CUDA_TIMING=1 prints the table (it skips otherwise, and without a GPU).
//
// Each piece runs at the step's shapes on random data, timed by the host clock around a
// synchronize (median of 5 rounds); its count per step comes from the model (12 layers). The floor
// of one call is max(flops / 790 TFLOP/s, bytes / copy rate): the bf16 GEMM rate measured on these
// machines (KINDS.md: 788-798 TFLOP/s on the H100 and H200) and the device-to-device copy rate
// measured here first (about 3.0 TB/s on an H100, 4.3 on an H200): bytes count each
// input read once and each output written once, as the kernel is written (the cross-entropy
// kernels materialise the probabilities (N, V), so their floor includes them).
// Letters: B batch, T time, C channels, H heads, N = B T rows, V vocabulary, P parameters.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "cuda_test_util.hpp"
#include "tutti/core/random.hpp"
#include "tutti/core/tensor.hpp"
#include "tutti/ops/ops.hpp"

using namespace tutti;
using namespace tutti::cuda_test;

namespace {

// Uniform in [-1, 1): 2^22 random values tiled over n (drawing 10^9 on the host takes too long).
Tensor random_gpu(int64_t n, uint64_t seed) {
  Rng rng(seed);
  const int64_t tile = std::min<int64_t>(n, int64_t{1} << 22);
  std::vector<float> v(static_cast<size_t>(tile));
  for (float& x : v) x = static_cast<float>(rng.uniform() * 2.0 - 1.0);
  const Tensor src = Tensor::from_vector({tile}, v).to(kGpu);
  Tensor t = Tensor::empty({n}, DType::f32, kGpu);
  for (int64_t i = 0; i < n; i += tile)
    gpu().copy_on_device(f32(t) + i, f32(src), static_cast<size_t>(std::min(tile, n - i)) * sizeof(float));
  return t;
}

template <class T>
GemmOf<T> gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, const T* b, float* c) {
  GemmOf<T> g;
  g.trans_a = ta, g.trans_b = tb;
  g.m = m, g.n = n, g.k = k;
  g.a = a, g.b = b, g.c = c;
  g.lda = ta ? m : k, g.ldb = tb ? k : n, g.ldc = n;
  return g;
}

// GPT-2 124M at batch 16: its sizes and parameter count.
constexpr int64_t B = 16, T = 1024, C = 768, H = 12, L = 12, N = B * T, V = 50304;
constexpr int64_t P = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C;
constexpr int kLayers = static_cast<int>(L);

// Buffers every piece reuses, big enough for the LM head's (N, V); random, never zeros.
struct Buffers {
  Tensor x, y, w, xh, wh, out, aux, bias;
};

struct Piece {
  std::string name;
  int count;            // calls per step
  double ms;            // one call
  double flops, bytes;  // one call
};

// The byte rate of the floors: a device-to-device copy of 3.3 GB, bytes read plus written.
double copy_rate = 3.0e12;

void print_table(const std::vector<Piece>& pieces) {
  std::printf("%-44s %5s %9s %9s %10s %10s %6s\n", "piece (GPT-2 B16 bf16)", "calls", "ms/call", "floor ms", "ms/step",
              "floor/step", "floor%");
  double total = 0.0, total_floor = 0.0;
  for (const Piece& p : pieces) {
    const double floor_ms = std::max(p.flops / 790e9, p.bytes / copy_rate * 1e3);
    total += p.count * p.ms;
    total_floor += p.count * floor_ms;
    std::printf("%-44s %5d %9.3f %9.3f %10.2f %10.2f %5.0f%%\n", p.name.c_str(), p.count, p.ms, floor_ms,
                p.count * p.ms, p.count * floor_ms, 100.0 * floor_ms / p.ms);
  }
  std::printf("%-44s %5s %9s %9s %10.2f %10.2f %5.0f%%\n", "sum of the pieces", "", "", "", total, total_floor,
              100.0 * total_floor / total);
}

}  // namespace

namespace {

double time_ms(const std::function<void()>& f, int reps = 5) { return median_time_ms(f, reps); }

// The products: the four linear layers (forward with its fused epilogue, dx, dW with the fused
// bias gradient) and the LM head's three.
std::vector<Piece> gemm_pieces(const Buffers& buf) {
  const Tensor &x = buf.x, &y = buf.y, &w = buf.w, &xh = buf.xh, &wh = buf.wh, &aux = buf.aux, &bias = buf.bias;
  Tensor out = buf.out;
  const int layers = kLayers;
  std::vector<Piece> pieces;
  // Linear layers: forward with the epilogue, dx, dW with the bias gradient (4 per layer).
  struct Lin {
    int64_t in, out;
    bool gelu;
  };
  const Lin lins[] = {{C, 3 * C, false}, {C, C, false}, {C, 4 * C, true}, {4 * C, C, false}};
  double fwd = 0, dx = 0, dw = 0, flops = 0, fwd_bytes = 0, dx_bytes = 0, dw_bytes = 0;
  for (const Lin& l : lins) {
    EpilogueGemmOf<BFloat16> f{gemm<BFloat16>(false, false, N, l.out, l.in, bf16(xh), bf16(wh), f32(out)),
                               l.gelu ? GemmEpilogue::bias_gelu : GemmEpilogue::bias, f32(bias), f32(aux), nullptr};
    fwd += time_ms([&] { EXPECT_TRUE(gpu().gemm_epilogue_bf16(f)) << "fusion off? (TUTTI_CUDA_LT=0)"; });
    dx += time_ms([&] { gpu().gemm_bf16(gemm<BFloat16>(false, true, N, l.in, l.out, bf16(xh), bf16(wh), f32(out))); });
    EpilogueGemmOf<BFloat16> b{gemm<BFloat16>(true, false, l.in, l.out, N, bf16(xh), bf16(xh), f32(out)),
                               GemmEpilogue::bias_grad, nullptr, nullptr, f32(aux)};
    dw += time_ms([&] { EXPECT_TRUE(gpu().gemm_epilogue_bf16(b)); });
    flops += 2.0 * N * l.in * l.out;
    fwd_bytes += 2.0 * N * l.in + 2.0 * l.in * l.out + 4.0 * N * l.out * (l.gelu ? 2 : 1);
    dx_bytes += 2.0 * N * l.out + 2.0 * l.in * l.out + 4.0 * N * l.in;
    dw_bytes += 2.0 * N * (l.in + l.out) + 4.0 * l.in * l.out;
  }
  // Per-layer sums of four products: their floor is summed per product, so max() per product
  // would be lower-or-equal; all four are flop-bound here, so the sum of flops is the floor.
  pieces.push_back({"linear forward, bias (+GELU) fused, 4/layer", layers, fwd, flops, fwd_bytes});
  pieces.push_back({"linear dx, 4/layer", layers, dx, flops, dx_bytes});
  pieces.push_back({"linear dW + bias grad fused, 4/layer", layers, dw, flops, dw_bytes});
  const double head_flops = 2.0 * N * V * C;
  pieces.push_back({"LM head forward (N,C)x(V,C)^T", 1, time_ms([&] {
                      gpu().gemm_bf16(gemm<BFloat16>(false, true, N, V, C, bf16(xh), bf16(wh), f32(out)));
                    }),
                    head_flops, 2.0 * (N + V) * C + 4.0 * N * V});
  pieces.push_back({"LM head dx (N,V)x(V,C)", 1, time_ms([&] {
                      gpu().gemm_bf16(gemm<BFloat16>(false, false, N, C, V, bf16(xh), bf16(wh), f32(out)));
                    }),
                    head_flops, 2.0 * (N + C) * V + 4.0 * N * C});
  pieces.push_back({"LM head dW (N,V)^T x (N,C)", 1, time_ms([&] {
                      gpu().gemm_bf16(gemm<BFloat16>(true, false, V, C, N, bf16(xh), bf16(wh), f32(out)));
                    }),
                    head_flops, 2.0 * (V + C) * N + 4.0 * V * C});

  return pieces;
}

// Flash attention, normalisation, element-wise, loss and optimizer kernels.
std::vector<Piece> other_pieces(const Buffers& buf) {
  const Tensor &x = buf.x, &y = buf.y, &w = buf.w, &xh = buf.xh, &wh = buf.wh, &aux = buf.aux, &bias = buf.bias;
  Tensor out = buf.out;
  const int layers = kLayers;
  std::vector<Piece> pieces;
  // Attention (flash, one layer) and the element-wise, normalisation and loss kernels. Flash
  // attention reads qkv and dy and writes y and dqkv in bf16.
  Tensor lse = Tensor::empty({B, H, T}, DType::f32, kGpu), yh = Tensor::empty({N, C}, DType::bf16, kGpu);
  Tensor dqkv = Tensor::empty({N, 3 * C}, DType::bf16, kGpu);
  const double causal = 2.0 * B * H * T * T * (C / H);  // one causal product (half of 2 T^2 D per head)
  if (gpu().flash_attention_supports(B, T, C, H)) {
    pieces.push_back({"flash attention forward", layers,
                      time_ms([&] { gpu().flash_attention_forward(bf16(xh), bf16(yh), f32(lse), B, T, C, H); }),
                      2 * causal, 2.0 * N * 3 * C + 2.0 * N * C});
    pieces.push_back({"flash attention backward", layers, time_ms([&] {
                        gpu().flash_attention_backward(bf16(xh), bf16(yh), f32(lse), bf16(yh), bf16(dqkv), B, T, C, H);
                      }),
                      5 * causal, 2.0 * N * 3 * C + 4.0 * N * C + 2.0 * N * 3 * C});
  }
  const double nc = double(N) * C;
  Tensor mean = Tensor::empty({N}, DType::f32, kGpu), rstd = Tensor::empty({N}, DType::f32, kGpu);
  pieces.push_back({"layer_norm forward", 2 * layers + 1, time_ms([&] {
                      gpu().layer_norm_forward(f32(x), f32(w), f32(w), f32(out), f32(mean), f32(rstd), N, C, 1e-5f);
                    }),
                    0, 8.0 * nc});
  pieces.push_back({"layer_norm backward", 2 * layers + 1, time_ms([&] {
                      gpu().layer_norm_backward(f32(x), f32(w), f32(mean), f32(rstd), f32(y), f32(out), f32(aux),
                                                f32(aux) + C, N, C, false);
                    }),
                    0, 12.0 * nc});
  pieces.push_back({"gelu backward, bf16 out (N, 4C)", layers,
                    time_ms([&] { gpu().gelu_backward_bf16(f32(x), f32(y), bf16(xh), N * 4 * C); }), 0, 10.0 * 4 * nc});
  pieces.push_back({"residual add / gradient sum (N, C)", 4 * layers,
                    time_ms([&] { gpu().add(f32(x), f32(y), f32(out), 1, N * C); }), 0, 12.0 * nc});
  // Rounding to bf16: the products' activation inputs (10 NC per layer forward, 5 backward besides
  // GELU's, NC for the head), the head's gradient (N V), the compute copies of the weights (P).
  pieces.push_back({"to_bf16, activations and gradients (N, C)", 15 * layers + 1,
                    time_ms([&] { gpu().to_bf16(f32(x), bf16(xh), N * C); }), 0, 6.0 * nc});
  pieces.push_back({"to_bf16, LM head gradient (N, V)", 1, time_ms([&] { gpu().to_bf16(f32(x), bf16(xh), N * V); }), 0,
                    6.0 * N * V});
  pieces.push_back({"to_bf16, weight copies (P)", 1, time_ms([&] { gpu().to_bf16(f32(x), bf16(xh), P); }), 0, 6.0 * P});
  std::vector<int32_t> targets_host(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) targets_host[size_t(i)] = static_cast<int32_t>((i * 7919) % V);
  const Tensor targets = Tensor::from_vector({N}, targets_host).to(kGpu);
  pieces.push_back({"cross_entropy forward (probs kept)", 1, time_ms([&] {
                      gpu().cross_entropy_forward(f32(x), targets.data<int32_t>(), f32(out), f32(aux), N, V);
                    }),
                    0, 8.0 * N * V});
  pieces.push_back({"cross_entropy backward", 1, time_ms([&] {
                      gpu().cross_entropy_backward(f32(x), targets.data<int32_t>(), 1.0f / N, f32(out), N, V);
                    }),
                    0, 8.0 * N * V});
  const AdamWStep s{1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.1f, 0.05f, 1.0f};
  pieces.push_back(
      {"AdamW (P)", 1, time_ms([&] { gpu().adamw({{AdamWTensor{f32(out), f32(x), f32(y), f32(y) + P, P, true}}}, s); }),
       0, 28.0 * P});
  pieces.push_back(
      {"gradient norm, sum of squares (P)", 1, time_ms([&] { gpu().sum_squares(f32(x), P); }), 0, 4.0 * P});
  return pieces;
}

}  // namespace

TEST(CudaStepFloor, Gpt2B16Bf16) {
  if (!device_available(kGpu)) GTEST_SKIP() << "no CUDA device";
  if (!timing_requested()) GTEST_SKIP() << "set TUTTI_CUDA_TIMING=1 to time the pieces";
  Buffers buf;
  buf.x = random_gpu(N * V, 1), buf.y = random_gpu(N * V, 2), buf.w = random_gpu(V * C, 3);
  buf.xh = ops::to_bf16(buf.x), buf.wh = ops::to_bf16(buf.w);
  buf.out = Tensor::empty({N * V}, DType::f32, kGpu), buf.aux = Tensor::empty({N * 4 * C}, DType::f32, kGpu);
  buf.bias = random_gpu(V, 4);
  const double copy_ms =
      time_ms([&] { gpu().copy_on_device(f32(buf.out), f32(buf.x), size_t(N * V) * sizeof(float)); });
  copy_rate = 2.0 * N * V * sizeof(float) / (copy_ms * 1e-3);
  std::printf("device-to-device copy: %.0f GB/s (bytes read + written); bf16 GEMM rate taken as 790 TFLOP/s\n",
              copy_rate / 1e9);
  std::vector<Piece> pieces = gemm_pieces(buf), others = other_pieces(buf);
  pieces.insert(pieces.end(), others.begin(), others.end());
  print_table(pieces);
}
