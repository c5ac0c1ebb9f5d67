// Data parallelism with bucketed, overlapped gradient reduction and ZeRO 1/2 sharding.
// N is the number of parameter elements, W the group size; rank r owns the shard [lo, hi) of the
// flattened parameters (W = 1 or ZeRO 0: the whole range).
#include "tutti/parallel/data_parallel.hpp"

#include <chrono>
#include <cmath>
#include <unordered_map>

#include "backend/backend.hpp"
#include "optim/adamw_step.hpp"
#include "tutti/autograd/node.hpp"

namespace tutti::parallel {
namespace {

using Clock = std::chrono::steady_clock;

struct Segment {  // one parameter inside the flat buffers
  std::string name;
  Tensor param;
  int64_t offset, numel;
  bool decay;  // AdamW weight decay: matrices and embeddings, as optim::AdamW
  size_t bucket;
};

struct Bucket {
  int64_t begin = 0, end = 0;  // flat range
  int pending = 0;     // parameters whose gradient is not final yet
  Tensor staging;      // ZeRO 2: the bucket's gradients until reduce-scattered
  comm::WorkHandle work;
};

int64_t shard_begin(int64_t n, int rank, int world) { return n * rank / world; }

}  // namespace

struct DataParallel::Impl {
  nn::Module& model;
  comm::Communicator& group;
  DataParallelOptions options;
  optim::AdamWOptions adamw;
  int world, rank;
  Device device;
  std::vector<Segment> segments;
  std::vector<Bucket> buckets;
  int64_t n = 0, lo = 0, hi = 0;
  Tensor params;      // (N): every parameter is a view into it
  Tensor grads;       // (N) for ZeRO 0/1; bucket buffers are its slices
  Tensor grad_shard;  // (hi - lo) for ZeRO 2
  Tensor exp_avg, exp_avg_sq;  // (hi - lo)
  int64_t t = 0;
  bool armed = false;
  std::vector<bool> delivered;  // per segment, this sync
  CommStats stats;
  Clock::time_point backward_start;

  Impl(nn::Module& m, comm::Communicator& g, const optim::AdamWOptions& a, const DataParallelOptions& o)
      : model(m), group(g), options(o), adamw(a), world(g.size()), rank(g.rank()) {
    TUTTI_CHECK_AS(InvalidArgument, o.zero >= 0 && o.zero <= 2, "zero stage must be 0, 1 or 2, got ", o.zero);
    TUTTI_CHECK_AS(InvalidArgument, o.bucket_bytes > 0, "bucket size must be positive, got ", o.bucket_bytes);
    auto named = m.named_parameters();
    TUTTI_CHECK_AS(InvalidArgument, !named.empty(), "data parallelism needs a model with parameters");
    device = named.front().second.device();
    // Reverse registration order: backward produces the last layers' gradients first.
    for (auto it = named.rbegin(); it != named.rend(); ++it) {
      TUTTI_CHECK_AS(InvalidArgument, it->second.dtype() == DType::f32 && it->second.device() == device,
                     "parameter '", it->first, "' must be f32 on ", device.str());
      segments.push_back({it->first, it->second, n, it->second.numel(), it->second.ndim() >= 2, 0});
      n += it->second.numel();
    }
    lo = options.zero == 0 ? 0 : shard_begin(n, rank, world);
    hi = options.zero == 0 ? n : shard_begin(n, rank + 1, world);
    flatten_parameters();
    make_buckets();
    exp_avg = Tensor::zeros({hi - lo}, DType::f32, device);
    exp_avg_sq = Tensor::zeros({hi - lo}, DType::f32, device);
    if (options.zero < 2) grads = Tensor::zeros({n}, DType::f32, device);
    else grad_shard = Tensor::zeros({hi - lo}, DType::f32, device);
    group.broadcast(std::span<float>(params.data<float>(), size_t(n)), 0)->wait();
    model.refresh_compute_copies();  // mixed precision: bf16 copies of rank 0's weights
    for (size_t i = 0; i < segments.size(); ++i)
      segments[i].param.impl().on_grad_ready = [this, i](TensorImpl&) { on_grad_ready(i); };
  }

  ~Impl() {
    for (Segment& s : segments) s.param.impl().on_grad_ready = nullptr;
  }

