// The op set: validation, output allocation, the kernel call, and the backward rule, one op per
// section. Kernels come from the backend of the inputs' device.
#include "tutti/ops/ops.hpp"

#include <functional>

#include "backend/backend.hpp"
#include "ops/op_table.hpp"
#include "tutti/autograd/node.hpp"

namespace tutti::ops {
namespace {

// A tape node whose backward rule is a closure over what the forward saved; a RuleInto may add
// into other consumers' pending gradients (Node::backward_into).
class FnNode final : public Node {
 public:
  using Rule = std::function<std::vector<Tensor>(const Tensor&)>;
  using RuleInto = std::function<std::vector<Tensor>(const Tensor&, const std::vector<Tensor*>&)>;
  FnNode(OpKind kind, std::vector<Tensor> inputs, Rule rule)
      : Node(std::move(inputs)), kind_(kind), rule_(std::move(rule)) {}
  FnNode(OpKind kind, std::vector<Tensor> inputs, RuleInto rule)
      : Node(std::move(inputs)), kind_(kind), rule_into_(std::move(rule)) {}
  // Freeing a graph frees node -> input tensor -> its node -> ... recursively, several stack
  // frames per op: a chain of ~20k ops (debug build) or ~200k (release) overflowed the stack.
  // Nodes that only this one still reaches go to the outermost teardown's list, freed in a loop.
  ~FnNode() override {
    thread_local std::vector<std::shared_ptr<Node>>* outer_list = nullptr;
    rule_ = nullptr;  // drop the saved tensors first: they may hold the inputs a second time
    rule_into_ = nullptr;
    std::vector<std::shared_ptr<Node>> orphans;
    std::vector<std::shared_ptr<Node>>& list = outer_list ? *outer_list : orphans;
    for (const Tensor& t : inputs())
      if (t.defined() && t.impl_ptr().use_count() == 1 && t.impl().grad_fn.use_count() == 1)
        list.push_back(std::move(t.impl().grad_fn));  // that input dies with this node anyway
    if (outer_list) return;
    outer_list = &orphans;
    while (!orphans.empty()) {
      std::shared_ptr<Node> next = std::move(orphans.back());
      orphans.pop_back();
      next.reset();  // may append its own orphans
    }
    outer_list = nullptr;
  }
  const char* name() const override { return op_name(kind_); }
  std::vector<Tensor> backward(const Tensor& grad_output) override {
    return rule_ ? rule_(grad_output) : rule_into_(grad_output, std::vector<Tensor*>(inputs().size(), nullptr));
  }
  bool accumulates_into() const override { return static_cast<bool>(rule_into_); }
  std::vector<Tensor> backward_into(const Tensor& grad_output, const std::vector<Tensor*>& into) override {
    return rule_into_(grad_output, into);
  }

 private:
  OpKind kind_;
  Rule rule_;
  RuleInto rule_into_;
};

Tensor record_op(Tensor out, OpKind kind, std::vector<Tensor> inputs, FnNode::Rule rule) {
  return record(std::move(out), std::make_shared<FnNode>(kind, std::move(inputs), std::move(rule)));
}
Tensor record_op_into(Tensor out, OpKind kind, std::vector<Tensor> inputs, FnNode::RuleInto rule) {
  return record(std::move(out), std::make_shared<FnNode>(kind, std::move(inputs), std::move(rule)));
}

Backend& backend_of(const Tensor& t) { return backend_for(t.device()); }
float* f32(const Tensor& t) { return t.data<float>(); }
const int32_t* i32(const Tensor& t) { return t.data<int32_t>(); }
BFloat16* bf16(const Tensor& t) {
  TUTTI_CHECK(t.dtype() == DType::bf16, "expected a bf16 tensor, got ", t.str());
  return static_cast<BFloat16*>(t.raw_data());
}

void check_f32(const Tensor& t, const char* op, const char* what) {
  TUTTI_CHECK_AS(InvalidArgument, t.defined(), op, ": ", what, " is undefined");
  TUTTI_CHECK_AS(InvalidArgument, t.dtype() == DType::f32, op, ": ", what, " must be f32, got ", t.str());
}
// An activation a product reads: f32, or already rounded to bf16 where the product is mixed.
void check_operand(const Tensor& t, bool mixed, const char* op, const char* what) {
  if (mixed && t.defined() && t.dtype() == DType::bf16) return;
  check_f32(t, op, what);
}
void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  TUTTI_CHECK_AS(InvalidArgument, a.device() == b.device(), op, ": tensors on different devices: ", a.str(), " and ",
                 b.str());
}
Tensor new_like(const Tensor& t, const Shape& shape) { return Tensor::empty(shape, DType::f32, t.device()); }

// ------------------------------------------------------------------------------------------
// GEMM on tensors: C (beta)= op(A) op(B) for 2-D or batched 3-D operands.
struct MatShape {
  int64_t batch, rows, cols;  // of op(X)
};
MatShape mat_shape(const Tensor& t, bool trans) {
  const int nd = t.ndim();
  const int64_t r = t.size(-2), c = t.size(-1);
  return {nd == 3 ? t.size(0) : 1, trans ? c : r, trans ? r : c};
}

template <class T>
GemmOf<T> gemm_of(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c, float beta, const T* pa,
                  const T* pb) {
  const MatShape sa = mat_shape(a, ta), sb = mat_shape(b, tb);
  GemmOf<T> g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = sa.rows;
  g.n = sb.cols;
  g.k = sa.cols;
  g.beta = beta;
  g.a = pa;
  g.lda = a.size(-1);
  g.b = pb;
  g.ldb = b.size(-1);
  if (c.dtype() == DType::bf16) g.c_bf16 = bf16(c);  // bf16 operands only (the backend checks)
  else g.c = f32(c);
  g.ldc = c.size(-1);
  g.batch = std::max(sa.batch, sb.batch);
  g.stride_a = a.ndim() == 3 ? a.size(1) * a.size(2) : 0;
  g.stride_b = b.ndim() == 3 ? b.size(1) * b.size(2) : 0;
  g.stride_c = c.ndim() == 3 ? c.size(1) * c.size(2) : 0;
  return g;
}

// C from A and B of one dtype: f32, or bf16 (mixed precision, fp32 accumulation; C f32 or bf16).
void gemm_into(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c, float beta) {
  TUTTI_CHECK(a.dtype() == b.dtype(), "gemm operands of different dtypes: ", a.str(), " and ", b.str());
  if (a.dtype() == DType::bf16) backend_of(c).gemm_bf16(gemm_of(a, ta, b, tb, c, beta, bf16(a), bf16(b)));
  else backend_of(c).gemm(gemm_of<float>(a, ta, b, tb, c, beta, f32(a), f32(b)));
}

// A new C = op(A) op(B); out bf16 (bf16 operands only): C written rounded to bf16.
Tensor gemm_new(const Tensor& a, bool ta, const Tensor& b, bool tb, DType out = DType::f32) {
  const MatShape sa = mat_shape(a, ta), sb = mat_shape(b, tb);
  const int64_t batch = std::max(sa.batch, sb.batch);
  const Shape shape = (a.ndim() == 3 || b.ndim() == 3) ? Shape{batch, sa.rows, sb.cols} : Shape{sa.rows, sb.cols};
  Tensor c = Tensor::empty(shape, out, a.device());
  gemm_into(a, ta, b, tb, c, 0.0f);
  return c;
}

// Reduces a batched gradient to the shape of a 2-D operand that was broadcast over the batch.
Tensor unbroadcast_batch(const Tensor& g, const Shape& like) {
  if (g.ndim() == like.ndim()) return g;
  Tensor out = Tensor::zeros(like, DType::f32, g.device());
  const int64_t per = like.numel();
  for (int64_t i = 0; i < g.size(0); ++i) backend_of(g).axpy(1.0f, f32(g) + i * per, f32(out), per);
  return out;
}

// The bf16 copy of weight `w` for mixed precision, checked; undefined stays undefined (fp32).
const Tensor& checked_copy(const Tensor& copy, const Tensor& w, const char* op) {
  if (!copy.defined()) return copy;
  TUTTI_CHECK_AS(InvalidArgument, copy.dtype() == DType::bf16 && copy.shape() == w.shape() && copy.is_contiguous(),
                 op, ": the bf16 copy ", copy.str(), " does not match the weight ", w.str());
  check_same_device(copy, w, op);
  return copy;
}

}  // namespace

