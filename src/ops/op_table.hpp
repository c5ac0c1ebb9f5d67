// The one table of differentiable ops: each op's tape node reports its name from here, and adding
// an op means adding a row (the static_assert keeps the count honest).
#pragma once
#include <array>
#include <string_view>

namespace tutti {

enum class OpKind : int {
  matmul, linear, add, scale, gelu, relu, layer_norm, causal_attention, embedding, cross_entropy, sum, reshape,
  linear_gelu, mlp, attention, kCount
};

inline constexpr std::array<std::string_view, static_cast<size_t>(OpKind::kCount)> kOpNames = {
    "matmul", "linear", "add", "scale", "gelu", "relu", "layer_norm", "causal_attention", "embedding",
    "cross_entropy", "sum", "reshape", "linear_gelu", "mlp", "attention"};
static_assert(kOpNames.size() == static_cast<size_t>(OpKind::kCount), "every op needs a name");

inline const char* op_name(OpKind k) { return kOpNames[static_cast<size_t>(k)].data(); }

}  // namespace tutti
