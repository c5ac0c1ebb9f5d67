// Tensor: a handle to shape, strides, dtype and device over shared storage. Copying a Tensor shares
// it (as in PyTorch); views (reshape, transpose, slice) share storage without copying.
#pragma once
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tutti/core/allocator.hpp"
#include "tutti/core/dtype.hpp"
#include "tutti/core/shape.hpp"

namespace tutti {

class Node;

// A block of device memory; returned to its allocator when the last tensor using it goes.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  Shape shape;
  Strides strides;
  int64_t offset = 0;  // in elements
  DType dtype = DType::f32;
  // autograd
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;   // same shape, allocated on first backward
  std::shared_ptr<Node> grad_fn;      // the op that produced this tensor (null for leaves)
  // Called once per backward pass on a leaf, when its gradient for that pass is final (every op
  // that used it has run). Data parallelism starts reducing gradients from here.
  std::function<void(TensorImpl&)> on_grad_ready;
  // The values rounded to bf16 (same shape) and summed over every dimension but the last, made by
  // the op that wrote them for consumers that need those: under mixed precision the LayerNorm
  // whose backward completes the residual stream's gradient attaches them, and the linear layer
  // before it reads them (its products' operand and its bias's gradient). Whoever writes the
  // values again drops them: the autograd engine, where it adds into a gradient.
  std::shared_ptr<TensorImpl> rounded, column_sums;
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // -- creation -------------------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, float value, Device device = Device::cpu());
  static Tensor from_vector(const Shape& shape, const std::vector<float>& values);
  static Tensor from_vector(const Shape& shape, const std::vector<int32_t>& values);

  // -- metadata -------------------------------------------------------------------------------
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Strides& strides() const { return impl().strides; }
  int ndim() const { return shape().ndim(); }
  int64_t size(int dim) const { return shape()[dim]; }
  int64_t numel() const { return shape().numel(); }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage->device(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }
  bool is_contiguous() const;
  std::string str() const;  // "f32(2, 3) cpu"

  // -- data access (host pointers only for cpu tensors) -----------------------------------------
  void* raw_data() const;
  template <class T>
  T* data() const {
    check_access(dtype_of<T>());
    return static_cast<T*>(raw_data());
  }
  template <class T>
  std::vector<T> to_vector() const;
  float item() const;  // the value of a one-element f32 tensor

  // -- views and copies -----------------------------------------------------------------------
  Tensor view(const Shape& shape) const;           // contiguous only; one dim may be -1; no autograd
  Tensor transpose(int dim0, int dim1) const;      // view with swapped strides
  Tensor slice(int dim, int64_t start, int64_t end) const;  // view of [start, end) along dim
  Tensor contiguous() const;                       // self when contiguous, else a dense copy
  Tensor clone() const;                            // always a dense copy
  Tensor to(Device device) const;                  // copy to another device (self if already there)
  void copy_(const Tensor& src);                   // same shape; any devices
  void fill_(float value);
  void zero_() { fill_(0.0f); }

  // -- autograd -------------------------------------------------------------------------------
  bool requires_grad() const { return impl().requires_grad; }
  Tensor& set_requires_grad(bool on);
  Tensor grad() const { return Tensor(impl().grad); }
  void set_grad(const Tensor& g) { impl().grad = g.impl_; }
  void zero_grad() { impl().grad.reset(); }
  const std::shared_ptr<Node>& grad_fn() const { return impl().grad_fn; }
  Tensor detach() const;  // same storage, no history
  void backward() const;  // this must be a one-element tensor
  // Backward from a tensor of any shape, given the gradient of the final result with respect to
  // it (same shape): how a pipeline stage continues the backward of the next stage.
  void backward(const Tensor& gradient) const;

  TensorImpl& impl() const;
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  bool same(const Tensor& o) const { return impl_ == o.impl_; }

 private:
  void check_access(DType expected) const;
  std::shared_ptr<TensorImpl> impl_;
};

template <class T>
std::vector<T> Tensor::to_vector() const {
  Tensor c = to(Device::cpu()).contiguous();
  std::vector<T> out(static_cast<size_t>(c.numel()));
  if (!out.empty()) std::memcpy(out.data(), c.data<T>(), out.size() * sizeof(T));
  return out;
}

}  // namespace tutti
