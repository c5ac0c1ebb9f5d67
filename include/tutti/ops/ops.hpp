// The op set. Coarse, fused ops with hand-written backward; each records one tape node when an
// input requires grad. Inputs may live on any device with a backend that implements the kernel.
// Letters used in shapes: B batch, T time (sequence), C channels, H heads, V vocabulary, N rows.
#pragma once
#include "tutti/core/tensor.hpp"

namespace tutti::ops {

// C = op(A) op(B): (M, K) x (K, N) -> (M, N), or batched (B, M, K) x (B, K, N) -> (B, M, N).
// trans_a / trans_b read A / B transposed (no copy).
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);

// y = x W + b with x (..., in), W (in, out) (Hugging Face Conv1D layout), b (out) or undefined.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());

// a + b, where b's shape equals a's or is a suffix of it (broadcast over a's leading dimensions).
Tensor add(const Tensor& a, const Tensor& b);
// a * s for a scalar s.
Tensor scale(const Tensor& a, float s);

// Activations, element-wise.
Tensor gelu(const Tensor& x);  // tanh approximation (GPT-2's "gelu_new")
Tensor relu(const Tensor& x);

// LayerNorm over the last dimension: x (..., C), weight (C), bias (C).
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps = 1e-5f);

// Causal multi-head self-attention on a fused projection: qkv (B, T, 3C) laid out [q | k | v],
// each C split into n_head heads. Returns (B, T, C) with the heads side by side.
Tensor causal_attention(const Tensor& qkv, int n_head);

// Inference only (no autograd): attention of n new positions past .. past+n-1, q (n, C), over
// key and value caches k, v (L, C) whose first past+n rows are filled. Returns (n, C).
Tensor cached_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t past, int n_head);

// Rows of table (V, C) picked by i32 indices (...) -> (..., C).
Tensor embedding(const Tensor& indices, const Tensor& table);

// Mean cross-entropy of logits (N, V) against i32 targets (N); softmax fused in. Returns ().
Tensor cross_entropy(const Tensor& logits, const Tensor& targets);

// Sum and mean of all elements. Return ().
Tensor sum(const Tensor& x);
Tensor mean(const Tensor& x);

// Differentiable reshape (one dim may be -1).
Tensor reshape(const Tensor& x, const Shape& shape);

// Softmax over the last dimension (no autograd; for inference and sampling).
Tensor softmax(const Tensor& x);

}  // namespace tutti::ops
