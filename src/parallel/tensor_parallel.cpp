// Tensor-parallel primitives. Letters: N rows, V this rank's vocabulary columns, C channels.
#include "tutti/parallel/tensor_parallel.hpp"

#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <vector>

#include "backend/backend.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/ops/ops.hpp"

namespace tutti::parallel {
namespace {

// A tape node whose backward is a function (the ops' own node type is private to ops.cpp).
class GroupNode final : public Node {
 public:
  using Rule = std::function<Tensor(const Tensor&)>;
  GroupNode(const char* name, Tensor input, Rule rule) : Node({std::move(input)}), name_(name), rule_(std::move(rule)) {}
  const char* name() const override { return name_; }
  std::vector<Tensor> backward(const Tensor& grad_output) override { return {rule_(grad_output)}; }

 private:
  const char* name_;
  Rule rule_;
};

// A contiguous copy of `x` summed over the group.
Tensor all_reduced(const Tensor& x, comm::Communicator& group) {
  Tensor out = x.contiguous().clone();
  group.all_reduce(std::span<float>(out.data<float>(), size_t(out.numel())))->wait();
  return out;
}

// The group must reach the tensor's memory: GPU tensors need an nccl group.
void check_reachable(const Tensor& t, const comm::Communicator& group, const char* op) {
  TUTTI_CHECK_AS(InvalidArgument, t.device().is_cpu() || group.backend() == "nccl", op, ": ", t.str(),
                 " cannot travel over the ", group.backend(), " group; GPU tensors need an nccl group");
}

// Sums (or maxes) small host vectors over the group, through the device `device` when the group
// carries device memory.
void all_reduce_values(comm::Communicator& group, std::vector<float>& v, comm::ReduceOp op, Device device) {
  if (device.is_cpu()) {
    group.all_reduce(std::span<float>(v), op)->wait();
    return;
  }
  Tensor t = Tensor::from_vector({int64_t(v.size())}, v).to(device);
  group.all_reduce(std::span<float>(t.data<float>(), v.size()), op)->wait();
  v = t.to(Device::cpu()).to_vector<float>();
}

}  // namespace

namespace {
// Copies `length` indices along `dim` from src[.., src_at.., ..] to dst[.., dst_at.., ..]; both
// contiguous CPU tensors of the same shape apart from that dimension.
void copy_along(const Tensor& src, int64_t src_at, Tensor& dst, int64_t dst_at, int64_t length, int dim) {
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < dim; ++d) outer *= src.size(d);
  for (int d = dim + 1; d < src.ndim(); ++d) inner *= src.size(d);
  const size_t run = size_t(length * inner) * dtype_size(src.dtype());
  const auto* from = static_cast<const std::byte*>(src.raw_data());
  auto* to = static_cast<std::byte*>(dst.raw_data());
  const size_t src_row = size_t(src.size(dim) * inner) * dtype_size(src.dtype()),
               dst_row = size_t(dst.size(dim) * inner) * dtype_size(src.dtype());
  for (int64_t o = 0; o < outer; ++o)
    std::memcpy(to + size_t(o) * dst_row + size_t(dst_at * inner) * dtype_size(src.dtype()),
                from + size_t(o) * src_row + size_t(src_at * inner) * dtype_size(src.dtype()), run);
}
}  // namespace

Tensor take_shard(const Tensor& full_in, TensorSplit split, int rank, int size) {
  if (split.replicated() || size == 1) return full_in;
  TUTTI_CHECK_AS(InvalidArgument, split.dim < full_in.ndim() && full_in.size(split.dim) % (split.parts * size) == 0,
                 "cannot split ", full_in.str(), " into ", split.parts, " x ", size, " pieces along dimension ",
                 split.dim);
  const Tensor full = full_in.to(Device::cpu()).contiguous();
  const int64_t block = full.size(split.dim) / split.parts, piece = block / size;
  Shape shape = full.shape();
  shape[split.dim] = piece * split.parts;
  Tensor out = Tensor::empty(shape, full.dtype(), Device::cpu());
  for (int p = 0; p < split.parts; ++p) copy_along(full, p * block + rank * piece, out, p * piece, piece, split.dim);
  return out.to(full_in.device());
}

Tensor join_shards(const std::vector<Tensor>& shards, TensorSplit split) {
  TUTTI_CHECK_AS(InvalidArgument, !shards.empty(), "join_shards: no shards");
  if (split.replicated() || shards.size() == 1) return shards.front();
  const Tensor& first = shards.front();
  const int64_t size = int64_t(shards.size()), piece = first.size(split.dim) / split.parts, block = piece * size;
  Shape shape = first.shape();
  shape[split.dim] = block * split.parts;
  Tensor full = Tensor::empty(shape, first.dtype(), Device::cpu());
  for (int64_t r = 0; r < size; ++r) {
    TUTTI_CHECK_AS(InvalidArgument, shards[size_t(r)].shape() == first.shape(), "join_shards: shard ", r, " is ",
                   shards[size_t(r)].str(), ", shard 0 ", first.str());
    const Tensor shard = shards[size_t(r)].to(Device::cpu()).contiguous();
    for (int p = 0; p < split.parts; ++p) copy_along(shard, p * piece, full, p * block + r * piece, piece, split.dim);
  }
  return full.to(first.device());
}

