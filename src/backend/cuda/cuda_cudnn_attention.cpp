// cuDNN's fused flash attention through its backend API (no cudnn_frontend here). cuDNN recognises
// attention as a graph of matrix products, pointwise ops and row reductions and runs the whole
// graph as one fused kernel; this file writes those graphs for causal attention:
//   forward:  S = scale Q K^T, causal mask (-inf above the diagonal), M = rowmax S,
//             E = exp(S - M), L = rowsum E, lse = M + ln L, P = E / L (bf16), y = P V;
//   backward: Dv = rowsum(dy o y), P = exp(masked scale Q K^T - lse), dV = P^T dy,
//             dS = scale P o (dy V^T - Dv), dK = dS^T Q, dQ = dS K (fp32, then rounded).
// Q, K and V are strided views of the packed qkv (no copies): K^T and V^T are K and V with their
// last two dimensions' sizes and strides exchanged. The backward's row sums Dv and its fp32 dQ go
// to the caller's workspace ahead of cuDNN's own. All tensors are 4-D (b, h, t, d).
#include "backend/cuda/cuda_cudnn_attention.hpp"

#include <cudnn.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "tutti/core/error.hpp"

namespace tutti::cuda {
namespace {

using Dims = std::array<int64_t, 4>;

std::string status_text(cudnnStatus_t status) {
  char last[512] = {0};
  cudnnGetLastErrorString(last, sizeof(last));
  return std::string(cudnnGetErrorString(status)) + (last[0] != '\0' ? std::string(": ") + last : std::string());
}

void check(cudnnStatus_t status, const char* what) {
  if (status != CUDNN_STATUS_SUCCESS) TUTTI_FAIL(Error, "cuDNN: ", what, " failed: ", status_text(status));
}

// An owned backend descriptor.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) { check(cudnnBackendCreateDescriptor(type, &d_), "create"); }
  ~Desc() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }
  template <class V>
  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const V* values, int64_t count = 1) {
    check(cudnnBackendSetAttribute(d_, name, type, count, values), "set attribute");
    return *this;
  }
  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendDescriptor_t value) {
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &value);
  }
  Desc& set(cudnnBackendAttributeName_t name, cudnnDataType_t value) { return set(name, CUDNN_TYPE_DATA_TYPE, &value); }
  cudnnStatus_t try_finalize() { return cudnnBackendFinalize(d_); }
  Desc& finalize(const char* what) {
    check(try_finalize(), what);
    return *this;
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

Dims packed_strides(const Dims& d) { return {d[1] * d[2] * d[3], d[2] * d[3], d[3], 1}; }
Dims transposed(const Dims& d) { return {d[0], d[1], d[3], d[2]}; }  // the last two exchanged

// By-value scalars (host floats read at execution) and the fixed ids of the real tensors.
enum Uid : int64_t { kQ = 1, kKt, kVt, kV, kO, kStats, kDo, kDq, kDk, kDv, kDvec, kDqAcc, kScale, kNegInf, kOne };

}  // namespace

// A built graph: every descriptor it references (cuDNN keeps pointers to them) and its plan.
struct CudnnAttention::Plan {
  std::vector<std::unique_ptr<Desc>> keep;
  Desc* plan = nullptr;
  int64_t workspace = 0;
  int64_t next_virtual = 1000;