  Backend& backend() { return backend_for(device); }

  // Moves every parameter into one buffer; the module's tensors keep their identity.
  void flatten_parameters() {
    params = Tensor::empty({n}, DType::f32, device);
    for (Segment& s : segments) {
      Tensor contiguous = s.param.contiguous();
      backend().copy_on_device(params.data<float>() + s.offset, contiguous.data<float>(), size_t(s.numel) * 4);
      TensorImpl& impl = s.param.impl();
      impl.storage = params.impl().storage;
      impl.offset = s.offset;
      impl.strides = contiguous_strides(impl.shape);
    }
  }

  void make_buckets() {
    const int64_t per_bucket = std::max<int64_t>(1, options.bucket_bytes / 4);
    for (Segment& s : segments) {
      if (buckets.empty() || buckets.back().end - buckets.back().begin >= per_bucket) {
        buckets.emplace_back();
        buckets.back().begin = buckets.back().end = s.offset;
      }
      buckets.back().end = s.offset + s.numel;
      s.bucket = buckets.size() - 1;
    }
  }

  // Elements of flat range [b, e) that rank k owns (ZeRO 2).
  int64_t owned(int64_t b, int64_t e, int k) const {
    return std::max<int64_t>(0, std::min(e, shard_begin(n, k + 1, world)) - std::max(b, shard_begin(n, k, world)));
  }

  float* grad_slot(const Segment& s) {
    Bucket& b = buckets[s.bucket];
    if (options.zero < 2) return grads.data<float>() + s.offset;
    if (!b.staging.defined()) b.staging = Tensor::empty({b.end - b.begin}, DType::f32, device);
    return b.staging.data<float>() + (s.offset - b.begin);
  }

  void on_grad_ready(size_t i) {
    if (!armed || delivered[i]) return;
    delivered[i] = true;
    Segment& s = segments[i];
    Tensor g = s.param.grad();
    float* slot = grad_slot(s);
    if (g.defined()) backend().copy_on_device(slot, g.contiguous().data<float>(), size_t(s.numel) * 4);
    else backend().fill(slot, s.numel, 0.0f);
    s.param.zero_grad();  // the bucket holds it now
    Bucket& b = buckets[s.bucket];
    if (--b.pending == 0) launch(b);
  }

  void launch(Bucket& b) {
    if (options.zero < 2) {
      b.work = group.all_reduce(std::span<float>(grads.data<float>() + b.begin, size_t(b.end - b.begin)));
      return;
    }
    std::vector<int64_t> counts(static_cast<size_t>(world));
    for (int k = 0; k < world; ++k) counts[size_t(k)] = owned(b.begin, b.end, k);
    const int64_t mine_begin = std::max(b.begin, lo);
    float* out = grad_shard.data<float>() + (mine_begin - lo);
    b.work = group.reduce_scatter(std::span<const float>(b.staging.data<float>(), size_t(b.end - b.begin)),
                                  std::span<float>(out, size_t(counts[size_t(rank)])), counts);
  }

  void begin_sync() {
    for (Bucket& b : buckets) b.pending = 0;
    for (Segment& s : segments) ++buckets[s.bucket].pending;
    delivered.assign(segments.size(), false);
    armed = true;
    backward_start = Clock::now();
  }

  void end_sync() {
    TUTTI_CHECK(armed, "end_sync() without begin_sync()");
    const auto t0 = Clock::now();
    stats.backward_seconds = std::chrono::duration<double>(t0 - backward_start).count();
    // Parameters whose hook did not fire (no part in this backward): their gradient so far or
    // zeros, in flat order, which is the same on every rank.
    for (size_t i = 0; i < segments.size(); ++i)
      if (!delivered[i]) on_grad_ready(i);
    for (Bucket& b : buckets) {
      b.work->wait();
      b.work.reset();
      b.staging = Tensor();
    }
    armed = false;
    stats.exposed_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    // The buffers hold the group's sum: grad_squares and step divide by the group size, which
    // saves a pass over every gradient.
    if (options.zero < 2)
      for (Segment& s : segments) s.param.set_grad(grads.slice(0, s.offset, s.offset + s.numel).view(s.param.shape()));
  }

