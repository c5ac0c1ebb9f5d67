// Tensor parallelism under `mpirun -np N` (CTest: N = 2, 3, 4), the whole world one tp group:
// the split GPT's loss and gradients against the whole model computed on every rank by itself.
#include <gtest/gtest.h>

#include <map>

#include "mpi_test_main.hpp"
#include "test_util.hpp"
#include "tutti/nn/gpt.hpp"
#include "tutti/parallel/tensor_parallel.hpp"

using namespace tutti;
using namespace tutti::test;

namespace {

comm::Communicator* g_world = nullptr;

// Heads, dim and vocabulary divisible by 2, 3 and 4.
nn::GPTConfig tiny() {
  nn::GPTConfig c;
  c.n_layer = 2;
  c.n_head = 12;
  c.n_embd = 24;
  c.block_size = 8;
  c.vocab_size = 60;
  return c;
}

std::map<std::string, Tensor> by_name(const nn::Module& m) {
  std::map<std::string, Tensor> out;
  for (auto& [name, t] : m.named_parameters()) out.emplace(name, t);
  return out;
}

TEST(TensorSplit, ShardsJoinBack) {
  Rng rng(5);
  const Tensor full = rand_tensor(rng, {6, 24});
  for (parallel::TensorSplit split : {parallel::TensorSplit{0, 1}, {1, 3}, {1, 1}, {}}) {
    std::vector<Tensor> shards;
    for (int r = 0; r < 2; ++r) shards.push_back(parallel::take_shard(full, split, r, 2));
    EXPECT_EQ(parallel::join_shards(shards, split).to_vector<float>(), full.to_vector<float>());
  }
  // q | k | v: rank 1 of 2 holds the second half of each third.
  const Tensor qkv = Tensor::from_vector({6}, std::vector<float>{0, 1, 2, 3, 4, 5});
  EXPECT_EQ(parallel::take_shard(qkv, {0, 3}, 1, 2).to_vector<float>(), (std::vector<float>{1, 3, 5}));
}

TEST(TensorParallelGPT, LossAndGradientsMatchTheWholeModel) {
  comm::Communicator& world = *g_world;
  const nn::GPTConfig cfg = tiny();
  nn::GPT whole(cfg);
  nn::GPTPartition part;
  part.tp = &world;
  nn::GPT split(cfg, part);
  Rng a(11), b(11);
  whole.init_weights(a);
  split.init_weights(b);
  Rng data(3);
  const Tensor idx = rand_ints(data, {3, 8}, cfg.vocab_size), targets = rand_ints(data, {3, 8}, cfg.vocab_size);

  Tensor loss_whole = whole.loss(idx, targets), loss_split = split.loss(idx, targets);
  EXPECT_NEAR(loss_split.item(), loss_whole.item(), 1e-5 * std::abs(loss_whole.item()));
  loss_whole.backward();
  loss_split.backward();

  const auto full = by_name(whole);
  for (auto& [name, param] : split.named_parameters()) {
    const parallel::TensorSplit how = nn::GPT::split_of(name);
    const Tensor want_value = parallel::take_shard(full.at(name), how, world.rank(), world.size());
    EXPECT_EQ(param.to_vector<float>(), want_value.to_vector<float>()) << name << ": initial shard differs";
    const Tensor want_grad = parallel::take_shard(full.at(name).grad(), how, world.rank(), world.size());
    ASSERT_TRUE(param.grad().defined()) << name;
    EXPECT_TRUE(all_close(param.grad(), to_f64(want_grad), 1e-4, 1e-6 * max_abs(to_f64(want_grad)) + 1e-7)) << name;
    if (how.replicated()) {  // bitwise the same on every rank of the group
      std::vector<float> hi = param.grad().to_vector<float>(), lo = hi;
      world.all_reduce(std::span<float>(hi), comm::ReduceOp::max)->wait();
      world.all_reduce(std::span<float>(lo), comm::ReduceOp::min)->wait();
      EXPECT_EQ(hi, lo) << name << ": a replicated gradient differs between ranks";
    }
  }
}

TEST(TensorParallelGPT, IndivisibleHeadsOrVocabularyAreOneClearError) {
  comm::Communicator& world = *g_world;
  nn::GPTPartition part;
  part.tp = &world;
  nn::GPTConfig heads = tiny();
  heads.n_head = 1;  // 1 head over >= 2 ranks
  heads.n_embd = 24;
  try {
    nn::GPT m(heads, part);
    FAIL() << "1 head split over " << world.size() << " ranks was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("does not divide the 1 heads"), std::string::npos) << e.what();
  }
  nn::GPTConfig vocab = tiny();
  vocab.vocab_size = 61;
  try {
    nn::GPT m(vocab, part);
    FAIL() << "vocabulary 61 split over " << world.size() << " ranks was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("does not divide the vocabulary of 61"), std::string::npos) << e.what();
  }
}

}  // namespace

int main(int argc, char** argv) {
  return tutti::test::mpi_test_main(argc, argv, "tensor_parallel_mpi_test", g_world);
}
