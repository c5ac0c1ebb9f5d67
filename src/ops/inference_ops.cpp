// Ops used only for inference (they record nothing on the tape).
#include "backend/backend.hpp"
#include "tutti/ops/ops.hpp"

namespace tutti::ops {

Tensor cached_attention(const Tensor& q_in, const Tensor& k, const Tensor& v, int64_t past, int n_head) {
  TUTTI_CHECK_AS(InvalidArgument, q_in.ndim() == 2 && k.ndim() == 2 && v.shape() == k.shape(),
                 "cached_attention: q (n, C) and caches (L, C) expected, got ", q_in.str(), ", ", k.str(), ", ",
                 v.str());
  const int64_t n = q_in.size(0), C = q_in.size(1);
  TUTTI_CHECK_AS(InvalidArgument, k.size(1) == C && k.is_contiguous() && v.is_contiguous(),
                 "cached_attention: caches ", k.str(), " do not match q ", q_in.str());
  TUTTI_CHECK_AS(InvalidArgument, past >= 0 && past + n <= k.size(0), "cached_attention: positions [", past, ", ",
                 past + n, ") exceed the cache of ", k.size(0));
  TUTTI_CHECK_AS(InvalidArgument, n_head > 0 && C % n_head == 0, "cached_attention: ", n_head,
                 " heads do not divide ", C);
  const Tensor q = q_in.contiguous();
  Tensor y = Tensor::empty({n, C}, DType::f32, q.device());
  backend_for(q.device())
      .attention_decode(q.data<float>(), k.data<float>(), v.data<float>(), y.data<float>(), n, past, C, n_head);
  return y;
}

}  // namespace tutti::ops
