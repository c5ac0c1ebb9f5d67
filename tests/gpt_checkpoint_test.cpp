// GPT checkpoints in the Hugging Face layout: save/load round trips (same parameters, same
// logits, same tensor handles), the files transformers expects, and the rejection of checkpoints
// that do not fit the model (shapes, missing or extra tensors, dtypes, configs).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tutti/ckpt/gpt_checkpoint.hpp"
#include "tutti/ckpt/safetensors.hpp"

using namespace tutti;
namespace fs = std::filesystem;
using Named = std::vector<std::pair<std::string, Tensor>>;

namespace {

// ============================================================================================
// Helpers
// ============================================================================================

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "tutti_gptckpt_XXXXXX").string();
    TUTTI_CHECK(::mkdtemp(pattern.data()) != nullptr, "mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

nn::GPTConfig tiny_config() {
  nn::GPTConfig c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 16;
  c.block_size = 8;
  c.vocab_size = 32;
  return c;
}

// Every parameter random (init_weights would leave biases zero and LayerNorms one, which a
// round trip could get right by accident).
void randomize(nn::GPT& model, uint64_t seed) {
  Rng rng(seed);
  for (auto& [name, t] : model.named_parameters()) nn::normal_(t, 0.2f, rng);
}

std::unique_ptr<nn::GPT> random_model(const nn::GPTConfig& c, uint64_t seed) {
  auto model = std::make_unique<nn::GPT>(c);
  randomize(*model, seed);
  return model;
}

Tensor sample_tokens(const nn::GPTConfig& c) {
  std::vector<int32_t> ids;
  for (int i = 0; i < 2 * c.block_size; ++i) ids.push_back((7 * i + 3) % c.vocab_size);
  return Tensor::from_vector({2, c.block_size}, ids);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void write_json(const std::string& path, const nlohmann::json& j) { std::ofstream(path) << j.dump(2); }

// Rewrites a checkpoint's model.safetensors after `edit` changed its tensor list.
template <class Edit>
void edit_weights(const std::string& dir, Edit&& edit) {
  const std::string path = dir + "/model.safetensors";
  ckpt::SafetensorsFile file = ckpt::read_safetensors(path);
  edit(file.tensors);
  ckpt::write_safetensors(path, file.tensors, file.metadata);
}

// Expects a CheckpointError whose message contains every one of `parts`.
template <class F>
void expect_checkpoint_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected a CheckpointError";
  } catch (const CheckpointError& e) {
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "message: " << e.what() << "\nmissing: " << p;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a CheckpointError: " << e.what();
  }
}

std::vector<std::vector<float>> values_of(const nn::GPT& model) {
  std::vector<std::vector<float>> out;
  for (auto& [name, t] : model.named_parameters()) out.push_back(t.to_vector<float>());
  return out;
}

}  // namespace

// ============================================================================================
// Round trips and the files written
// ============================================================================================

TEST(GptCheckpoint, RoundTripGivesIdenticalParametersAndLogits) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt/step_000010");  // nested, created by save_gpt
  const nn::GPTConfig c = tiny_config();
  auto saved = random_model(c, 1);
  ckpt::save_gpt(dir, *saved);

  const nn::GPTConfig loaded_config = ckpt::load_gpt_config(dir);
  EXPECT_EQ(loaded_config.n_layer, c.n_layer);
  EXPECT_EQ(loaded_config.n_head, c.n_head);
  EXPECT_EQ(loaded_config.n_embd, c.n_embd);
  EXPECT_EQ(loaded_config.block_size, c.block_size);
  EXPECT_EQ(loaded_config.vocab_size, c.vocab_size);
  EXPECT_EQ(loaded_config.layer_norm_epsilon, c.layer_norm_epsilon);

  nn::GPT loaded(loaded_config);
  randomize(loaded, 2);
  const Named before = loaded.named_parameters();
  ckpt::load_gpt_weights(dir, loaded);

  const Named after = loaded.named_parameters();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    EXPECT_TRUE(after[i].second.same(before[i].second)) << after[i].first << " was replaced, not copied into";
    EXPECT_TRUE(after[i].second.requires_grad()) << after[i].first;
  }
  EXPECT_EQ(values_of(loaded), values_of(*saved));

  const Tensor idx = sample_tokens(c);
  EXPECT_EQ(loaded.forward(idx).to_vector<float>(), saved->forward(idx).to_vector<float>());
}