Tensor to_bf16(const Tensor& x_in) {
  if (x_in.defined() && x_in.dtype() == DType::bf16) return x_in.contiguous();  // rounded already
  check_f32(x_in, "to_bf16", "input");
  const Tensor x = x_in.contiguous();
  Tensor y = Tensor::empty(x.shape(), DType::bf16, x.device());
  if (x.numel()) backend_of(x).to_bf16(f32(x), bf16(y), x.numel());
  return y;
}

// ------------------------------------------------------------------------------------------
// matmul

Tensor matmul(const Tensor& a_in, const Tensor& b_in, bool ta, bool tb, const Tensor& b_bf16, DType out) {
  const bool mixed = checked_copy(b_bf16, b_in, "matmul").defined();
  check_operand(a_in, mixed, "matmul", "a");
  check_f32(b_in, "matmul", "b");
  TUTTI_CHECK_AS(InvalidArgument, out == DType::f32 || (out == DType::bf16 && mixed),
                 "matmul: a ", dtype_name(out), " result needs bf16 operands (a bf16 copy of b)");
  check_same_device(a_in, b_in, "matmul");
  TUTTI_CHECK_AS(InvalidArgument, (a_in.ndim() == 2 || a_in.ndim() == 3) && (b_in.ndim() == 2 || b_in.ndim() == 3),
                 "matmul needs 2-D or 3-D operands, got ", a_in.str(), " and ", b_in.str());
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const MatShape sa = mat_shape(a, ta), sb = mat_shape(b, tb);
  TUTTI_CHECK_AS(InvalidArgument, sa.cols == sb.rows, "matmul: inner sizes differ: ", a.str(), (ta ? "^T" : ""),
                 " x ", b.str(), (tb ? "^T" : ""));
  TUTTI_CHECK_AS(InvalidArgument, a.ndim() != 3 || b.ndim() != 3 || sa.batch == sb.batch,
                 "matmul: batch sizes differ: ", a.str(), " and ", b.str());
  const Tensor ac = mixed ? to_bf16(a) : a, bc = mixed ? b_bf16 : b;  // what the products read
  Tensor c = gemm_new(ac, ta, bc, tb, out);
  if (!any_requires_grad({&a_in, &b_in})) return c;
  const bool need_a = a_in.requires_grad(), need_b = b_in.requires_grad();
  const Shape a_shape = a.shape(), b_shape = b.shape();
  return record_op(c, OpKind::matmul, {a_in, b_in}, [=](const Tensor& g_in) {
    const Tensor g = mixed ? to_bf16(g_in) : g_in.contiguous();
    Tensor da, db;
    if (need_a) da = unbroadcast_batch(ta ? gemm_new(bc, tb, g, true) : gemm_new(g, false, bc, !tb), a_shape);
    if (need_b) db = unbroadcast_batch(tb ? gemm_new(g, true, ac, ta) : gemm_new(ac, !ta, g, false), b_shape);
    return std::vector<Tensor>{da, db};
  });
}

// ------------------------------------------------------------------------------------------
// linear: y = x W + b, and linear_gelu: y = gelu(x W + b)
//
// Where the backend fuses epilogues into its GEMM (CUDA through cuBLASLt), the bias add, the GELU
// and the bias gradient run inside the products; elsewhere (the CPU), or where it declines a
// case, they run as their own kernels, as before.

