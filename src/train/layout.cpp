#include "train/layout.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>

#include "tutti/core/error.hpp"

namespace tutti::train {

Layout plan_layout(const TrainConfig& c, int world_size) {
  Layout l;
  const int pp = c.pp, tp = c.tp, model_parallel = pp * tp;
  TUTTI_CHECK_AS(ConfigError, world_size % model_parallel == 0, "pp ", pp, " x tp ", tp, " = ", model_parallel,
                 " does not divide the ", world_size, " ranks of the launch");
  const int dp = c.dp > 0 ? c.dp : world_size / model_parallel;
  TUTTI_CHECK_AS(ConfigError, dp * model_parallel == world_size, "dp ", dp,
                 model_parallel == 1 ? "" : detail::concat(" x pp ", pp, " x tp ", tp, " = ", dp * model_parallel),
                 " does not match the ", world_size, " ranks of the launch");
  l.mesh = {dp, pp, tp};
  TUTTI_CHECK_AS(ConfigError, c.batch % dp == 0, "global batch ", c.batch, " is not divisible by dp ", dp);
  l.per_rank = c.batch / dp;
  if (c.micro_batches > 0) {
    TUTTI_CHECK_AS(ConfigError, l.per_rank % c.micro_batches == 0, "global batch ", c.batch, " over dp ", dp, " gives ",
                   l.per_rank, " sequences per replica, not divisible into ", c.micro_batches, " micro-batches");
    l.micro = l.per_rank / c.micro_batches;
    TUTTI_CHECK_AS(ConfigError, c.micro_batch == 0 || c.micro_batch == l.micro, "micro_batch ", c.micro_batch,
                   " contradicts micro_batches ", c.micro_batches, " (", l.per_rank, " sequences per replica / ",
                   c.micro_batches, " = ", l.micro, ")");
  } else {
    l.micro = c.micro_batch > 0 ? c.micro_batch : l.per_rank;
    TUTTI_CHECK_AS(ConfigError, l.per_rank % l.micro == 0, "global batch ", c.batch, " over dp ", dp, " gives ",
                   l.per_rank, " sequences per rank, not divisible into micro-batches of ", l.micro);
  }
  l.micro_batches = l.per_rank / l.micro;
  l.schedule = parallel::parse_schedule(c.schedule);
  TUTTI_CHECK_AS(ConfigError, c.heads % tp == 0, "tp ", tp, " does not divide the ", c.heads, " heads");
  const nn::GPTConfig model = c.model();
  TUTTI_CHECK_AS(ConfigError, model.vocab_size % tp == 0, "tp ", tp, " does not divide the vocabulary of ",
                 model.vocab_size);
  TUTTI_CHECK_AS(ConfigError, c.layers >= pp, "pp ", pp, " needs at least as many layers; the model has ", c.layers);
  TUTTI_CHECK_AS(ConfigError, !(pp > 1 && c.zero == 2 && dp > 1), "zero 2 (sharded gradients) does not combine with pp ",
                 pp, ": the tied embedding's gradient is summed between the first and last stage after the "
                 "data-parallel reduction; use zero 1");
  if (pp > 1 && l.micro_batches < pp)
    l.warning = detail::concat(l.micro_batches, " micro-batch(es) for ", pp, " pipeline stages: most of each step is "
                               "bubble (predicted ", int(100 * parallel::predicted_bubble(pp, l.micro_batches)),
                               "%); use --micro-batches >= ", pp);
  l.stage_layers = parallel::balance_stages(std::vector<double>(size_t(c.layers), model.block_flops_per_token(c.context)),
                                            0.0, model.head_flops_per_token(), pp);
  return l;
}

nn::GPTPartition partition_of(const Layout& layout, parallel::MeshCoord coord, comm::Communicator* tp) {
  nn::GPTPartition part;
  part.first_layer = layout.stage_layers[size_t(coord.pp)];
  part.end_layer = layout.stage_layers[size_t(coord.pp) + 1];
  part.embedding = coord.pp == 0;
  part.head = coord.pp == layout.mesh.pp - 1;
  part.tp = layout.mesh.tp > 1 ? tp : nullptr;
  return part;
}

std::string describe_part(const Layout& layout, const nn::GPTConfig& model, int rank, parallel::MeshCoord c) {
  const parallel::MeshShape& m = layout.mesh;
  const int first = layout.stage_layers[size_t(c.pp)], last = layout.stage_layers[size_t(c.pp) + 1] - 1;
  std::string out = detail::concat("rank ", rank, ": dp ", c.dp, "/", m.dp, ", pp ", c.pp, "/", m.pp, " (blocks ", first,
                                   first == last ? "" : detail::concat("-", last), c.pp == 0 ? ", embeddings" : "",
                                   c.pp == m.pp - 1 ? ", ln_f and head" : "", ")");
  if (m.tp > 1) {
    const int heads = model.n_head / m.tp, rows = model.vocab_size / m.tp, hidden = 4 * model.n_embd / m.tp;
    out += detail::concat(", tp ", c.tp, "/", m.tp, " (heads ", c.tp * heads, "-", (c.tp + 1) * heads - 1,
                          ", hidden units ", c.tp * hidden, "-", (c.tp + 1) * hidden - 1, ", vocabulary rows ",
                          c.tp * rows, "-", (c.tp + 1) * rows - 1, ")");
  }
  return out;
}

namespace {

constexpr int kHeaderTag = 30000, kDataTag = 30001;  // pipeline traffic uses tags 2m, 2m + 1

// The GPT parameter name of a tensor named name + one of the suffixes.
std::string parameter_of(const std::string& name, const std::vector<std::string>& suffixes) {
  for (const std::string& s : suffixes)
    if (!s.empty() && name.size() > s.size() && name.ends_with(s)) return name.substr(0, name.size() - s.size());
  return name;
}

std::vector<float> flatten(const std::vector<Tensor>& tensors) {
  size_t n = 0;
  for (const Tensor& t : tensors) n += size_t(t.numel());
  std::vector<float> flat;
  flat.reserve(n);
  for (const Tensor& t : tensors) {
    const Tensor c = t.to(Device::cpu()).contiguous();
    flat.insert(flat.end(), c.data<float>(), c.data<float>() + c.numel());
  }
  return flat;
}

// This stage's whole tensors on its tp rank 0 (empty on the others).
NamedTensors join_stage(comm::Communicator& tp, const NamedTensors& local, const std::vector<std::string>& suffixes) {
  if (tp.size() == 1) return local;
  std::vector<Tensor> split;
  for (const auto& [name, t] : local)
    if (!nn::GPT::split_of(parameter_of(name, suffixes)).replicated()) split.push_back(t);
  const std::vector<float> mine = flatten(split);
  std::vector<float> all(mine.size() * size_t(tp.size()));
  tp.all_gather(std::span<const float>(mine), std::span<float>(all), std::vector<int64_t>(size_t(tp.size()), int64_t(mine.size())))
      ->wait();
  if (tp.rank() != 0) return {};
  NamedTensors out;
  size_t offset = 0;
  for (const auto& [name, t] : local) {
    const parallel::TensorSplit how = nn::GPT::split_of(parameter_of(name, suffixes));
    if (how.replicated()) {
      out.emplace_back(name, t.to(Device::cpu()).contiguous());
      continue;
    }
    std::vector<Tensor> shards;
    for (int r = 0; r < tp.size(); ++r) {
      const float* at = all.data() + size_t(r) * mine.size() + offset;
      shards.push_back(Tensor::from_vector(t.shape(), std::vector<float>(at, at + t.numel())));
    }
    offset += size_t(t.numel());
    out.emplace_back(name, parallel::join_shards(shards, how));
  }
  return out;
}

}  // namespace

NamedTensors gather_stage(const parallel::Mesh& mesh, const NamedTensors& local, const std::vector<std::string>& suffixes) {
  if (mesh.dp_rank() != 0) return {};
  return join_stage(mesh.tp_group(), local, suffixes);
}

NamedTensors gather_whole(const parallel::Mesh& mesh, const NamedTensors& local, const nn::GPTConfig& model,
                          const std::vector<std::string>& suffixes) {
  NamedTensors stage = gather_stage(mesh, local, suffixes);
  if (mesh.dp_rank() != 0 || mesh.tp_rank() != 0) return {};
  comm::Communicator& pp = mesh.pp_group();
  if (pp.rank() != 0) {  // names and shapes, then the values, to stage 0
    std::string header;
    std::vector<Tensor> values;
    for (const auto& [name, t] : stage) {
      header += name;
      for (int d = 0; d < t.ndim(); ++d) header += " " + std::to_string(t.size(d));
      header += "\n";
      values.push_back(t);
    }
    const std::vector<float> flat = flatten(values);
    const int64_t sizes[2] = {int64_t(header.size()), int64_t(flat.size())};
    pp.send(std::span<const int64_t>(sizes, 2), 0, kHeaderTag)->wait();
    pp.send(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(header.data()), header.size()), 0, kHeaderTag)
        ->wait();
    pp.send(std::span<const float>(flat), 0, kDataTag)->wait();
    return {};
  }
  std::map<std::string, Tensor> found;
  for (auto& [name, t] : stage) found.emplace(name, t);
  for (int p = 1; p < pp.size(); ++p) {
    int64_t sizes[2];
    pp.recv(std::span<int64_t>(sizes, 2), p, kHeaderTag)->wait();
    std::string header(static_cast<size_t>(sizes[0]), '\0');
    pp.recv(std::span<uint8_t>(reinterpret_cast<uint8_t*>(header.data()), header.size()), p, kHeaderTag)->wait();
    std::vector<float> flat(static_cast<size_t>(sizes[1]));
    pp.recv(std::span<float>(flat), p, kDataTag)->wait();
    std::istringstream lines(header);
    size_t offset = 0;
    for (std::string line; std::getline(lines, line);) {
      std::istringstream fields(line);
      std::string name;
      fields >> name;
      Shape shape;
      for (int64_t d; fields >> d;) shape.push_back(d);
      const int64_t n = shape.numel();
      TUTTI_CHECK(offset + size_t(n) <= flat.size(), "stage ", p, " sent fewer values than its tensors need");
      found.emplace(name, Tensor::from_vector(shape, std::vector<float>(flat.begin() + std::ptrdiff_t(offset),
                                                                        flat.begin() + std::ptrdiff_t(offset + size_t(n)))));
      offset += size_t(n);  // a duplicate (wte on the last stage) is dropped by emplace
    }
  }
  NamedTensors out;
  for (const auto& [name, shape] : nn::GPT::full_parameter_shapes(model))
    for (const std::string& suffix : suffixes) {
      auto it = found.find(name + suffix);
      TUTTI_CHECK(it != found.end(), "no stage sent '", name + suffix, "'");
      out.emplace_back(it->first, it->second);
    }
  return out;
}

NamedTensors shards_of(const NamedTensors& whole, const nn::GPT& model, const std::vector<std::string>& suffixes) {
  std::map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : whole) by_name.emplace(name, &t);
  comm::Communicator* tp = model.partition().tp;
  NamedTensors out;
  for (const auto& [name, param] : model.named_parameters())
    for (const std::string& suffix : suffixes) {
      auto it = by_name.find(name + suffix);
      TUTTI_CHECK_AS(CheckpointError, it != by_name.end(), "'", name + suffix, "' is missing");
      out.emplace_back(name + suffix, parallel::take_shard(*it->second, nn::GPT::split_of(name), tp ? tp->rank() : 0,
                                                           tp ? tp->size() : 1));
    }
  return out;
}

}  // namespace tutti::train