TEST(GptCheckpoint, WritesWhatTransformersReads) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  nn::GPTConfig c = tiny_config();
  auto model = random_model(c, 3);
  ckpt::save_gpt(dir, *model);

  const nlohmann::json j = read_json(dir + "/config.json");
  EXPECT_EQ(j["model_type"], "gpt2");
  EXPECT_EQ(j["architectures"], nlohmann::json::array({"GPT2LMHeadModel"}));
  EXPECT_EQ(j["n_layer"], 2);
  EXPECT_EQ(j["n_head"], 2);
  EXPECT_EQ(j["n_embd"], 16);
  EXPECT_EQ(j["n_positions"], 8);
  EXPECT_EQ(j["n_ctx"], 8);
  EXPECT_EQ(j["vocab_size"], 32);
  EXPECT_EQ(j["bos_token_id"], 31);
  EXPECT_EQ(j["eos_token_id"], 31);
  EXPECT_TRUE(j["n_inner"].is_null());
  EXPECT_EQ(j["activation_function"], "gelu_new");
  EXPECT_EQ(j["layer_norm_epsilon"].get<double>(), 1e-5);  // written 1e-05, not 9.99999974737875e-06
  EXPECT_EQ(j["tie_word_embeddings"], true);
  EXPECT_EQ(j["scale_attn_weights"], true);
  EXPECT_EQ(j["torch_dtype"], "float32");
  for (const char* key : {"resid_pdrop", "embd_pdrop", "attn_pdrop"}) EXPECT_EQ(j[key].get<double>(), 0.0) << key;

  const ckpt::SafetensorsFile file = ckpt::read_safetensors(dir + "/model.safetensors");
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  std::set<std::string> names;
  for (const auto& [name, t] : file.tensors) {
    names.insert(name);
    EXPECT_EQ(t.dtype(), DType::f32) << name;
  }
  std::set<std::string> expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                                    "transformer.ln_f.bias"};
  for (int l = 0; l < 2; ++l) {
    const std::string h = "transformer.h." + std::to_string(l) + ".";
    for (const char* p : {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                          "mlp.c_proj.weight", "mlp.c_proj.bias"})
      expected.insert(h + p);
  }
  EXPECT_EQ(names, expected);  // no lm_head.weight: tied to wte
  for (const auto& [name, t] : file.tensors) {  // Conv1D layout (in, out)
    if (name == "transformer.h.0.attn.c_attn.weight") EXPECT_EQ(t.shape(), (Shape{16, 48}));
    if (name == "transformer.h.0.mlp.c_fc.weight") EXPECT_EQ(t.shape(), (Shape{16, 64}));
    if (name == "transformer.h.0.mlp.c_proj.weight") EXPECT_EQ(t.shape(), (Shape{64, 16}));
    if (name == "transformer.wte.weight") EXPECT_EQ(t.shape(), (Shape{32, 16}));
  }
}

TEST(GptCheckpoint, SavingAgainOverwrites) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  auto first = random_model(tiny_config(), 4);
  auto second = random_model(tiny_config(), 5);
  ckpt::save_gpt(dir, *first);
  ckpt::save_gpt(dir, *second);
  nn::GPT loaded(tiny_config());
  ckpt::load_gpt_weights(dir, loaded);
  EXPECT_EQ(values_of(loaded), values_of(*second));
  std::set<std::string> entries;
  for (const auto& e : fs::directory_iterator(dir)) entries.insert(e.path().filename().string());
  EXPECT_EQ(entries, (std::set<std::string>{"config.json", "model.safetensors"}));
}

// ============================================================================================
// Names as transformers writes them
// ============================================================================================