Tensor copy_to_group(const Tensor& x, comm::Communicator& group) {
  if (group.size() == 1 || !any_requires_grad({&x})) return x;
  check_reachable(x, group, "copy_to_group");
  const Tensor out = x.contiguous().view(x.shape());  // a new handle on the same data: the node's output
  return record(out, std::make_shared<GroupNode>("copy_to_group", x, [&group](const Tensor& g) {
                  return all_reduced(g, group);
                }));
}

Tensor reduce_from_group(const Tensor& x, comm::Communicator& group) {
  if (group.size() == 1) return x;
  check_reachable(x, group, "reduce_from_group");
  Tensor out = all_reduced(x, group);
  if (!any_requires_grad({&x})) return out;
  return record(out, std::make_shared<GroupNode>("reduce_from_group", x, [](const Tensor& g) { return g; }));
}

Tensor vocab_parallel_embedding(const Tensor& indices, const Tensor& table, int64_t first, comm::Communicator& group) {
  if (group.size() == 1 && first == 0) return ops::embedding(indices, table);
  TUTTI_CHECK_AS(InvalidArgument, indices.dtype() == DType::i32, "vocab_parallel_embedding: indices must be i32, got ",
                 indices.str());
  TUTTI_CHECK_AS(InvalidArgument, table.ndim() == 2 && table.dtype() == DType::f32,
                 "vocab_parallel_embedding: table must be f32 (V, C), got ", table.str());
  // Indices of other ranks' rows become -1: a zero row, no gradient.
  const int64_t V = table.size(0), C = table.size(1), n = indices.numel();
  std::vector<int32_t> local = indices.contiguous().to(Device::cpu()).to_vector<int32_t>();
  for (int32_t& i : local) i = (i >= first && i < first + V) ? static_cast<int32_t>(i - first) : -1;
  Tensor idx = Tensor::from_vector({n}, local).to(table.device());
  Shape shape = indices.shape();
  shape.push_back(C);
  Tensor rows = Tensor::empty(shape, DType::f32, table.device());
  const Tensor tab = table.contiguous();
  backend_for(tab.device()).embedding_forward(idx.data<int32_t>(), tab.data<float>(), rows.data<float>(), n, C, V);
  if (any_requires_grad({&table}))
    rows = record(rows, std::make_shared<GroupNode>("vocab_parallel_embedding", table, [idx, V, C, n](const Tensor& g) {
                    Tensor dt = Tensor::zeros({V, C}, DType::f32, g.device());
                    backend_for(g.device()).embedding_backward(idx.data<int32_t>(), g.contiguous().data<float>(),
                                                               dt.data<float>(), n, C);
                    return dt;
                  }));
  return reduce_from_group(rows, group);
}

Tensor vocab_parallel_cross_entropy(const Tensor& logits_in, const Tensor& targets_in, int64_t first,
                                    comm::Communicator& group) {
  if (group.size() == 1 && first == 0) return ops::cross_entropy(logits_in, targets_in);
  TUTTI_CHECK_AS(InvalidArgument, logits_in.ndim() == 2 && logits_in.dtype() == DType::f32 && logits_in.size(0) > 0,
                 "vocab_parallel_cross_entropy: logits must be f32 (N, V), got ", logits_in.str());
  TUTTI_CHECK_AS(InvalidArgument, targets_in.dtype() == DType::i32 && targets_in.numel() == logits_in.size(0),
                 "vocab_parallel_cross_entropy: targets ", targets_in.str(), " do not match logits ", logits_in.str());
  check_reachable(logits_in, group, "vocab_parallel_cross_entropy");
  const Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const Device device = logits.device();
  Tensor stats_t = Tensor::empty({N, 3}, DType::f32, device);
  backend_for(device).vocab_cross_entropy_stats(logits.data<float>(), targets.data<int32_t>(), first,
                                                stats_t.data<float>(), N, V);
  const std::vector<float> stats = stats_t.to(Device::cpu()).to_vector<float>();
  // The rows' global max, then the sums of exp(x - max) rescaled to it and the targets' logits.
  std::vector<float> mx(static_cast<size_t>(N)), sums(static_cast<size_t>(2 * N));
  for (int64_t r = 0; r < N; ++r) mx[size_t(r)] = stats[size_t(3 * r)];
  all_reduce_values(group, mx, comm::ReduceOp::max, device);
  for (int64_t r = 0; r < N; ++r) {
    const size_t i = size_t(r);
    sums[i] = stats[3 * i + 1] * std::exp(stats[3 * i] - mx[i]);
    sums[size_t(N) + i] = stats[3 * i + 2];
  }
  all_reduce_values(group, sums, comm::ReduceOp::sum, device);
  std::vector<float> lse_values(static_cast<size_t>(N));
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    const size_t i = size_t(r);
    lse_values[i] = std::log(sums[i]) + mx[i];
    total += double(lse_values[i]) - double(sums[size_t(N) + i]);
  }
  const Tensor lse = Tensor::from_vector({N}, lse_values).to(device);
  Tensor loss = Tensor::full({}, static_cast<float>(total / double(N)), device);
  if (!any_requires_grad({&logits_in})) return loss;
  return record(loss, std::make_shared<GroupNode>("vocab_parallel_cross_entropy", logits_in,
                                                  [logits, targets, lse, first, N, V](const Tensor& g) {
                                                    Tensor d = Tensor::empty({N, V}, DType::f32, logits.device());
                                                    backend_for(logits.device())
                                                        .vocab_cross_entropy_backward(
                                                            logits.data<float>(), targets.data<int32_t>(), first,
                                                            lse.data<float>(), g.item() / float(N), d.data<float>(), N, V);
                                                    return d;
                                                  }));
}

}  // namespace tutti::parallel