  cudnnBackendDescriptor_t add(std::unique_ptr<Desc> d) {
    keep.push_back(std::move(d));
    return keep.back()->get();
  }
  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t type, const Dims& dims, const Dims& strides,
                                  bool is_virtual = false, bool by_value = false) {
    auto d = std::make_unique<Desc>(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t alignment = 16;
    const bool yes = true;
    d->set(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims.data(), 4)
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.data(), 4)
        .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, &uid)
        .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, &alignment);
    if (is_virtual) d->set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, &yes);
    if (by_value) d->set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, &yes);
    d->finalize("tensor");
    return add(std::move(d));
  }
  cudnnBackendDescriptor_t scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }
  cudnnBackendDescriptor_t temp(const Dims& dims, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    return tensor(next_virtual++, type, dims, packed_strides(dims), true);
  }
  cudnnBackendDescriptor_t temp(const Dims& dims, const Dims& strides, cudnnDataType_t type) {
    return tensor(next_virtual++, type, dims, strides, true);
  }

  std::vector<cudnnBackendDescriptor_t> ops;
  // y = mode(x[, b[, t]]); GEN_INDEX along axis.
  void pointwise(cudnnPointwiseMode_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y,
                 cudnnBackendDescriptor_t b = nullptr, cudnnBackendDescriptor_t t = nullptr,
                 cudnnDataType_t prec = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    auto pw = std::make_unique<Desc>(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw->set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, &mode).set(CUDNN_ATTR_POINTWISE_MATH_PREC, prec);
    if (axis >= 0) pw->set(CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, &axis);
    pw->finalize("pointwise");
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    const float one = 1.0f;
    op->set(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw->get())
        .set(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, &one)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, &one);
    if (b != nullptr) op->set(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t != nullptr) op->set(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    op->finalize("pointwise operation");
    add(std::move(pw));
    ops.push_back(add(std::move(op)));
  }
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    auto mm = std::make_unique<Desc>(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm->set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize("matmul");
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op->set(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .set(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .set(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .set(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm->get())
        .finalize("matmul operation");
    add(std::move(mm));
    ops.push_back(add(std::move(op)));
  }
  // y (the rows of x, last dimension 1) = max or sum of each row.
  void reduce(cudnnReduceTensorOp_t op_type, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    auto r = std::make_unique<Desc>(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    r->set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, &op_type)
        .set(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .finalize("reduction");
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op->set(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .set(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .set(CUDNN_ATTR_OPERATION_REDUCTION_DESC, r->get())
        .finalize("reduction operation");
    add(std::move(r));
    ops.push_back(add(std::move(op)));
  }
  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    auto op = std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op->set(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x).set(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y).finalize("reshape");
    ops.push_back(add(std::move(op)));
  }
  // The causal mask of scores s: entries above the diagonal (key > query) become -inf.
  cudnnBackendDescriptor_t causal(cudnnBackendDescriptor_t s, const Dims& score, cudnnBackendDescriptor_t neg_inf) {
    const auto row = temp(score, CUDNN_DATA_INT32), col = temp(score, CUDNN_DATA_INT32);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, s, row, nullptr, nullptr, CUDNN_DATA_FLOAT, 2);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, s, col, nullptr, nullptr, CUDNN_DATA_FLOAT, 3);
    const auto keep = temp(score, CUDNN_DATA_BOOLEAN);
    pointwise(CUDNN_POINTWISE_CMP_GE, row, keep, col, nullptr, CUDNN_DATA_BOOLEAN);
    const auto masked = temp(score);
    pointwise(CUDNN_POINTWISE_BINARY_SELECT, s, masked, neg_inf, keep);
    return masked;
  }

  // The graph of ops, cuDNN's engines for it in the order of its heuristic, the first that builds.
  // An empty string when planned, else why not.
  std::string build(cudnnHandle_t handle) {
    auto graph = std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    graph->set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, ops.data(),
               static_cast<int64_t>(ops.size()))
        .set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, &handle);
    cudnnStatus_t st = graph->try_finalize();
    if (st != CUDNN_STATUS_SUCCESS) return "operation graph: " + status_text(st);
    const cudnnBackendDescriptor_t g = add(std::move(graph));
    std::string why = "no engine";
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      auto heur = std::make_unique<Desc>(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
      heur->set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, g).set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, &mode);
      if ((st = heur->try_finalize()) != CUDNN_STATUS_SUCCESS) {
        why = "heuristics: " + status_text(st);
        continue;
      }
      int64_t count = 0;
      cudnnBackendGetAttribute(heur->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                               nullptr);
      std::vector<std::unique_ptr<Desc>> configs;
      std::vector<cudnnBackendDescriptor_t> raw;
      for (int64_t i = 0; i < count; ++i) {
        configs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
        raw.push_back(configs.back()->get());
      }
      int64_t returned = 0;
      if (count > 0 && cudnnBackendGetAttribute(heur->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned,
                                                raw.data()) != CUDNN_STATUS_SUCCESS)
        returned = 0;
      for (int64_t i = 0; i < returned; ++i) {
        auto p = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        p->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, &handle)
            .set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, raw[i]);
        if ((st = p->try_finalize()) != CUDNN_STATUS_SUCCESS) {
          why = "execution plan: " + status_text(st);
          continue;
        }
        int64_t n = 0;
        check(cudnnBackendGetAttribute(p->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n,
                                       &workspace),
              "workspace size");
        add(std::move(heur));
        for (auto& c : configs) add(std::move(c));
        plan = p.get();
        add(std::move(p));
        return {};
      }
    }
    return why;
  }

  void execute(cudnnHandle_t handle, const std::vector<std::pair<int64_t, void*>>& pointers, void* workspace_ptr) const {
    std::vector<int64_t> uids;
    std::vector<void*> data;
    for (const auto& [uid, p] : pointers) {
      uids.push_back(uid);
      data.push_back(p);
    }
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.data(), static_cast<int64_t>(uids.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, data.data(), static_cast<int64_t>(data.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, &workspace_ptr)
        .finalize("variant pack");
    check(cudnnBackendExecute(handle, plan->get(), pack.get()), "execute");
  }
};