TEST(GptCheckpoint, AcceptsNamesWithoutPrefixAndIgnoresBuffersAndHead) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  auto saved = random_model(tiny_config(), 6);
  ckpt::save_gpt(dir, *saved);
  edit_weights(dir, [&](Named& tensors) {
    Tensor wte;
    for (auto& [name, t] : tensors) {
      if (name == "transformer.wte.weight") wte = t;
      if (name.rfind("transformer.h.1.", 0) == 0 || name == "transformer.wte.weight")
        name = name.substr(std::string("transformer.").size());
    }
    tensors.emplace_back("lm_head.weight", wte.clone());
    tensors.emplace_back("transformer.h.0.attn.bias", Tensor::zeros({1, 1, 8, 8}));
    tensors.emplace_back("h.1.attn.masked_bias", Tensor::full({}, -1e4f));
  });
  nn::GPT loaded(tiny_config());
  ckpt::load_gpt_weights(dir, loaded);
  EXPECT_EQ(values_of(loaded), values_of(*saved));
}

// ============================================================================================
// Checkpoints that do not fit the model
// ============================================================================================

TEST(GptCheckpoint, ShapeMismatchIsRejectedAndModelUntouched) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  ckpt::save_gpt(dir, *random_model(tiny_config(), 7));

  nn::GPTConfig wider = tiny_config();
  wider.n_embd = 32;
  auto model = random_model(wider, 8);
  const auto before = values_of(*model);
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, *model); },
                          {"model.safetensors", "transformer.wte.weight", "(32, 16)", "(32, 32)"});
  EXPECT_EQ(values_of(*model), before);

  nn::GPTConfig deeper = tiny_config();
  deeper.n_layer = 3;
  auto deep = random_model(deeper, 9);
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, *deep); },
                          {"12 parameter(s) missing", "'transformer.h.2.ln_1.weight'", "and 4 more"});

  nn::GPTConfig shallower = tiny_config();
  shallower.n_layer = 1;
  auto shallow = random_model(shallower, 10);
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, *shallow); },
                          {"12 tensor(s) the model does not have", "transformer.h.1."});
}

TEST(GptCheckpoint, MissingAndExtraTensors) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  auto saved = random_model(tiny_config(), 11);
  ckpt::save_gpt(dir, *saved);
  nn::GPT model(tiny_config());

  edit_weights(dir, [](Named& tensors) {
    std::erase_if(tensors, [](const auto& nt) { return nt.first == "transformer.h.1.mlp.c_fc.bias"; });
  });
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, model); },
                          {"1 parameter(s) missing: 'transformer.h.1.mlp.c_fc.bias'"});

  ckpt::save_gpt(dir, *saved);
  edit_weights(dir, [](Named& tensors) { tensors.emplace_back("transformer.h.0.mlp.gate.weight", Tensor::zeros({2})); });
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, model); },
                          {"1 tensor(s) the model does not have: 'transformer.h.0.mlp.gate.weight'"});

  ckpt::save_gpt(dir, *saved);
  edit_weights(dir, [](Named& tensors) { tensors.emplace_back("h.9.attn.bias.extra", Tensor::zeros({2})); });
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, model); }, {"'h.9.attn.bias.extra'"});

  ckpt::save_gpt(dir, *saved);
  edit_weights(dir, [](Named& tensors) {
    Tensor ln_f = tensors.back().second;  // both spellings of one parameter
    tensors.emplace_back("ln_f.bias", ln_f.clone());
  });
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, model); },
                          {"'transformer.ln_f.bias' and 'ln_f.bias' both name the parameter 'ln_f.bias'"});

  fs::remove(dir + "/model.safetensors");
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, model); }, {"model.safetensors", "cannot open"});
}

TEST(GptCheckpoint, NonF32WeightsAreRejected) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  ckpt::save_gpt(dir, *random_model(tiny_config(), 12));
  edit_weights(dir, [](Named& tensors) {
    for (auto& [name, t] : tensors)
      if (name == "transformer.ln_f.weight") t = Tensor::zeros(t.shape(), DType::bf16);
  });
  nn::GPT model(tiny_config());
  expect_checkpoint_error([&] { ckpt::load_gpt_weights(dir, model); },
                          {"'transformer.ln_f.weight' has dtype bf16", "f32"});
}

// ============================================================================================
// config.json
// ============================================================================================

