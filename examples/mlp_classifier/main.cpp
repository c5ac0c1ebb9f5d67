// A model of one's own on tutti: a two-layer MLP that learns to tell three interleaved spirals
// apart, on points it generates itself. Uses only the public headers (include/tutti/).
//
//   mlp_classifier [--threads N]   exits 0 when test accuracy reaches 90%
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tutti/tutti.hpp"

using namespace tutti;

// Points (x, y) on `classes` spiral arms with noise; labels are the arm.
struct Dataset {
  Tensor points;  // (N, 2) f32
  Tensor labels;  // (N) i32
};

Dataset make_spirals(int per_class, int classes, Rng& rng) {
  std::vector<float> xy;
  std::vector<int32_t> labels;
  for (int c = 0; c < classes; ++c) {
    for (int i = 0; i < per_class; ++i) {
      const double r = double(i) / per_class;
      const double angle = c * 2.0 * M_PI / classes + r * 4.0 + rng.normal() * 0.15;
      xy.push_back(static_cast<float>(r * std::sin(angle)));
      xy.push_back(static_cast<float>(r * std::cos(angle)));
      labels.push_back(c);
    }
  }
  const int64_t n = int64_t(per_class) * classes;
  return {Tensor::from_vector({n, 2}, xy), Tensor::from_vector({n}, labels)};
}

class Mlp : public nn::Module {
 public:
  Mlp(int64_t in, int64_t hidden, int64_t out) : fc1_(in, hidden), fc2_(hidden, hidden), head_(hidden, out) {
    register_module("fc1", fc1_);
    register_module("fc2", fc2_);
    register_module("head", head_);
  }
  void init(Rng& rng) {
    for (nn::Linear* l : {&fc1_, &fc2_, &head_}) {
      const float bound = 1.0f / std::sqrt(static_cast<float>(l->weight.size(0)));
      nn::uniform_(l->weight, -bound, bound, rng);
      nn::uniform_(l->bias, -bound, bound, rng);
    }
  }
  Tensor forward(const Tensor& x) const {  // (N, in) -> (N, out) logits
    return head_.forward(ops::relu(fc2_.forward(ops::relu(fc1_.forward(x)))));
  }

 private:
  nn::Linear fc1_, fc2_, head_;
};

double accuracy(const Mlp& model, const Dataset& data) {
  NoGradGuard no_grad;
  const std::vector<float> logits = model.forward(data.points).to_vector<float>();
  const std::vector<int32_t> labels = data.labels.to_vector<int32_t>();
  const size_t classes = logits.size() / labels.size();
  int correct = 0;
  for (size_t i = 0; i < labels.size(); ++i) {
    size_t best = 0;
    for (size_t c = 1; c < classes; ++c)
      if (logits[i * classes + c] > logits[i * classes + best]) best = c;
    correct += static_cast<int>(best) == labels[i];
  }
  return double(correct) / double(labels.size());
}

int main(int argc, char** argv) {
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--threads N]\n", argv[0]);
      return 2;
    }
  }
  try {
    if (threads > 0) set_num_threads(threads);
    Rng rng(7);
    const int classes = 3;
    Dataset train = make_spirals(300, classes, rng), test = make_spirals(100, classes, rng);
    Mlp model(2, 64, classes);
    model.init(rng);
    optim::AdamW optimizer(model.named_parameters(), {.lr = 1e-2f, .weight_decay = 0.0f});
    for (int step = 1; step <= 600; ++step) {
      Tensor loss = ops::cross_entropy(model.forward(train.points), train.labels);
      optimizer.zero_grad();
      loss.backward();
      optimizer.step(1e-2f);
      if (step % 100 == 0) std::printf("step %4d  loss %.4f  train accuracy %.3f\n", step, loss.item(), accuracy(model, train));
    }
    const double acc = accuracy(model, test);
    std::printf("test accuracy %.3f (%lld parameters)\n", acc, static_cast<long long>(model.num_parameters()));
    return acc >= 0.9 ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "mlp_classifier: error: %s\n", e.what());
    return 1;
  }
}