namespace {

// C = op(A) op(B) with epilogue `e` fused in, if the backend can; false: nothing was done.
bool gemm_epilogue_into(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c, GemmEpilogue e,
                        const void* bias, void* aux, float* bias_grad, const float* residual = nullptr) {
  if (a.dtype() == DType::bf16)
    return backend_of(c).gemm_epilogue_bf16({gemm_of(a, ta, b, tb, c, 0.0f, bf16(a), bf16(b)), e, bias, aux,
                                             bias_grad, residual});
  return backend_of(c).gemm_epilogue({gemm_of<float>(a, ta, b, tb, c, 0.0f, f32(a), f32(b)), e, bias, aux,
                                      bias_grad, residual});
}

// A residual added to a product's result: undefined, or fp32 of the result's shape on its device.
void check_residual(const Tensor& r, const Shape& shape, DType out, Device device, const char* op) {
  if (!r.defined()) return;
  check_f32(r, op, "residual");
  TUTTI_CHECK_AS(InvalidArgument, out == DType::f32, op, ": a residual needs an f32 result, not ", dtype_name(out));
  TUTTI_CHECK_AS(InvalidArgument, r.device() == device && r.shape() == shape, op, ": residual ", r.str(),
                 " does not match the result ", shape.str(), " on ", device.str());
}

// A fused epilogue's bias in the type of its product's C: a product written in bf16 adds the bias
// rounded to bf16 (as autocast does; the result is rounded to bf16 anyway).
Tensor bias_like(const Tensor& b, const Tensor& c) { return c.dtype() == DType::bf16 ? to_bf16(b) : b; }

// Validates linear's operands; returns the rows N (the leading dimensions: not numel / in, which
// fails when in == 0).
// A linear layer's weight (in, out) on `device`, its bias (out) or undefined, its bf16 copy or undefined.
void check_weight(const Tensor& w, const Tensor& bias, const Tensor& w_bf16, int64_t in, Device device,
                  const char* op) {
  check_f32(w, op, "weight");
  TUTTI_CHECK_AS(InvalidArgument, w.device() == device, op, ": weight ", w.str(), " is not on ", device.str());
  TUTTI_CHECK_AS(InvalidArgument, w.ndim() == 2 && w.is_contiguous() && w.size(0) == in, op, ": weight ", w.str(),
                 " must be contiguous (", in, ", out)");
  if (bias.defined()) {
    check_f32(bias, op, "bias");
    check_same_device(w, bias, op);
    TUTTI_CHECK_AS(InvalidArgument, bias.ndim() == 1 && bias.size(0) == w.size(1), op, ": bias ", bias.str(),
                   " does not match weight ", w.str());
  }
  checked_copy(w_bf16, w, op);
}

int64_t check_linear(const Tensor& x_in, const Tensor& w, const Tensor& bias, const Tensor& w_bf16, const char* op) {
  check_operand(x_in, w_bf16.defined(), op, "input");
  TUTTI_CHECK_AS(InvalidArgument, x_in.ndim() >= 1, op, ": input ", x_in.str(), " has no feature dimension");
  check_weight(w, bias, w_bf16, x_in.size(-1), x_in.device(), op);
  int64_t n = 1;
  for (int i = 0; i + 1 < x_in.ndim(); ++i) n *= x_in.size(i);
  return n;
}

// The gradients of y = x W + b from g = dL/dy (N, out): dx (x_shape), dW (in, out), db (out).
// xc, wc: what the forward's product read (bf16 under mixed precision, then g is rounded too and
// a fused bias gradient sums the rounded g, as the dW product reads it).
struct LinearBackward {
  Tensor xc, wc;
  bool need_x, need_w, has_bias, need_b, mixed;
  Shape x_shape;

  std::vector<Tensor> operator()(const Tensor& g_in) const {
    const Tensor g = g_in.contiguous().view({xc.size(0), wc.size(1)});  // (N, out)
    if (!mixed) return run(g, g);
    Tensor db;
    const Tensor gc = rounded(g_in, g, db);
    return run(gc, g, db);
  }

  // g (N, out), g_in as it came, rounded to bf16 for the products; where the bias needs its
  // gradient and g is fp32, that gradient (db, the sums of the unrounded g) too. Both as the op
  // that wrote g_in made them where it did (TensorImpl::rounded), else from one pass over g.
  Tensor rounded(const Tensor& g_in, const Tensor& g, Tensor& db) const {
    const TensorImpl& made = g_in.impl();
    if (made.rounded && made.rounded->shape == g_in.shape() && made.rounded->dtype == DType::bf16 &&
        made.column_sums && made.column_sums->shape == Shape{wc.size(1)}) {
      if (need_b) db = Tensor(made.column_sums);
      return Tensor(made.rounded).view(g.shape());
    }
    if (!need_b || g.dtype() != DType::f32) return to_bf16(g);
    Tensor gc = Tensor::empty(g.shape(), DType::bf16, g.device());
    db = new_like(xc, {wc.size(1)});
    backend_of(g).to_bf16_sum_rows(f32(g), bf16(gc), f32(db), g.size(0), g.size(1));
    return gc;
  }

