// Shape and strides: small inline arrays (no heap), up to kMaxDims dimensions.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "tutti/core/error.hpp"

namespace tutti {

constexpr int kMaxDims = 6;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) { assign(dims.begin(), dims.end()); }
  explicit Shape(const std::vector<int64_t>& dims) { assign(dims.begin(), dims.end()); }

  int ndim() const { return ndim_; }
  int64_t operator[](int i) const { return dims_[static_cast<size_t>(wrap(i))]; }
  int64_t& operator[](int i) { return dims_[static_cast<size_t>(wrap(i))]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim_; ++i) n *= dims_[static_cast<size_t>(i)];
    return n;
  }
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + ndim_; }
  std::vector<int64_t> vec() const { return {begin(), end()}; }
  void push_back(int64_t d) {
    TUTTI_CHECK_AS(InvalidArgument, ndim_ < kMaxDims, "tensors have at most ", kMaxDims, " dimensions");
    dims_[static_cast<size_t>(ndim_++)] = d;
  }
  bool operator==(const Shape& o) const {
    if (ndim_ != o.ndim_) return false;
    for (int i = 0; i < ndim_; ++i)
      if (dims_[static_cast<size_t>(i)] != o.dims_[static_cast<size_t>(i)]) return false;
    return true;
  }
  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < ndim_; ++i) s += (i ? ", " : "") + std::to_string(dims_[static_cast<size_t>(i)]);
    return s + ")";
  }
  // Resolves a possibly negative dimension index against this shape.
  int wrap(int i) const {
    int j = i < 0 ? i + ndim_ : i;
    TUTTI_CHECK_AS(InvalidArgument, j >= 0 && j < ndim_, "dimension ", i, " out of range for shape ", str());
    return j;
  }

 private:
  template <class It>
  void assign(It first, It last) {
    for (; first != last; ++first) {
      TUTTI_CHECK_AS(InvalidArgument, *first >= -1, "negative dimension ", *first);  // -1: inferred by view
      push_back(*first);
    }
  }
  std::array<int64_t, kMaxDims> dims_{};
  int ndim_ = 0;
};

using Strides = Shape;

inline Strides contiguous_strides(const Shape& shape) {
  Strides s = shape;
  int64_t step = 1;
  for (int i = shape.ndim() - 1; i >= 0; --i) {
    s[i] = step;
    step *= shape[i];
  }
  return s;
}

}  // namespace tutti
