// The autograd tape. Every differentiable op that sees an input requiring grad records a Node
// with a sequence number; backward() visits the recorded nodes in reverse order of recording
// (newest first), so it runs exactly the tape backwards, over the part that reaches the loss.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "tutti/core/tensor.hpp"

namespace tutti {

class Node {
 public:
  explicit Node(std::vector<Tensor> inputs);
  virtual ~Node() = default;
  virtual const char* name() const = 0;
  // Returns one gradient per input (undefined where the input needs none).
  virtual std::vector<Tensor> backward(const Tensor& grad_output) = 0;
  // Nodes that can add their gradient into another's: where input i already has a gradient that
  // nothing else holds (pending from another consumer, or a leaf's .grad so far), into[i] points at
  // it; the node may add its part there in place and return that same tensor for i, which the
  // engine then does not add again (saving a pass: the residual stream's LayerNorms do, and the
  // embedding into the tied output head's gradient). Others get backward().
  virtual bool accumulates_into() const { return false; }
  virtual std::vector<Tensor> backward_into(const Tensor& grad_output, const std::vector<Tensor*>& into) {
    (void)into;
    return backward(grad_output);
  }

  const std::vector<Tensor>& inputs() const { return inputs_; }
  uint64_t sequence() const { return sequence_; }
  bool needs_grad(size_t input) const { return inputs_[input].requires_grad(); }

 private:
  std::vector<Tensor> inputs_;
  uint64_t sequence_;
};

// Whether ops record nodes on this thread (on by default).
bool grad_enabled();

// Turns recording off for its scope (evaluation, generation, optimizer updates).
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};

// Makes `output` the result of `node` if any input requires grad and recording is on.
Tensor record(Tensor output, std::shared_ptr<Node> node);
// True when an op with these inputs must record a node.
bool any_requires_grad(std::initializer_list<const Tensor*> inputs);

// Runs the tape backwards from `root`, accumulating into leaves' .grad(). `gradient` is d(result)/d(root)
// (root's shape); undefined means 1 and then root must have one element.
void run_backward(const Tensor& root, const Tensor& gradient = Tensor());

}  // namespace tutti