  double grad_squares(const std::function<bool(const std::string&)>& counted) {
    if (options.zero == 0 && rank != 0) return 0.0;  // every rank holds the same; rank 0 counts it
    const float* g = shard_grads();
    const double mean = 1.0 / (double(world) * double(world));  // the buffers hold the sum
    if (!counted) return backend().sum_squares(g, hi - lo) * mean;
    // One reduction per run of adjacent counted segments, not one per parameter: on a GPU each
    // is a wait for the device (148 of them per GPT-2 step held the GPU idle for milliseconds).
    double total = 0.0;
    int64_t run_begin = 0, run_end = 0;
    auto flush = [&] {
      if (run_begin < run_end) total += backend().sum_squares(g + (run_begin - lo), run_end - run_begin);
      run_begin = run_end = 0;
    };
    for (const Segment& seg : segments) {
      const int64_t b = std::max(seg.offset, lo), e = std::min(seg.offset + seg.numel, hi);
      if (b >= e || !counted(seg.name)) continue;
      if (b != run_end) flush();
      if (run_begin == run_end) run_begin = b;
      run_end = e;
    }
    flush();
    return total * mean;
  }

  const float* shard_grads() const {
    return options.zero < 2 ? grads.data<float>() + lo : grad_shard.data<float>();
  }

  void step(float lr, float grad_scale) {
    NoGradGuard no_grad;
    ++t;
    const AdamWStep s = optim::adamw_step(adamw, t, lr, grad_scale / static_cast<float>(world));  // sum -> mean
    const float* g = shard_grads();
    // Where this rank updates every parameter, the bf16 compute copies are written in the same pass
    // (one launch on CUDA); otherwise they are refreshed after the shards are gathered.
    const bool whole = lo == 0 && hi == n;
    std::unordered_map<const TensorImpl*, BFloat16*> copy_of;  // by the parameter itself
    bool copies_written = whole;
    if (whole)
      for (const auto& [weight, copy] : model.compute_copies()) {
        // Two copies of one weight, or one not written yet: the refresh below rounds them all.
        copies_written = copies_written && copy.defined() && !copy_of.count(&weight.impl());
        if (copy.defined()) copy_of[&weight.impl()] = static_cast<BFloat16*>(copy.raw_data());
      }
    std::vector<AdamWTensor> tensors;
    for (const Segment& seg : segments) {
      const int64_t b = std::max(seg.offset, lo), e = std::min(seg.offset + seg.numel, hi);
      if (b >= e) continue;
      auto copy = copy_of.find(&seg.param.impl());
      tensors.push_back({params.data<float>() + b, g + (b - lo), exp_avg.data<float>() + (b - lo),
                         exp_avg_sq.data<float>() + (b - lo), e - b, seg.decay,
                         copy == copy_of.end() ? nullptr : copy->second});
      if (copy != copy_of.end()) copy_of.erase(copy);
    }
    backend().adamw(tensors, s);
    if (options.zero > 0 && world > 1) gather_shards(params);
    // once per step, not once per use; not at all where the update wrote every copy
    if (!copies_written || !copy_of.empty()) model.refresh_compute_copies();
  }

  // Every rank's shard of `full` (N) to every rank.
  void gather_shards(Tensor& full) {
    std::vector<int64_t> counts(static_cast<size_t>(world));
    for (int k = 0; k < world; ++k) counts[size_t(k)] = shard_begin(n, k + 1, world) - shard_begin(n, k, world);
    // In place: this rank's input is its own slice of the output.
    group.all_gather(std::span<const float>(full.data<float>() + lo, size_t(hi - lo)),
                     std::span<float>(full.data<float>(), size_t(n)), counts)->wait();
  }