  // From gc, the gradient the products read (bf16 under mixed precision), and db, the bias's
  // gradient where rounded() made it. Otherwise the bias gradient sums g, the gradient as it came:
  // a bf16 g in its own pass, an fp32 g in the dW product's epilogue where it fuses, else apart.
  std::vector<Tensor> run(const Tensor& gc, const Tensor& g, const Tensor& db = Tensor()) const {
    const int64_t out_features = wc.size(1);
    std::vector<Tensor> grads(has_bias ? 3 : 2);
    if (need_x) grads[0] = gemm_new(gc, false, wc, true).view(x_shape);  // (N, in)
    bool bias_done = need_b && db.defined();
    if (need_b) grads[2] = bias_done ? db : new_like(xc, {out_features});
    if (need_b && !bias_done && g.dtype() == DType::bf16) {
      backend_of(g).sum_rows_bf16(bf16(g), f32(grads[2]), g.size(0), out_features);
      bias_done = true;
    }
    if (need_w) {  // (in, out)
      grads[1] = new_like(xc, {xc.size(1), out_features});
      const bool fused = need_b && !bias_done &&
                         gemm_epilogue_into(xc, true, gc, false, grads[1], GemmEpilogue::bias_grad, nullptr, nullptr,
                                            f32(grads[2]));
      if (!fused) gemm_into(xc, true, gc, false, grads[1], 0.0f);
      bias_done = bias_done || fused;
    }
    if (need_b && !bias_done) backend_of(g).sum_rows(f32(g), f32(grads[2]), g.size(0), out_features, false);
    return grads;
  }
};

LinearBackward linear_backward(const Tensor& xc, const Tensor& wc, const Tensor& x_in, const Tensor& w,
                               const Tensor& bias, bool mixed) {
  const bool has_bias = bias.defined();
  return {xc,       wc, x_in.requires_grad(), w.requires_grad(), has_bias, has_bias && bias.requires_grad(),
          mixed, x_in.shape()};
}

// The weight's and bias's gradients only (mixed precision), of a product whose dx its op makes
// itself in another form (the MLP's in DGELU, attention's in bf16).
LinearBackward weight_backward(const Tensor& xc, const Tensor& wc, const Tensor& w, const Tensor& bias) {
  const bool has_bias = bias.defined();
  return {xc, wc, false, w.requires_grad(), has_bias, has_bias && bias.requires_grad(), true, Shape{}};
}

// y = gelu(h), h = xc wc + bias, both (N, out) in `type`, from one product with the bias and GELU in
// its epilogue; false (nothing written) where the backend cannot fuse it, or there is no bias.
bool gelu_product(const Tensor& xc, const Tensor& wc, const Tensor& bias, DType type, Tensor& y, Tensor& h) {
  y = Tensor::empty({xc.size(0), wc.size(1)}, type, xc.device());
  h = Tensor::empty({xc.size(0), wc.size(1)}, type, xc.device());
  return bias.defined() && gemm_epilogue_into(xc, false, wc, false, y, GemmEpilogue::bias_gelu,
                                              bias_like(bias.contiguous(), y).raw_data(), h.raw_data(), nullptr);
}

// y = xc wc + bias (N, out) in `out`'s type, the bias fused into the product where the backend can.
// residual (N, out) fp32 or undefined: added too, in the product's epilogue where it fuses, else
// as the product's C (beta 1) before the bias.
Tensor linear_product(const Tensor& xc, const Tensor& wc, const Tensor& bias, DType out,
                      const Tensor& residual = Tensor()) {
  const int64_t n = xc.size(0), out_features = wc.size(1);
  Tensor y = Tensor::empty({n, out_features}, out, xc.device());
  const Tensor b = bias.defined() ? bias.contiguous() : bias;
  if (residual.defined()) {
    const Tensor r = residual.contiguous().view({n, out_features});
    if (b.defined() && gemm_epilogue_into(xc, false, wc, false, y, GemmEpilogue::bias, b.raw_data(), nullptr, nullptr,
                                          f32(r)))
      return y;
    y.copy_(r);
    gemm_into(xc, false, wc, false, y, 1.0f);
    if (b.defined() && n > 0) backend_of(y).add(f32(y), f32(b), f32(y), n, out_features);
    return y;
  }
  if (b.defined() &&
      gemm_epilogue_into(xc, false, wc, false, y, GemmEpilogue::bias, bias_like(b, y).raw_data(), nullptr, nullptr))
    return y;
  if (out == DType::bf16 && b.defined()) {  // the bias added in fp32, then rounded
    Tensor y32 = new_like(xc, {n, out_features});
    gemm_into(xc, false, wc, false, y32, 0.0f);
    if (n > 0) backend_of(y32).add(f32(y32), f32(b), f32(y32), n, out_features);
    return to_bf16(y32);
  }
  gemm_into(xc, false, wc, false, y, 0.0f);
  if (b.defined() && n > 0) backend_of(y).add(f32(y), f32(b), f32(y), n, out_features);
  return y;
}

}  // namespace

Tensor linear(const Tensor& x_in, const Tensor& w, const Tensor& bias, const Tensor& w_bf16, DType out,
              const Tensor& residual) {
  const int64_t n = check_linear(x_in, w, bias, w_bf16, "linear");
  const int64_t in = w.size(0), out_features = w.size(1);
  const bool mixed = w_bf16.defined();
  TUTTI_CHECK_AS(InvalidArgument, out == DType::f32 || (out == DType::bf16 && mixed), "linear: a ", dtype_name(out),
                 " result needs a bf16 copy of the weight");
  Shape out_shape = x_in.shape();
  out_shape[-1] = out_features;
  check_residual(residual, out_shape, out, x_in.device(), "linear");
  const Tensor x = x_in.contiguous().view({n, in});                     // (N, in)
  const Tensor xc = mixed ? to_bf16(x) : x, wc = mixed ? w_bf16 : w;  // what the products read
  const Tensor y = linear_product(xc, wc, bias, out, residual).view(out_shape);
  if (!any_requires_grad({&x_in, &w, &bias, &residual})) return y;
  std::vector<Tensor> inputs{x_in, w};
  if (bias.defined()) inputs.push_back(bias);
  if (!residual.defined()) return record_op(y, OpKind::linear, inputs, linear_backward(xc, wc, x_in, w, bias, mixed));
  inputs.push_back(residual);
  return record_op(y, OpKind::linear, inputs, [rest = linear_backward(xc, wc, x_in, w, bias, mixed)](const Tensor& g) {
    std::vector<Tensor> grads = rest(g);
    grads.push_back(g);  // the residual's gradient is the output's
    return grads;
  });
}

Tensor linear_gelu(const Tensor& x_in, const Tensor& w, const Tensor& bias, const Tensor& w_bf16, DType out) {
  const int64_t n = check_linear(x_in, w, bias, w_bf16, "linear_gelu");
  const int64_t in = w.size(0), out_features = w.size(1);
  const bool mixed = w_bf16.defined();
  TUTTI_CHECK_AS(InvalidArgument, out == DType::f32 || (out == DType::bf16 && mixed), "linear_gelu: a ",
                 dtype_name(out), " result needs a bf16 copy of the weight");
  const Tensor x = x_in.contiguous().view({n, in});
  const Tensor xc = mixed ? to_bf16(x) : x, wc = mixed ? w_bf16 : w;
  const Tensor b = bias.defined() ? bias.contiguous() : bias;
  // y and h (GELU's input, kept for backward) in out's type where the product can write it so,
  // else in fp32 (the next product reads either).
  Tensor y, h;
  if (!gelu_product(xc, wc, b, out, y, h) && (out == DType::f32 || !gelu_product(xc, wc, b, DType::f32, y, h)))
    return gelu(linear(x_in, w, bias, w_bf16));  // no fused path: the two ops, exactly as before
  Shape out_shape = x_in.shape();
  out_shape[-1] = out_features;
  y = y.view(out_shape);
  if (!any_requires_grad({&x_in, &w, &bias})) return y;
  LinearBackward rest = linear_backward(xc, wc, x_in, w, bias, mixed);
  return record_op(y, OpKind::linear_gelu, {x_in, w, bias}, [h, rest](const Tensor& g_in) {
    const Tensor g = g_in.contiguous();
    if (!rest.mixed) {  // dL/d(x W + b)
      Tensor dh = new_like(h, h.shape());
      backend_of(h).gelu_backward(f32(h), f32(g), f32(dh), h.numel());
      return rest.run(dh, dh);
    }
    Tensor dhc = Tensor::empty(h.shape(), DType::bf16, h.device());  // GELU's gradient and the rounding, one pass
    Backend& be = backend_of(h);
    if (h.dtype() == DType::bf16) be.gelu_backward_bf16(bf16(h), f32(g), bf16(dhc), h.numel());
    else be.gelu_backward_bf16(f32(h), f32(g), bf16(dhc), h.numel());
    return rest.run(dhc, dhc);
  });
}