struct CudnnAttention::Plans {
  Plan forward, backward;
  size_t dq_bytes = 0, dvec_bytes = 0;  // the backward's fp32 dQ and row sums, ahead of cuDNN's workspace
};

namespace {

// Where Q, K^T, V (and the backward's V^T) of the packed (B, T, 3C) qkv lie, and y's (B, T, C).
struct Layout {
  Dims q, kt, y, score, rows;
  Dims q_strides, kt_strides, y_strides;
  Layout(int64_t B, int64_t T, int64_t C, int64_t H) {
    const int64_t D = C / H;
    q = {B, H, T, D};
    kt = transposed(q);
    y = q;
    score = {B, H, T, T};
    rows = {B, H, T, 1};
    q_strides = {T * 3 * C, D, 3 * C, 1};
    kt_strides = {T * 3 * C, D, 1, 3 * C};
    y_strides = {T * C, D, C, 1};
  }
};

const float kOneValue = 1.0f;
const float kNegInfValue = -std::numeric_limits<float>::infinity();

}  // namespace

CudnnAttention::CudnnAttention(cudaStream_t stream) {
  cudnnHandle_t h = nullptr;
  check(cudnnCreate(&h), "cudnnCreate");
  handle_ = h;
  const cudnnStatus_t st = cudnnSetStream(h, stream);
  if (st != CUDNN_STATUS_SUCCESS) {
    cudnnDestroy(h);
    check(st, "cudnnSetStream");
  }
}

CudnnAttention::~CudnnAttention() {
  plans_.clear();
  cudnnDestroy(static_cast<cudnnHandle_t>(handle_));
}

