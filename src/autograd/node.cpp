#include "tutti/autograd/node.hpp"

#include <atomic>
#include <map>
#include <unordered_map>

#include "backend/backend.hpp"

namespace tutti {
namespace {
std::atomic<uint64_t> next_sequence{0};
thread_local bool grad_mode = true;

// t's values are about to change: what was derived from them goes (TensorImpl::rounded).
void drop_derived(TensorImpl& t) {
  t.rounded.reset();
  t.column_sums.reset();
}

// dst (+)= src, allocating dst on first use. `src` is taken over when nothing else holds it.
void accumulate(std::shared_ptr<TensorImpl>& dst, Tensor& src) {
  if (!dst) {
    const bool exclusive =
        src.impl_ptr().use_count() == 1 && src.impl().storage.use_count() == 1 && src.is_contiguous();
    dst = exclusive ? src.impl_ptr() : src.clone().impl_ptr();
    drop_derived(*dst);  // a leaf's gradient keeps no copies (nothing reads them)
    src = Tensor();
    return;
  }
  Tensor d(dst);
  Tensor s = src.contiguous();
  TUTTI_CHECK(d.shape() == s.shape(), "gradient shape ", s.str(), " does not match ", d.str());
  drop_derived(*dst);
  backend_for(d.device()).axpy(1.0f, s.data<float>(), d.data<float>(), d.numel());
}
}  // namespace

Node::Node(std::vector<Tensor> inputs) : inputs_(std::move(inputs)), sequence_(next_sequence++) {}

bool grad_enabled() { return grad_mode; }
NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }

bool any_requires_grad(std::initializer_list<const Tensor*> inputs) {
  if (!grad_mode) return false;
  for (const Tensor* t : inputs)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

Tensor record(Tensor output, std::shared_ptr<Node> node) {
  output.impl().requires_grad = true;
  output.impl().grad_fn = std::move(node);
  return output;
}

void run_backward(const Tensor& root, const Tensor& gradient) {
  TUTTI_CHECK_AS(InvalidArgument, gradient.defined() || root.numel() == 1,
                 "backward() without a gradient needs a one-element tensor, got ", root.str());
  TUTTI_CHECK_AS(InvalidArgument, !gradient.defined() || (gradient.shape() == root.shape() &&
                                                          gradient.dtype() == DType::f32 &&
                                                          gradient.device() == root.device()),
                 "backward(): gradient ", gradient.str(), " does not match ", root.str());
  TUTTI_CHECK_AS(InvalidArgument, root.requires_grad(), "backward() on a tensor that does not require grad");
  NoGradGuard no_grad;
  Tensor seed = gradient.defined() ? gradient.contiguous().clone() : Tensor::full(root.shape(), 1.0f, root.device());
  if (!root.grad_fn()) {
    accumulate(root.impl().grad, seed);
    if (root.impl().on_grad_ready) root.impl().on_grad_ready(root.impl());
    return;
  }
  // How many edges of the reachable graph lead to each leaf: when all have delivered their
  // gradient, the leaf's gradient is final and its on_grad_ready hook runs.
  std::unordered_map<TensorImpl*, int> leaf_edges;
  {
    std::vector<Node*> stack{root.grad_fn().get()};
    std::unordered_map<Node*, bool> seen{{root.grad_fn().get(), true}};
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      for (const Tensor& in : n->inputs()) {
        if (!in.defined() || !in.requires_grad()) continue;
        if (Node* next = in.grad_fn().get()) {
          if (seen.emplace(next, true).second) stack.push_back(next);
        } else if (in.impl().on_grad_ready) {
          ++leaf_edges[&in.impl()];
        }
      }
    }
  }
  auto edge_done = [&](TensorImpl& leaf) {
    auto it = leaf_edges.find(&leaf);
    if (it != leaf_edges.end() && --it->second == 0) leaf.on_grad_ready(leaf);
  };
  // Pending output gradients per node, visited newest-first: the tape in reverse.
  std::map<uint64_t, std::pair<std::shared_ptr<Node>, Tensor>, std::greater<>> pending;
  pending.emplace(root.grad_fn()->sequence(), std::make_pair(root.grad_fn(), seed));
  while (!pending.empty()) {
    auto it = pending.begin();
    std::shared_ptr<Node> node = std::move(it->second.first);
    Tensor grad_out = std::move(it->second.second);
    pending.erase(it);
    std::vector<Tensor*> into;
    std::vector<Tensor> leaf_grads;  // leaves' gradients so far, offered in `into`
    if (node->accumulates_into()) {
      into.assign(node->inputs().size(), nullptr);
      leaf_grads.resize(into.size());
      for (size_t i = 0; i < into.size(); ++i) {
        const Tensor& in = node->inputs()[i];
        if (!in.defined() || !in.requires_grad()) continue;
        Tensor* acc = nullptr;
        long holders = 1;  // references to acc's impl besides the engine's own
        if (!in.grad_fn()) {  // a leaf: its .grad (another op's part this pass, or earlier passes')
          if (!in.impl().grad) continue;
          leaf_grads[i] = Tensor(in.impl().grad);
          acc = &leaf_grads[i];
          holders = 2;  // the leaf's .grad and leaf_grads[i]
        } else {
          auto it = pending.find(in.grad_fn()->sequence());
          if (it == pending.end()) continue;
          acc = &it->second.second;
        }
        if (acc->impl_ptr().use_count() == holders && acc->impl().storage.use_count() == 1 && acc->is_contiguous() &&
            acc->dtype() == DType::f32 && acc->shape() == in.shape()) {
          into[i] = acc;
          drop_derived(acc->impl());  // the node may add into it
        }
      }
    }
    std::vector<Tensor> grads = into.empty() ? node->backward(grad_out) : node->backward_into(grad_out, into);
    TUTTI_CHECK(grads.size() == node->inputs().size(), "op ", node->name(), " returned ", grads.size(),
                " gradients for ", node->inputs().size(), " inputs");
    for (size_t i = 0; i < grads.size(); ++i) {
      const Tensor& input = node->inputs()[i];
      if (!input.defined() || !input.requires_grad()) continue;
      if (!grads[i].defined()) {
        if (!input.grad_fn()) edge_done(input.impl());
        continue;
      }
      TUTTI_CHECK(grads[i].shape() == input.shape(), "op ", node->name(), ": gradient ", grads[i].str(),
                  " for input ", input.str());
      if (const auto& fn = input.grad_fn()) {
        if (!into.empty() && into[i] != nullptr && grads[i].impl_ptr() == into[i]->impl_ptr()) continue;  // added
        auto [slot, inserted] = pending.try_emplace(fn->sequence(), fn, grads[i]);
        if (!inserted) {
          Tensor& acc = slot->second.second;
          if (acc.impl_ptr().use_count() > 1 || acc.impl().storage.use_count() > 1) acc = acc.clone();
          drop_derived(acc.impl());
          backend_for(acc.device()).axpy(1.0f, grads[i].contiguous().data<float>(), acc.data<float>(), acc.numel());
        }
      } else {
        if (into.empty() || into[i] == nullptr || grads[i].impl_ptr() != into[i]->impl_ptr())
          accumulate(input.impl().grad, grads[i]);
        edge_done(input.impl());
      }
    }
  }
}

}  // namespace tutti