TEST(GptCheckpoint, MissingOrBrokenConfig) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  fs::create_directories(dir);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {dir + "/config.json", "not found"});
  expect_checkpoint_error([&] { ckpt::load_gpt_config(tmp.sub("nowhere")); }, {"config.json"});

  std::ofstream(dir + "/config.json") << "{\"model_type\": \"gpt2\", ";
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"config.json", "not valid JSON"});
  std::ofstream(dir + "/config.json") << "[1]";
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"expected a JSON object"});
}

TEST(GptCheckpoint, ConfigValuesAreChecked) {
  TempDir tmp;
  const std::string dir = tmp.sub("ckpt");
  ckpt::save_gpt(dir, *random_model(tiny_config(), 13));
  const nlohmann::json good = read_json(dir + "/config.json");
  const std::string path = dir + "/config.json";
  auto with = [&](const char* key, const nlohmann::json& value) {
    nlohmann::json j = good;
    if (value.is_discarded()) {
      j.erase(key);
    } else {
      j[key] = value;
    }
    write_json(path, j);
  };
  const nlohmann::json erase = nlohmann::json(nlohmann::json::value_t::discarded);

  with("model_type", "llama");
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {path, "\"model_type\" is \"llama\""});
  with("model_type", erase);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"missing \"model_type\""});
  with("n_layer", erase);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"missing \"n_layer\""});
  with("n_head", 3);  // does not divide 16: GPTConfig::validate's ConfigError, rewrapped
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {path, "heads (3) must divide dim (16)"});
  with("n_embd", "16");
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"n_embd\" is \"16\", expected an integer"});
  with("vocab_size", 1e12);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"vocab_size\""});
  with("vocab_size", 4294967296LL);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"vocab_size\" is 4294967296, out of range"});
  with("n_positions", -1);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"context must be positive"});
  with("layer_norm_epsilon", "small");
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"layer_norm_epsilon\""});
  with("activation_function", "relu");
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"activation_function\": \"relu\" is not supported"});
  with("n_inner", 48);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"n_inner\": 48 is not supported"});
  with("tie_word_embeddings", false);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"\"tie_word_embeddings\": false"});
  with("scale_attn_by_inverse_layer_idx", true);
  expect_checkpoint_error([&] { ckpt::load_gpt_config(dir); }, {"scale_attn_by_inverse_layer_idx"});
  with("n_inner", 64);  // explicit 4 * n_embd is fine
  EXPECT_EQ(ckpt::load_gpt_config(dir).n_embd, 16);
}

// A config.json as transformers' save_pretrained writes it (this one: 4.x keys of the released
// gpt2 model plus the 5.x "dtype", "pad_token_id" and "add_cross_attention"), with keys tutti
// does not use.
TEST(GptCheckpoint, ReadsTransformersConfig) {
  TempDir tmp;
  const std::string dir = tmp.sub("hf");
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({
  "activation_function": "gelu_new",
  "add_cross_attention": false,
  "architectures": ["GPT2LMHeadModel"],
  "dtype": "float32",
  "pad_token_id": null,
  "attn_pdrop": 0.1,
  "bos_token_id": 50256,
  "embd_pdrop": 0.1,
  "eos_token_id": 50256,
  "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2",
  "n_embd": 768,
  "n_head": 12,
  "n_inner": null,
  "n_layer": 12,
  "n_positions": 1024,
  "reorder_and_upcast_attn": false,
  "resid_pdrop": 0.1,
  "scale_attn_by_inverse_layer_idx": false,
  "scale_attn_weights": true,
  "summary_activation": null,
  "summary_first_dropout": 0.1,
  "summary_proj_to_labels": true,
  "summary_type": "cls_index",
  "summary_use_proj": true,
  "torch_dtype": "float32",
  "transformers_version": "4.44.0",
  "use_cache": true,
  "vocab_size": 50257
})";
  const nn::GPTConfig c = ckpt::load_gpt_config(dir);
  EXPECT_EQ(c.n_layer, 12);
  EXPECT_EQ(c.n_head, 12);
  EXPECT_EQ(c.n_embd, 768);
  EXPECT_EQ(c.block_size, 1024);
  EXPECT_EQ(c.vocab_size, 50257);
  EXPECT_EQ(c.layer_norm_epsilon, 1e-5f);
}