const CudnnAttention::Plans* CudnnAttention::plans(int64_t B, int64_t T, int64_t C, int64_t H) {
  std::lock_guard lock(mutex_);
  const Shape shape{B, T, C, H};
  auto it = plans_.find(shape);
  if (it != plans_.end()) return it->second.get();
  auto handle = static_cast<cudnnHandle_t>(handle_);
  auto made = std::make_unique<Plans>();
  const Layout l(B, T, C, H);
  std::string why;
  // Head sizes cuDNN fuses on Hopper; T a multiple of 128 (cuDNN up to 9.15 needed a padding mask
  // in the backward otherwise).
  if (H <= 0 || C % H != 0 || (C / H) % 8 != 0 || C / H > 128 || T % 128 != 0) {
    why = "head size " + std::to_string(H > 0 ? C / H : 0) + ", T " + std::to_string(T) +
          ": tutti plans cuDNN's attention for head sizes a multiple of 8 up to 128 and T a multiple of 128";
  } else {
    {  // forward
      Plan& p = made->forward;
      const auto q = p.tensor(kQ, CUDNN_DATA_BFLOAT16, l.q, l.q_strides);
      const auto kt = p.tensor(kKt, CUDNN_DATA_BFLOAT16, l.kt, l.kt_strides);
      const auto v = p.tensor(kV, CUDNN_DATA_BFLOAT16, l.q, l.q_strides);
      const auto o = p.tensor(kO, CUDNN_DATA_BFLOAT16, l.y, l.y_strides);
      const auto stats = p.tensor(kStats, CUDNN_DATA_FLOAT, l.rows, packed_strides(l.rows));
      const auto scale = p.scalar(kScale), neg_inf = p.scalar(kNegInf);
      const auto s = p.temp(l.score), s1 = p.temp(l.score);
      p.matmul(q, kt, s);
      p.pointwise(CUDNN_POINTWISE_MUL, s, s1, scale);
      const auto s2 = p.causal(s1, l.score, neg_inf);
      const auto m = p.temp(l.rows), z = p.temp(l.score), e = p.temp(l.score), sum = p.temp(l.rows);
      const auto log_sum = p.temp(l.rows), prob = p.temp(l.score, CUDNN_DATA_BFLOAT16);
      p.reduce(CUDNN_REDUCE_TENSOR_MAX, s2, m);
      p.pointwise(CUDNN_POINTWISE_SUB, s2, z, m);
      p.pointwise(CUDNN_POINTWISE_EXP, z, e);
      p.reduce(CUDNN_REDUCE_TENSOR_ADD, e, sum);
      p.pointwise(CUDNN_POINTWISE_LOG, sum, log_sum);
      p.pointwise(CUDNN_POINTWISE_ADD, m, stats, log_sum);
      p.pointwise(CUDNN_POINTWISE_DIV, e, prob, sum);
      p.matmul(prob, v, o);
      why = p.build(handle);
      if (!why.empty()) why = "forward: " + why;
    }
    if (why.empty()) {  // backward
      Plan& p = made->backward;
      const Dims score_t_strides{l.score[1] * T * T, T * T, 1, T};  // (b, h, key, query) of a (b, h, query, key)
      const auto q = p.tensor(kQ, CUDNN_DATA_BFLOAT16, l.q, l.q_strides);
      const auto kt = p.tensor(kKt, CUDNN_DATA_BFLOAT16, l.kt, l.kt_strides);
      const auto vt = p.tensor(kVt, CUDNN_DATA_BFLOAT16, l.kt, l.kt_strides);
      const auto o = p.tensor(kO, CUDNN_DATA_BFLOAT16, l.y, l.y_strides);
      const auto d_o = p.tensor(kDo, CUDNN_DATA_BFLOAT16, l.y, l.y_strides);
      const auto stats = p.tensor(kStats, CUDNN_DATA_FLOAT, l.rows, packed_strides(l.rows));
      const auto dq = p.tensor(kDq, CUDNN_DATA_BFLOAT16, l.q, l.q_strides);
      const auto dk = p.tensor(kDk, CUDNN_DATA_BFLOAT16, l.q, l.q_strides);
      const auto dv = p.tensor(kDv, CUDNN_DATA_BFLOAT16, l.q, l.q_strides);
      const auto dvec = p.tensor(kDvec, CUDNN_DATA_FLOAT, l.rows, packed_strides(l.rows));
      const auto dq_acc = p.tensor(kDqAcc, CUDNN_DATA_FLOAT, l.q, packed_strides(l.q));
      const auto scale = p.scalar(kScale), neg_inf = p.scalar(kNegInf), one = p.scalar(kOne);
      // Dv = rowsum(dy o y)
      const auto dyy = p.temp(l.y), dyy_sum = p.temp(l.rows);
      p.pointwise(CUDNN_POINTWISE_MUL, d_o, dyy, o);
      p.reduce(CUDNN_REDUCE_TENSOR_ADD, dyy, dyy_sum);
      p.pointwise(CUDNN_POINTWISE_MUL, dyy_sum, dvec, one);
      // P = exp(mask(scale Q K^T - lse))
      const auto s = p.temp(l.score), s1 = p.temp(l.score), s2 = p.temp(l.score);
      p.matmul(q, kt, s);
      p.pointwise(CUDNN_POINTWISE_MUL, s, s1, scale);
      p.pointwise(CUDNN_POINTWISE_SUB, s1, s2, stats);
      const auto s3 = p.causal(s2, l.score, neg_inf);
      const auto prob = p.temp(l.score);
      p.pointwise(CUDNN_POINTWISE_EXP, s3, prob);
      // dV = P^T dy
      const auto prob_t = p.temp(transposed(l.score), score_t_strides, CUDNN_DATA_BFLOAT16);
      p.reshape(prob, prob_t);
      p.matmul(prob_t, d_o, dv);
      // dS = scale P o (dy V^T - Dv)
      const auto dp = p.temp(l.score), t = p.temp(l.score), ds0 = p.temp(l.score), ds = p.temp(l.score);
      p.matmul(d_o, vt, dp);
      p.pointwise(CUDNN_POINTWISE_SUB, dp, t, dvec);
      p.pointwise(CUDNN_POINTWISE_MUL, t, ds0, prob);
      p.pointwise(CUDNN_POINTWISE_MUL, ds0, ds, scale);
      // dK = dS^T Q
      const auto ds_t = p.temp(transposed(l.score), score_t_strides, CUDNN_DATA_BFLOAT16);
      p.reshape(ds, ds_t);
      p.matmul(ds_t, q, dk);
      // dQ = dS K, in fp32, then rounded
      const auto k = p.temp(l.q, l.q_strides, CUDNN_DATA_FLOAT);
      p.reshape(kt, k);
      p.matmul(ds, k, dq_acc);
      p.pointwise(CUDNN_POINTWISE_IDENTITY, dq_acc, dq);
      why = p.build(handle);
      if (!why.empty()) why = "backward: " + why;
      made->dq_bytes = static_cast<size_t>(B * H * T * (C / H)) * sizeof(float);
      made->dvec_bytes = static_cast<size_t>(B * H * T) * sizeof(float);
    }
  }
  if (!why.empty()) {
    why_not_ = why;
    made.reset();
  }
  return plans_.emplace(shape, std::move(made)).first->second.get();
}

