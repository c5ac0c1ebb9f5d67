#include <gtest/gtest.h>

#include "tutti/core/tensor.hpp"

using namespace tutti;

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector({2, 3}, std::vector<float>{0, 1, 2, 3, 4, 5});
  Tensor tt = t.transpose(0, 1);
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.contiguous().to_vector<float>(), (std::vector<float>{0, 3, 1, 4, 2, 5}));
  Tensor s = t.slice(1, 1, 3);
  EXPECT_EQ(s.contiguous().to_vector<float>(), (std::vector<float>{1, 2, 4, 5}));
  t.data<float>()[1] = 10.0f;
  EXPECT_EQ(s.contiguous().to_vector<float>()[0], 10.0f);
  EXPECT_EQ(t.view({3, -1}).shape(), (Shape{3, 2}));
  EXPECT_THROW(t.view({4, 2}), InvalidArgument);
  EXPECT_THROW(tt.view({6}), InvalidArgument);
}
