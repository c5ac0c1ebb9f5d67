// Just enough of tutti::Tensor for the checkpoint parsers, on the host, with malloc: the fuzz
// targets link safetensors.cpp and manifest.cpp against this instead of the whole library (its
// backends, oneDNN and OpenMP), so they build in seconds with clang's sanitizers.
#include <cstdlib>
#include <cstring>
#include <new>

#include "tutti/core/tensor.hpp"

namespace tutti {

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  data_ = std::malloc(bytes > 0 ? bytes : 1);
  if (!data_) throw std::bad_alloc();
}
Storage::~Storage() { std::free(data_); }

TensorImpl& Tensor::impl() const {
  TUTTI_CHECK_AS(InvalidArgument, impl_ != nullptr, "use of an undefined tensor");
  return *impl_;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) TUTTI_CHECK_AS(InvalidArgument, d >= 0, "negative dimension");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(shape.numel()) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(impl);
}

void* Tensor::raw_data() const {
  const TensorImpl& t = impl();
  return static_cast<char*>(t.storage->data()) + static_cast<size_t>(t.offset) * dtype_size(t.dtype);
}

// Every tensor here is a dense host tensor.
Tensor Tensor::contiguous() const { return *this; }
Tensor Tensor::to(Device) const { return *this; }

}  // namespace tutti