  // The full (N) vector of a sharded optimizer moment.
  Tensor full_moment(const Tensor& shard) {
    if (lo == 0 && hi == n) return shard;
    Tensor full = Tensor::zeros({n}, DType::f32, device);
    backend().copy_on_device(full.data<float>() + lo, shard.data<float>(), size_t(hi - lo) * 4);
    gather_shards(full);
    return full;
  }
};

DataParallel::DataParallel(nn::Module& model, comm::Communicator& group, const optim::AdamWOptions& adamw,
                           const DataParallelOptions& options)
    : impl_(std::make_unique<Impl>(model, group, adamw, options)) {}
DataParallel::~DataParallel() = default;

void DataParallel::begin_sync() { impl_->begin_sync(); }
void DataParallel::end_sync() { impl_->end_sync(); }
double DataParallel::grad_squares(const std::function<bool(const std::string&)>& counted) {
  return impl_->grad_squares(counted);
}
void DataParallel::step(float lr, float grad_scale) { impl_->step(lr, grad_scale); }
void DataParallel::zero_grad() {
  for (Segment& s : impl_->segments) s.param.zero_grad();
}
int64_t DataParallel::steps_taken() const { return impl_->t; }
const CommStats& DataParallel::last_stats() const { return impl_->stats; }
int64_t DataParallel::num_buckets() const { return static_cast<int64_t>(impl_->buckets.size()); }

MemoryReport DataParallel::memory() const {
  const Impl& d = *impl_;
  MemoryReport m;
  m.parameter_bytes = d.n * 4;
  m.gradient_bytes = (d.options.zero < 2 ? d.n : d.hi - d.lo) * 4;
  m.optimizer_bytes = 2 * (d.hi - d.lo) * 4;
  if (d.options.zero == 2)
    for (const Bucket& b : d.buckets) m.bucket_bytes = std::max(m.bucket_bytes, (b.end - b.begin) * 4);
  return m;
}

std::vector<std::pair<std::string, Tensor>> DataParallel::optimizer_state() {
  Impl& d = *impl_;
  Tensor m = d.full_moment(d.exp_avg), v = d.full_moment(d.exp_avg_sq);
  std::vector<std::pair<std::string, Tensor>> out;
  // Registration order, as optim::AdamW writes it.
  for (auto it = d.segments.rbegin(); it != d.segments.rend(); ++it) {
    const Shape& shape = it->param.shape();
    out.emplace_back(it->name + ".exp_avg", m.slice(0, it->offset, it->offset + it->numel).clone().view(shape));
    out.emplace_back(it->name + ".exp_avg_sq", v.slice(0, it->offset, it->offset + it->numel).clone().view(shape));
  }
  return out;
}

void DataParallel::load_optimizer_state(const std::vector<std::pair<std::string, Tensor>>& state,
                                        int64_t steps_taken) {
  Impl& d = *impl_;
  TUTTI_CHECK_AS(CheckpointError, steps_taken >= 0, "optimizer step count ", steps_taken, " is negative");
  TUTTI_CHECK_AS(CheckpointError, state.size() == 2 * d.segments.size(), "optimizer state has ", state.size(),
                 " tensors, expected ", 2 * d.segments.size());
  auto find = [&](const std::string& name, const Segment& s) {
    for (const auto& [n, t] : state) {
      if (n != name) continue;
      TUTTI_CHECK_AS(CheckpointError, t.shape() == s.param.shape() && t.dtype() == DType::f32, "optimizer state '",
                     name, "' is ", t.str(), ", expected f32", s.param.shape().str());
      return t.contiguous();
    }
    TUTTI_FAIL(CheckpointError, "optimizer state '", name, "' is missing");
  };
  std::vector<std::pair<Tensor, Tensor>> found;  // everything checked before anything changes
  for (const Segment& s : d.segments) found.emplace_back(find(s.name + ".exp_avg", s), find(s.name + ".exp_avg_sq", s));
  for (size_t i = 0; i < d.segments.size(); ++i) {
    const Segment& s = d.segments[i];
    const int64_t b = std::max(s.offset, d.lo), e = std::min(s.offset + s.numel, d.hi);
    if (b >= e) continue;
    Tensor m = found[i].first.to(d.device), v = found[i].second.to(d.device);
    d.backend().copy_on_device(d.exp_avg.data<float>() + (b - d.lo), m.data<float>() + (b - s.offset), size_t(e - b) * 4);
    d.backend().copy_on_device(d.exp_avg_sq.data<float>() + (b - d.lo), v.data<float>() + (b - s.offset),
                               size_t(e - b) * 4);
  }
  d.t = steps_taken;
  d.model.refresh_compute_copies();  // the weights were loaded with this state
}

}  // namespace tutti::parallel