bool CudnnAttention::supports(int64_t B, int64_t T, int64_t C, int64_t H) { return plans(B, T, C, H) != nullptr; }

namespace {
size_t aligned256(size_t bytes) { return (bytes + 255) / 256 * 256; }
}  // namespace

size_t CudnnAttention::workspace_bytes(int64_t B, int64_t T, int64_t C, int64_t H) {
  const Plans* p = plans(B, T, C, H);
  TUTTI_CHECK(p != nullptr, "cuDNN attention: no plan for B ", B, " T ", T, " C ", C, " H ", H);
  return std::max(static_cast<size_t>(p->forward.workspace),
                  aligned256(p->dq_bytes) + aligned256(p->dvec_bytes) + static_cast<size_t>(p->backward.workspace));
}

void CudnnAttention::forward(const uint16_t* qkv, uint16_t* y, float* lse, int64_t B, int64_t T, int64_t C, int64_t H,
                             void* workspace) {
  const Plans* p = plans(B, T, C, H);
  TUTTI_CHECK(p != nullptr, "cuDNN attention: no plan for B ", B, " T ", T, " C ", C, " H ", H);
  const float scale = 1.0f / std::sqrt(static_cast<float>(C / H));
  auto* base = const_cast<uint16_t*>(qkv);
  p->forward.execute(static_cast<cudnnHandle_t>(handle_),
                     {{kQ, base},
                      {kKt, base + C},
                      {kV, base + 2 * C},
                      {kO, y},
                      {kStats, lse},
                      {kScale, const_cast<float*>(&scale)},
                      {kNegInf, const_cast<float*>(&kNegInfValue)}},
                     workspace);
}

void CudnnAttention::backward(const uint16_t* qkv, const uint16_t* y, const float* lse, const uint16_t* dy,
                              uint16_t* dqkv, int64_t B, int64_t T, int64_t C, int64_t H, void* workspace) {
  const Plans* p = plans(B, T, C, H);
  TUTTI_CHECK(p != nullptr, "cuDNN attention: no plan for B ", B, " T ", T, " C ", C, " H ", H);
  const float scale = 1.0f / std::sqrt(static_cast<float>(C / H));
  auto* base = const_cast<uint16_t*>(qkv);
  auto* ws = static_cast<char*>(workspace);
  void* dq_acc = ws;
  void* dvec = ws + aligned256(p->dq_bytes);
  void* rest = ws + aligned256(p->dq_bytes) + aligned256(p->dvec_bytes);
  p->backward.execute(static_cast<cudnnHandle_t>(handle_),
                      {{kQ, base},
                       {kKt, base + C},
                       {kVt, base + 2 * C},
                       {kO, const_cast<uint16_t*>(y)},
                       {kDo, const_cast<uint16_t*>(dy)},
                       {kStats, const_cast<float*>(lse)},
                       {kDq, dqkv},
                       {kDk, dqkv + C},
                       {kDv, dqkv + 2 * C},
                       {kDvec, dvec},
                       {kDqAcc, dq_acc},
                       {kScale, const_cast<float*>(&scale)},
                       {kNegInf, const_cast<float*>(&kNegInfValue)},
                       {kOne, const_cast<float*>(&kOneValue)}},
                      rest);
}

}  // namespace tutti::cuda
