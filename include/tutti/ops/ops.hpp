// The op set. Coarse, fused ops with hand-written backward; each records one tape node when an
// input requires grad. Inputs may live on any device with a backend that implements the kernel.
// Letters used in shapes: B batch, T time (sequence), C channels, H heads, V vocabulary, N rows.
#pragma once
#include "tutti/core/tensor.hpp"

namespace tutti::ops {

// Mixed precision. Where an op below takes `b_bf16` / `weight_bf16` (a bf16 copy of that fp32
// weight, same shape, kept by its module: nn::Module::refresh_compute_copies), its matrix
// products read the copy and the other operands rounded to bf16 (the forward's input, kept for
// backward, and the incoming gradient), accumulate in fp32 and return fp32; the gradient goes to
// the fp32 weight. Undefined: everything in fp32. GPU only (the CPU backend computes fp32 only).

// An input that a mixed-precision product reads (x of linear, a of matmul) may be bf16 already
// (a producer wrote it rounded): it is read as it is, and its gradient is fp32.

// C = op(A) op(B): (M, K) x (K, N) -> (M, N), or batched (B, M, K) x (B, K, N) -> (B, M, N).
// trans_a / trans_b read A / B transposed (no copy). out bf16 (with b_bf16 only): C is written
// rounded to bf16, and the gradient coming back to it may be bf16 too (read as it is).
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false,
              const Tensor& b_bf16 = Tensor(), DType out = DType::f32);

// y = x W + b with x (..., in), W (in, out) (Hugging Face Conv1D layout), b (out) or undefined.
// out bf16 (with weight_bf16 only): y written rounded to bf16, for a product that reads it next.
// residual (fp32, y's shape) or undefined: y = residual + x W + b, the end of a residual branch in
// the product itself (on CUDA in its epilogue) instead of an add after it.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(),
              const Tensor& weight_bf16 = Tensor(), DType out = DType::f32, const Tensor& residual = Tensor());
// gelu(linear(x, weight, bias, weight_bf16)) as one op: on CUDA one cuBLASLt product with the
// bias and GELU (tanh form) in its epilogue, keeping GELU's input for backward; elsewhere, or
// without a bias, the two ops. out bf16 (mixed only): the result and the kept input in bf16 where
// the product can write them so; fp32 where it cannot (the product after it reads either).
Tensor linear_gelu(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& weight_bf16 = Tensor(),
                   DType out = DType::f32);

// The GELU MLP, linear(linear_gelu(x, fc_w, fc_b), proj_w, proj_b) (proj_b may be undefined), as
// one op: under mixed precision (both bf16 copies) with a fused backend, the hidden activations
// are bf16 (GELU's output and input, from one product) and the backward puts GELU's gradient into
// the second layer's dx product (cuBLASLt's DGELU); elsewhere the two ops. residual: added to the
// result in the second product, as linear's.
Tensor mlp(const Tensor& x, const Tensor& fc_w, const Tensor& fc_b, const Tensor& proj_w, const Tensor& proj_b,
           const Tensor& fc_w_bf16 = Tensor(), const Tensor& proj_w_bf16 = Tensor(),
           const Tensor& residual = Tensor());

// x rounded to bf16 (nearest even), no autograd: what the mixed-precision products read. A bf16 x
// is returned as it is.
Tensor to_bf16(const Tensor& x);

// a + b, where b's shape equals a's or is a suffix of it (broadcast over a's leading dimensions).
Tensor add(const Tensor& a, const Tensor& b);
// a * s for a scalar s.
Tensor scale(const Tensor& a, float s);

// Activations, element-wise.
Tensor gelu(const Tensor& x);  // tanh approximation (GPT-2's "gelu_new")
Tensor relu(const Tensor& x);

// LayerNorm over the last dimension: x (..., C), weight (C), bias (C). out bf16: the result
// rounded to bf16 in the same pass (mixed precision, where it feeds a product; GPU only).
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps = 1e-5f,
                  DType out = DType::f32);

// Causal multi-head self-attention on a fused projection: qkv (B, T, 3C) laid out [q | k | v]
// (bf16 already, with compute bf16: read as it is),
// each C split into n_head heads. Returns (B, T, C) with the heads side by side. compute bf16:
// the four matrix products in bf16 (qkv rounded once and kept, the probabilities kept in bf16),
// scores, softmax statistics and the result in fp32. Where the backend runs it as flash attention
// (bf16, head size 64 on CUDA) the result is bf16 (for a mixed-precision product to read: a
// linear with a bf16 weight copy) and qkv's gradient is bf16; the gradient coming back to the
// result (fp32, or bf16 as it is) is rounded to bf16 once for the backward (ops::attention hands
// it over in bf16 from the projection's product).
Tensor causal_attention(const Tensor& qkv, int n_head, DType compute = DType::f32);

// Causal self-attention and its output projection as one op: residual + linear(causal_attention(
// qkv, n_head, compute), proj_w, proj_b, proj_w_bf16), compute bf16 where the projection has a
// bf16 copy (proj_b and residual may be undefined). Where the attention runs as flash attention,
// the projection's dx product writes the attention output's gradient in bf16 for the attention's
// backward to read (the two ops apart would write it in fp32 and round it again); elsewhere the two ops.
Tensor attention(const Tensor& qkv, int n_head, const Tensor& proj_w, const Tensor& proj_b,
                 const Tensor& proj_w_bf16 = Tensor(), const Tensor& residual = Tensor());

// Inference only (no autograd): attention of n new positions past .. past+n-1, q (n, C), over
// key and value caches k, v (L, C) whose first past+n rows are filled. Returns (n, C).
Tensor cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t past, int n_head);

// Rows of table (V, C) picked by i32 indices (...) -> (..., C).
Tensor embedding(const Tensor& indices, const Tensor& table);

// Mean cross-entropy of logits (N, V) against i32 targets (N); softmax fused in. Returns ().
// bf16 logits (a mixed-precision LM head's, where the backend has the fused form): the softmax
// statistics and the loss in fp32, the gradient written in bf16.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets);
// Whether cross_entropy on `device` has the fused kernels (and so takes bf16 logits).
bool fused_cross_entropy(Device device);

// Sum and mean of all elements. Return ().
Tensor sum(const Tensor& x);
Tensor mean(const Tensor& x);

// Differentiable reshape (one dim may be -1).
Tensor reshape(const Tensor& x, const Shape& shape);

// Softmax over the last dimension (no autograd; for inference and sampling).
Tensor softmax(const Tensor& x);

}  // namespace tutti::ops