Tensor mlp(const Tensor& x_in, const Tensor& fc_w, const Tensor& fc_b, const Tensor& proj_w, const Tensor& proj_b,
           const Tensor& fc_w_bf16, const Tensor& proj_w_bf16, const Tensor& residual) {
  const int64_t n = check_linear(x_in, fc_w, fc_b, fc_w_bf16, "mlp");
  check_weight(proj_w, proj_b, proj_w_bf16, fc_w.size(1), x_in.device(), "mlp");
  const bool mixed = fc_w_bf16.defined() && proj_w_bf16.defined();
  const int64_t in = fc_w.size(0), out_features = proj_w.size(1);
  Shape out_shape = x_in.shape();
  out_shape[-1] = out_features;
  check_residual(residual, out_shape, DType::f32, x_in.device(), "mlp");
  // The GELU MLP's own graph (two nodes) wherever the fused one is not: fp32, or no fc bias.
  auto apart = [&] {
    return linear(linear_gelu(x_in, fc_w, fc_b, fc_w_bf16, mixed ? DType::bf16 : DType::f32), proj_w, proj_b,
                  proj_w_bf16, DType::f32, residual);
  };
  if (!mixed || !fc_b.defined()) return apart();
  const Tensor xc = to_bf16(x_in.contiguous().view({n, in}));
  // a = gelu(h): what the second product reads; h = x W1 + b1: kept for the backward's GELU gradient.
  Tensor a, h;
  if (!gelu_product(xc, fc_w_bf16, fc_b, DType::bf16, a, h)) return apart();
  const Tensor y = linear_product(a, proj_w_bf16, proj_b, DType::f32, residual).view(out_shape);
  if (!any_requires_grad({&x_in, &fc_w, &fc_b, &proj_w, &proj_b, &residual})) return y;
  const LinearBackward fc = linear_backward(xc, fc_w_bf16, x_in, fc_w, fc_b, true);
  const LinearBackward proj = weight_backward(a, proj_w_bf16, proj_w, proj_b);  // dx: the DGELU product below
  std::vector<Tensor> inputs{x_in, fc_w, fc_b, proj_w};
  if (proj_b.defined()) inputs.push_back(proj_b);
  const bool has_residual = residual.defined();
  if (has_residual) inputs.push_back(residual);
  return record_op(y, OpKind::mlp, inputs, [fc, proj, h, has_residual](const Tensor& g_in) {
    const Tensor g = g_in.contiguous().view({h.size(0), proj.wc.size(1)});
    Tensor db2;
    const Tensor gc = proj.rounded(g_in, g, db2);
    const std::vector<Tensor> p = proj.run(gc, g, db2);  // dW2 (, db2)
    // dL/d(x W1 + b1) = (g W2^T) gelu'(h) in one product where it fuses (b1's gradient then comes
    // from the dW1 product, as a linear layer's).
    Tensor dh = Tensor::empty(h.shape(), DType::bf16, h.device());
    if (!gemm_epilogue_into(gc, false, proj.wc, true, dh, GemmEpilogue::dgelu, nullptr, h.raw_data(), nullptr)) {
      const Tensor da = gemm_new(gc, false, proj.wc, true);  // (N, hidden)
      backend_of(h).gelu_backward_bf16(bf16(h), f32(da), bf16(dh), h.numel());
    }
    const std::vector<Tensor> f = fc.run(dh, dh);  // dx, dW1, db1
    std::vector<Tensor> grads{f[0], f[1], f[2], p[1]};
    if (p.size() == 3) grads.push_back(p[2]);
    if (has_residual) grads.push_back(g_in);  // the residual's gradient is the output's
    return grads;
  });
}

// ------------------------------------------------------------------------------------------
// add (with broadcast of b over a's leading dimensions), scale

Tensor add(const Tensor& a_in, const Tensor& b_in) {
  check_f32(a_in, "add", "a");
  check_f32(b_in, "add", "b");
  check_same_device(a_in, b_in, "add");
  const Shape& sa = a_in.shape();
  const Shape& sb = b_in.shape();
  bool suffix = sb.ndim() <= sa.ndim();
  for (int i = 1; suffix && i <= sb.ndim(); ++i) suffix = sb[-i] == sa[-i];
  TUTTI_CHECK_AS(InvalidArgument, suffix, "add: shape ", sb.str(), " does not broadcast to ", sa.str());
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t inner = b.numel(), outer = inner ? a.numel() / inner : 0;
  Tensor out = new_like(a, sa);
  if (a.numel()) backend_of(a).add(f32(a), f32(b), f32(out), outer, inner);
  if (!any_requires_grad({&a_in, &b_in})) return out;
  const bool need_b = b_in.requires_grad();
  return record_op(out, OpKind::add, {a_in, b_in}, [outer, inner, sb, need_b](const Tensor& g_in) {
    const Tensor g = g_in.contiguous();
    Tensor db;
    if (need_b) {
      if (outer == 1) {
        db = g.view(sb);
      } else {
        db = new_like(g, sb);
        backend_of(g).sum_rows(f32(g), f32(db), outer, inner, false);
      }
    }
    return std::vector<Tensor>{g, db};
  });
}

Tensor scale(const Tensor& a_in, float s) {
  check_f32(a_in, "scale", "input");
  const Tensor a = a_in.contiguous();
  Tensor out = new_like(a, a.shape());
  backend_of(a).scale(f32(a), s, f32(out), a.numel());
  if (!any_requires_grad({&a_in})) return out;
  return record_op(out, OpKind::scale, {a_in}, [s](const Tensor& g_in) {
    const Tensor g = g_in.contiguous();
    Tensor d = new_like(g, g.shape());
    backend_of(g).scale(f32(g), s, f32(d), g.numel());
    return std::vector<Tensor>{d};
  });
}

// ------------------------------------------------------------------------------------------
// activations

namespace {
using Unary = void (Backend::*)(const float*, float*, int64_t);
using UnaryBackward = void (Backend::*)(const float*, const float*, float*, int64_t);

Tensor activation(const Tensor& x_in, OpKind kind, Unary fwd, UnaryBackward bwd) {
  check_f32(x_in, op_name(kind), "input");
  const Tensor x = x_in.contiguous();
  Tensor y = new_like(x, x.shape());
  (backend_of(x).*fwd)(f32(x), f32(y), x.numel());
  if (!any_requires_grad({&x_in})) return y;
  return record_op(y, kind, {x_in}, [x, bwd](const Tensor& g_in) {
    const Tensor g = g_in.contiguous();
    Tensor dx = new_like(x, x.shape());
    (backend_of(x).*bwd)(f32(x), f32(g), f32(dx), x.numel());
    return std::vector<Tensor>{dx};
  });
}
}  // namespace

