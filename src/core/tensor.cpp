#include "tutti/core/tensor.hpp"

#include <sstream>

#include "backend/backend.hpp"
#include "tutti/autograd/node.hpp"

namespace tutti {

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  data_ = allocator_for(device).allocate(bytes);
}
Storage::~Storage() { allocator_for(device_).deallocate(data_, bytes_); }

namespace {
std::shared_ptr<TensorImpl> make_impl(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) TUTTI_CHECK_AS(InvalidArgument, d >= 0, "negative dimension in shape ", shape.str());
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(shape.numel()) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return impl;
}

// A view: same storage and dtype, new geometry, no autograd history.
Tensor make_view(const Tensor& base, const Shape& shape, const Strides& strides, int64_t offset) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = base.impl().storage;
  impl->shape = shape;
  impl->strides = strides;
  impl->offset = offset;
  impl->dtype = base.dtype();
  return Tensor(impl);
}
}  // namespace

TensorImpl& Tensor::impl() const {
  TUTTI_CHECK_AS(InvalidArgument, impl_ != nullptr, "use of an undefined tensor");
  return *impl_;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) { return Tensor(make_impl(shape, dtype, device)); }

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  if (dtype == DType::f32) {
    t.fill_(0.0f);
  } else if (device.is_cpu()) {
    std::memset(t.raw_data(), 0, t.nbytes());
  } else {
    std::vector<char> zeros(t.nbytes(), 0);
    backend_for(device).copy_from_host(t.raw_data(), zeros.data(), zeros.size());
  }
  return t;
}

Tensor Tensor::full(const Shape& shape, float value, Device device) {
  Tensor t = empty(shape, DType::f32, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::from_vector(const Shape& shape, const std::vector<float>& values) {
  TUTTI_CHECK_AS(InvalidArgument, static_cast<int64_t>(values.size()) == shape.numel(), "from_vector: ",
                 values.size(), " values for shape ", shape.str());
  Tensor t = empty(shape, DType::f32);
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(float));
  return t;
}

Tensor Tensor::from_vector(const Shape& shape, const std::vector<int32_t>& values) {
  TUTTI_CHECK_AS(InvalidArgument, static_cast<int64_t>(values.size()) == shape.numel(), "from_vector: ",
                 values.size(), " values for shape ", shape.str());
  Tensor t = empty(shape, DType::i32);
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(int32_t));
  return t;
}

bool Tensor::is_contiguous() const { return strides() == contiguous_strides(shape()) || numel() <= 1; }

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  std::ostringstream s;
  s << dtype_name(dtype()) << shape().str() << " " << device().str();
  return s.str();
}

void* Tensor::raw_data() const {
  const TensorImpl& t = impl();
  return static_cast<char*>(t.storage->data()) + static_cast<size_t>(t.offset) * dtype_size(t.dtype);
}

void Tensor::check_access(DType expected) const {
  TUTTI_CHECK_AS(InvalidArgument, dtype() == expected, "tensor ", str(), " accessed as ", dtype_name(expected));
}

float Tensor::item() const {
  TUTTI_CHECK_AS(InvalidArgument, numel() == 1 && dtype() == DType::f32, "item() needs a one-element f32 tensor, got ",
                 str());
  return to_vector<float>()[0];
}

Tensor Tensor::view(const Shape& shape) const {
  TUTTI_CHECK_AS(InvalidArgument, is_contiguous(), "view of a non-contiguous tensor ", str(), "; call contiguous()");
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (int i = 0; i < s.ndim(); ++i) {
    if (s[i] == -1) {
      TUTTI_CHECK_AS(InvalidArgument, infer < 0, "view: more than one -1 in ", shape.str());
      infer = i;
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    TUTTI_CHECK_AS(InvalidArgument, known > 0 && numel() % known == 0, "view: cannot infer -1 of ", shape.str(),
                   " for ", str());
    s[infer] = numel() / known;
  }
  TUTTI_CHECK_AS(InvalidArgument, s.numel() == numel(), "view: shape ", s.str(), " does not match ", str());
  return make_view(*this, s, contiguous_strides(s), impl().offset);
}

Tensor Tensor::transpose(int dim0, int dim1) const {
  Shape s = shape();
  Strides st = strides();
  const int a = s.wrap(dim0), b = s.wrap(dim1);
  std::swap(s[a], s[b]);
  std::swap(st[a], st[b]);
  return make_view(*this, s, st, impl().offset);
}

Tensor Tensor::slice(int dim, int64_t start, int64_t end) const {
  const int d = shape().wrap(dim);
  TUTTI_CHECK_AS(InvalidArgument, 0 <= start && start <= end && end <= shape()[d], "slice [", start, ", ", end,
                 ") out of range for dim ", d, " of ", str());
  Shape s = shape();
  s[d] = end - start;
  return make_view(*this, s, strides(), impl().offset + start * strides()[d]);
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor out = empty(shape(), dtype(), device());
  out.copy_(*this);
  return out;
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  Tensor out = empty(shape(), dtype(), device);
  out.copy_(*this);
  return out;
}

void Tensor::copy_(const Tensor& src) {
  TUTTI_CHECK_AS(InvalidArgument, shape() == src.shape() && dtype() == src.dtype(), "copy_: ", src.str(), " into ",
                 str());
  TUTTI_CHECK_AS(InvalidArgument, is_contiguous(), "copy_ into a non-contiguous tensor ", str());
  Tensor s = src;
  if (!s.is_contiguous()) {  // gather on the source's device first
    Tensor dense = empty(s.shape(), s.dtype(), s.device());
    backend_for(s.device()).strided_copy(s.raw_data(), s.shape(), s.strides(), dtype_size(s.dtype()),
                                         dense.raw_data());
    s = dense;
  }
  const size_t bytes = nbytes();
  if (bytes == 0) return;
  if (device() == s.device()) {
    backend_for(device()).copy_on_device(raw_data(), s.raw_data(), bytes);
  } else if (s.device().is_cpu()) {
    backend_for(device()).copy_from_host(raw_data(), s.raw_data(), bytes);
  } else if (device().is_cpu()) {
    backend_for(s.device()).copy_to_host(raw_data(), s.raw_data(), bytes);
  } else {  // between two accelerators: through the host
    std::vector<char> host(bytes);
    backend_for(s.device()).copy_to_host(host.data(), s.raw_data(), bytes);
    backend_for(device()).copy_from_host(raw_data(), host.data(), bytes);
  }
}

void Tensor::fill_(float value) {
  TUTTI_CHECK_AS(InvalidArgument, dtype() == DType::f32 && is_contiguous(), "fill_ needs a contiguous f32 tensor, got ",
                 str());
  backend_for(device()).fill(static_cast<float*>(raw_data()), numel(), value);
}

Tensor& Tensor::set_requires_grad(bool on) {
  TUTTI_CHECK_AS(InvalidArgument, !on || dtype() == DType::f32, "only f32 tensors can require grad, got ", str());
  impl().requires_grad = on;
  return *this;
}

Tensor Tensor::detach() const { return make_view(*this, shape(), strides(), impl().offset); }

void Tensor::backward() const { run_backward(*this); }
void Tensor::backward(const Tensor& gradient) const { run_backward(*this, gradient); }

}  // namespace tutti