Tensor gelu(const Tensor& x) { return activation(x, OpKind::gelu, &Backend::gelu_forward, &Backend::gelu_backward); }
Tensor relu(const Tensor& x) { return activation(x, OpKind::relu, &Backend::relu_forward, &Backend::relu_backward); }

// ------------------------------------------------------------------------------------------
// layer_norm

Tensor layer_norm(const Tensor& x_in, const Tensor& w_in, const Tensor& b_in, float eps, DType out) {
  check_f32(x_in, "layer_norm", "input");
  check_f32(w_in, "layer_norm", "weight");
  check_f32(b_in, "layer_norm", "bias");
  check_same_device(x_in, w_in, "layer_norm");
  check_same_device(x_in, b_in, "layer_norm");
  const int64_t C = x_in.ndim() ? x_in.size(-1) : 0;
  TUTTI_CHECK_AS(InvalidArgument, x_in.ndim() >= 1 && w_in.shape() == Shape{C} && b_in.shape() == Shape{C},
                 "layer_norm: input ", x_in.str(), " with weight ", w_in.str(), " and bias ", b_in.str());
  TUTTI_CHECK_AS(InvalidArgument, eps > 0.0f, "layer_norm: eps must be positive, got ", eps);
  TUTTI_CHECK_AS(InvalidArgument, out == DType::f32 || out == DType::bf16, "layer_norm writes f32 or bf16, not ",
                 dtype_name(out));
  const Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = C ? x.numel() / C : 0;
  Tensor y = Tensor::empty(x.shape(), out, x.device()), mean = new_like(x, {rows}), rstd = new_like(x, {rows});
  if (out == DType::bf16)
    backend_of(x).layer_norm_forward_bf16(f32(x), f32(w), f32(b), bf16(y), f32(mean), f32(rstd), rows, C, eps);
  else
    backend_of(x).layer_norm_forward(f32(x), f32(w), f32(b), f32(y), f32(mean), f32(rstd), rows, C, eps);
  if (!any_requires_grad({&x_in, &w_in, &b_in})) return y;
  // dx is added into x's pending gradient where it can be (the residual stream's: the add after
  // this block's branch delivered it first), saving the engine's separate addition. Under mixed
  // precision (a bf16 y) the sum is also rounded and summed down the columns in the same pass, for
  // the linear layer before (TensorImpl::rounded).
  const Shape x_shape = x_in.shape();
  const bool round_dx = out == DType::bf16;
  return record_op_into(y, OpKind::layer_norm, {x_in, w_in, b_in},
                        [x, w, mean, rstd, rows, C, x_shape, round_dx](const Tensor& g_in,
                                                                      const std::vector<Tensor*>& into) {
                          const Tensor g = g_in.contiguous();
                          const bool add = into[0] != nullptr;
                          Tensor dx = add ? *into[0] : new_like(x, x_shape);
                          Tensor dw = Tensor::zeros({C}, DType::f32, x.device());
                          Tensor db = Tensor::zeros({C}, DType::f32, x.device());
                          Backend& be = backend_of(x);
                          if (!round_dx) {
                            be.layer_norm_backward(f32(x), f32(w), f32(mean), f32(rstd), f32(g), f32(dx), f32(dw),
                                                   f32(db), rows, C, add);
                            return std::vector<Tensor>{dx, dw, db};
                          }
                          Tensor dx_bf16 = Tensor::empty(x_shape, DType::bf16, x.device()), sums = new_like(x, {C});
                          be.layer_norm_backward_bf16(f32(x), f32(w), f32(mean), f32(rstd), f32(g), f32(dx), f32(dw),
                                                      f32(db), bf16(dx_bf16), f32(sums), rows, C, add);
                          dx.impl().rounded = dx_bf16.impl_ptr();
                          dx.impl().column_sums = sums.impl_ptr();
                          return std::vector<Tensor>{dx, dw, db};
                        });
}

// ------------------------------------------------------------------------------------------
// causal_attention on a fused (B, T, 3C) projection

namespace {
// bf16 flash attention: no (B, H, T, T) probabilities; backward recomputes them from the bf16
// qkv and each row's log-sum-exp, and reads y (kept detached: the node must not own its output)
// and y's gradient, all bf16: y feeds attn.c_proj's bf16 product, dqkv c_attn's backward products.

// y (B, T, C) bf16 from qkv (B, T, 3C) bf16, keeping lse (B, H, T) for the backward.
Tensor flash_attention_forward(const Tensor& qkv, int n_head, Tensor& lse) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  Tensor y = Tensor::empty({B, T, C}, DType::bf16, qkv.device());
  lse = new_like(qkv, {B, n_head, T});
  backend_of(qkv).flash_attention_forward(bf16(qkv), bf16(y), f32(lse), B, T, C, n_head);
  return y;
}
// dqkv (B, T, 3C) bf16 from the forward's qkv, y and lse and the bf16 gradient dy of y.
Tensor flash_attention_backward(const Tensor& qkv, const Tensor& y, const Tensor& lse, const Tensor& dy, int n_head) {
  Tensor dqkv = Tensor::empty(qkv.shape(), DType::bf16, qkv.device());
  backend_of(qkv).flash_attention_backward(bf16(qkv), bf16(y), f32(lse), bf16(dy), bf16(dqkv), qkv.size(0),
                                           qkv.size(1), qkv.size(2) / 3, n_head);
  return dqkv;
}

// The op's node alone; its incoming gradient (fp32 from an fp32 consumer) rounded once.
Tensor flash_attention(const Tensor& qkv_in, const Tensor& qkv, int n_head) {
  Tensor lse;
  Tensor y = flash_attention_forward(qkv, n_head, lse);
  if (!any_requires_grad({&qkv_in})) return y;
  const Tensor y_kept = y.detach();
  return record_op(y, OpKind::causal_attention, {qkv_in}, [qkv, y_kept, lse, n_head](const Tensor& g_in) {
    return std::vector<Tensor>{flash_attention_backward(qkv, y_kept, lse, to_bf16(g_in.contiguous()), n_head)};
  });
}
}  // namespace

Tensor causal_attention(const Tensor& qkv_in, int n_head, DType compute) {
  check_operand(qkv_in, compute == DType::bf16, "causal_attention", "qkv");
  TUTTI_CHECK_AS(InvalidArgument, qkv_in.ndim() == 3 && qkv_in.size(2) % 3 == 0,
                 "causal_attention: qkv must be (B, T, 3C), got ", qkv_in.str());
  const int64_t B = qkv_in.size(0), T = qkv_in.size(1), C = qkv_in.size(2) / 3;
  TUTTI_CHECK_AS(InvalidArgument, n_head > 0 && C % n_head == 0, "causal_attention: ", n_head,
                 " heads do not divide ", C, " channels");
  TUTTI_CHECK_AS(InvalidArgument, compute == DType::f32 || compute == DType::bf16,
                 "causal_attention computes in f32 or bf16, not ", dtype_name(compute));
  const bool mixed = compute == DType::bf16;
  const Tensor qkv = mixed ? to_bf16(qkv_in) : qkv_in.contiguous();  // what the products read
  Backend& be = backend_of(qkv);
  if (mixed && B * T > 0 && be.flash_attention_supports(B, T, C, n_head))
    return flash_attention(qkv_in, qkv, n_head);
  Tensor y = new_like(qkv, {B, T, C});
  Tensor probs = Tensor::empty({B, n_head, T, T}, compute, qkv.device());  // (B, H, T, T)
  if (mixed) be.attention_forward_bf16(bf16(qkv), f32(y), bf16(probs), B, T, C, n_head);
  else be.attention_forward(f32(qkv), f32(y), f32(probs), B, T, C, n_head);
  if (!any_requires_grad({&qkv_in})) return y;
  return record_op(y, OpKind::causal_attention, {qkv_in}, [qkv, probs, B, T, C, n_head, mixed](const Tensor& g_in) {
    const Tensor g = g_in.contiguous();
    Tensor dqkv = new_like(qkv, qkv.shape());
    Backend& be = backend_of(qkv);
    if (mixed) be.attention_backward_bf16(bf16(qkv), bf16(probs), f32(g), f32(dqkv), B, T, C, n_head);
    else be.attention_backward(f32(qkv), f32(probs), f32(g), f32(dqkv), B, T, C, n_head);
    return std::vector<Tensor>{dqkv};
  });
}

Tensor attention(const Tensor& qkv_in, int n_head, const Tensor& proj_w, const Tensor& proj_b,
                 const Tensor& proj_w_bf16, const Tensor& residual) {
  const bool mixed = proj_w_bf16.defined();
  const DType compute = mixed ? DType::bf16 : DType::f32;
  auto apart = [&] {
    return linear(causal_attention(qkv_in, n_head, compute), proj_w, proj_b, proj_w_bf16, DType::f32, residual);
  };
  if (!mixed || !qkv_in.defined() || qkv_in.ndim() != 3 || qkv_in.size(2) % 3 != 0 || n_head <= 0)
    return apart();  // and its checks
  const int64_t B = qkv_in.size(0), T = qkv_in.size(1), C = qkv_in.size(2) / 3;
  if (B * T == 0 || !backend_of(qkv_in).flash_attention_supports(B, T, C, n_head)) return apart();
  check_operand(qkv_in, true, "attention", "qkv");
  check_weight(proj_w, proj_b, proj_w_bf16, C, qkv_in.device(), "attention");
  check_residual(residual, Shape{B, T, proj_w.size(1)}, DType::f32, qkv_in.device(), "attention");
  const Tensor qkv = to_bf16(qkv_in);
  Tensor lse;
  const Tensor y = flash_attention_forward(qkv, n_head, lse).view({B * T, C});
  const Tensor out = linear_product(y, proj_w_bf16, proj_b, DType::f32, residual).view({B, T, proj_w.size(1)});
  if (!any_requires_grad({&qkv_in, &proj_w, &proj_b, &residual})) return out;
  const bool has_residual = residual.defined();
  const LinearBackward proj = weight_backward(y, proj_w_bf16, proj_w, proj_b);  // dx: in bf16 below
  std::vector<Tensor> inputs{qkv_in, proj_w};
  if (proj_b.defined()) inputs.push_back(proj_b);
  if (has_residual) inputs.push_back(residual);
  const bool need_qkv = qkv_in.requires_grad();
  return record_op(out, OpKind::attention, inputs,
                   [proj, qkv, lse, n_head, need_qkv, has_residual](const Tensor& g_in) {
                     const Tensor g = g_in.contiguous().view({proj.xc.size(0), proj.wc.size(1)});
                     Tensor db;
                     const Tensor gc = proj.rounded(g_in, g, db);
                     std::vector<Tensor> grads = proj.run(gc, g, db);  // (none), dW (, db)
                     // y's gradient straight into bf16 for the attention's backward: no fp32 copy.
                     if (need_qkv)
                       grads[0] = flash_attention_backward(qkv, proj.xc, lse,
                                                           gemm_new(gc, false, proj.wc, true, DType::bf16), n_head);
                     if (has_residual) grads.push_back(g_in);  // the residual's gradient is the output's
                     return grads;
                   });
}

// ------------------------------------------------------------------------------------------
// embedding

Tensor embedding(const Tensor& indices_in, const Tensor& table) {
  check_f32(table, "embedding", "table");
  check_same_device(indices_in, table, "embedding");
  TUTTI_CHECK_AS(InvalidArgument, indices_in.dtype() == DType::i32, "embedding: indices must be i32, got ",
                 indices_in.str());
  TUTTI_CHECK_AS(InvalidArgument, table.ndim() == 2, "embedding: table must be (V, C), got ", table.str());
  const Tensor idx = indices_in.contiguous(), tab = table.contiguous();
  const int64_t n = idx.numel(), V = tab.size(0), C = tab.size(1);
  if (idx.device().is_cpu()) {
    const int32_t* p = i32(idx);
    for (int64_t i = 0; i < n; ++i)
      TUTTI_CHECK_AS(InvalidArgument, p[i] >= 0 && p[i] < V, "embedding: index ", p[i], " out of range [0, ", V, ")");
  }
  Shape out_shape = idx.shape();
  out_shape.push_back(C);
  Tensor out = new_like(tab, out_shape);
  backend_of(tab).embedding_forward(i32(idx), f32(tab), f32(out), n, C, V);
  if (!any_requires_grad({&table})) return out;
  // The rows are added into the table's gradient so far where there is one (a tied output head's,
  // whose backward ran first), saving a zeroed (V, C) and the engine's addition of the two.
  return record_op_into(out, OpKind::embedding, {table},
                        [idx, V, C, n](const Tensor& g_in, const std::vector<Tensor*>& into) {
                          const Tensor g = g_in.contiguous();
                          Tensor dt = into[0] != nullptr ? *into[0] : Tensor::zeros({V, C}, DType::f32, g.device());
                          backend_of(g).embedding_backward(i32(idx), f32(g), f32(dt), n, C);
                          return std::vector<Tensor>{dt};
                        });
}

// ------------------------------------------------------------------------------------------
// cross_entropy (mean over rows), softmax fused in

namespace {

Tensor mean_of_losses(const Tensor& losses, int64_t N) {
  return Tensor::full({}, static_cast<float>(backend_of(losses).sum(f32(losses), N) / static_cast<double>(N)),
                      losses.device());
}

// Backends with the fused form keep the logits (the node holds them anyway) and two floats a row,
// not the (N, V) probabilities. The gradient goes to a new buffer, not into the logits: the
// caller may still hold the logits (or a view of them), so overwriting them is not safe.
// bf16 logits: the same kernels reading bf16 and writing the gradient in bf16.
Tensor cross_entropy_fused(const Tensor& logits_in, const Tensor& logits, const Tensor& targets) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const bool half = logits.dtype() == DType::bf16;
  Tensor stats = new_like(logits, {N, 2}), losses = new_like(logits, {N});
  Backend& be = backend_of(logits);
  if (half) be.cross_entropy_stats_bf16(bf16(logits), i32(targets), f32(stats), f32(losses), N, V);
  else be.cross_entropy_stats(f32(logits), i32(targets), f32(stats), f32(losses), N, V);
  Tensor loss = mean_of_losses(losses, N);
  if (!any_requires_grad({&logits_in})) return loss;
  return record_op(loss, OpKind::cross_entropy, {logits_in}, [logits, stats, targets, N, V, half](const Tensor& g) {
    Tensor d = Tensor::empty({N, V}, logits.dtype(), logits.device());
    const float dloss = g.item() / static_cast<float>(N);
    Backend& be = backend_of(logits);
    if (half) be.cross_entropy_backward_from_stats_bf16(bf16(logits), i32(targets), f32(stats), dloss, bf16(d), N, V);
    else be.cross_entropy_backward_from_stats(f32(logits), i32(targets), f32(stats), dloss, f32(d), N, V);
    return std::vector<Tensor>{d};
  });
}

}  // namespace

bool fused_cross_entropy(Device device) { return backend_for(device).fused_cross_entropy(); }

Tensor cross_entropy(const Tensor& logits_in, const Tensor& targets_in) {
  const bool half = logits_in.defined() && logits_in.dtype() == DType::bf16;
  if (!half) check_f32(logits_in, "cross_entropy", "logits");
  check_same_device(logits_in, targets_in, "cross_entropy");
  TUTTI_CHECK_AS(InvalidArgument, logits_in.ndim() == 2, "cross_entropy: logits must be (N, V), got ", logits_in.str());
  TUTTI_CHECK_AS(InvalidArgument, targets_in.dtype() == DType::i32 && targets_in.numel() == logits_in.size(0),
                 "cross_entropy: targets ", targets_in.str(), " do not match logits ", logits_in.str());
  const Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  TUTTI_CHECK_AS(InvalidArgument, N > 0 && V > 0, "cross_entropy: empty logits ", logits.str());
  if (targets.device().is_cpu()) {
    const int32_t* t = i32(targets);
    for (int64_t i = 0; i < N; ++i)
      TUTTI_CHECK_AS(InvalidArgument, t[i] >= 0 && t[i] < V, "cross_entropy: target ", t[i], " out of range [0, ", V,
                     ")");
  }
  if (backend_of(logits).fused_cross_entropy()) return cross_entropy_fused(logits_in, logits, targets);
  TUTTI_CHECK_AS(InvalidArgument, !half, "cross_entropy: bf16 logits need the fused kernels, which ",
                 logits.device().str(), " does not have");
  Tensor probs = new_like(logits, {N, V}), losses = new_like(logits, {N});
  backend_of(logits).cross_entropy_forward(f32(logits), i32(targets), f32(probs), f32(losses), N, V);
  Tensor loss = mean_of_losses(losses, N);
  if (!any_requires_grad({&logits_in})) return loss;
  return record_op(loss, OpKind::cross_entropy, {logits_in}, [probs, targets, N, V](const Tensor& g) {
    Tensor d = new_like(probs, {N, V});
    backend_of(probs).cross_entropy_backward(f32(probs), i32(targets), g.item() / static_cast<float>(N), f32(d), N, V);
    return std::vector<Tensor>{d};
  });
}

// ------------------------------------------------------------------------------------------
// reductions, reshape, softmax

Tensor sum(const Tensor& x_in) {
  check_f32(x_in, "sum", "input");
  const Tensor x = x_in.contiguous();
  Tensor out = Tensor::full({}, static_cast<float>(backend_of(x).sum(f32(x), x.numel())), x.device());
  if (!any_requires_grad({&x_in})) return out;
  const Shape shape = x.shape();
  return record_op(out, OpKind::sum, {x_in}, [shape](const Tensor& g) {
    return std::vector<Tensor>{Tensor::full(shape, g.item(), g.device())};
  });
}

Tensor mean(const Tensor& x) {
  TUTTI_CHECK_AS(InvalidArgument, x.numel() > 0, "mean of an empty tensor ", x.str());
  return scale(sum(x), 1.0f / static_cast<float>(x.numel()));
}

Tensor reshape(const Tensor& x_in, const Shape& shape) {
  const Tensor x = x_in.contiguous();
  Tensor out = x.view(shape);
  if (!any_requires_grad({&x_in})) return out;
  const Shape original = x_in.shape();
  return record_op(out, OpKind::reshape, {x_in},
                   [original](const Tensor& g) { return std::vector<Tensor>{g.contiguous().view(original)}; });
}

Tensor softmax(const Tensor& x_in) {
  check_f32(x_in, "softmax", "input");
  const Tensor x = x_in.contiguous();
  const int64_t cols = x.ndim() ? x.size(-1) : 1;
  Tensor y = new_like(x, x.shape());
  if (x.numel()) backend_of(x).softmax(f32(x), f32(y), x.numel() / cols, cols);
  return y;
}

}  // namespace tutti::ops
