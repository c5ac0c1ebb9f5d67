// GPT checkpoints in the Hugging Face layout, so that GPT2LMHeadModel.from_pretrained(dir) loads
// what tutti saves and tutti loads what transformers saves. The model's parameter names already
// match GPT2LMHeadModel's state dict without the "transformer." prefix, and Linear stores its
// weight (in, out) like HF's Conv1D, so tensors are written as they are.
#include "tutti/ckpt/gpt_checkpoint.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string_view>

#include <nlohmann/json.hpp>

#include "tutti/ckpt/safetensors.hpp"
#include "tutti/core/error.hpp"

namespace tutti::ckpt {

namespace {

using Json = nlohmann::ordered_json;
namespace fs = std::filesystem;

constexpr std::string_view kPrefix = "transformer.";
constexpr const char* kIndexFile = "model.safetensors.index.json";

std::string join(const std::string& dir, const char* name) { return (fs::path(dir) / name).string(); }

// The shortest decimal that reads back as the same float (1e-5f is written 1e-05, not
// 9.99999974737875e-06), so config.json looks as a person or transformers would write it.
double shortest_decimal(float value) {
  char buf[32];
  const auto result = std::to_chars(buf, buf + sizeof(buf), value);
  return std::stod(std::string(buf, result.ptr));
}

// config.json as transformers' GPT2Config writes it (the keys it reads; the rest take its defaults).
Json config_json(const nn::GPTConfig& c) {
  Json j = Json::object();
  j["model_type"] = "gpt2";
  j["architectures"] = Json::array({"GPT2LMHeadModel"});
  j["n_layer"] = c.n_layer;
  j["n_head"] = c.n_head;
  j["n_embd"] = c.n_embd;
  j["n_positions"] = c.block_size;
  j["n_ctx"] = c.block_size;
  j["vocab_size"] = c.vocab_size;
  j["n_inner"] = nullptr;  // 4 * n_embd
  j["layer_norm_epsilon"] = shortest_decimal(c.layer_norm_epsilon);
  j["activation_function"] = "gelu_new";
  j["resid_pdrop"] = 0.0;
  j["embd_pdrop"] = 0.0;
  j["attn_pdrop"] = 0.0;
  j["initializer_range"] = 0.02;
  j["tie_word_embeddings"] = true;
  j["bos_token_id"] = c.vocab_size - 1;
  j["eos_token_id"] = c.vocab_size - 1;
  j["scale_attn_weights"] = true;
  j["use_cache"] = true;
  j["torch_dtype"] = "float32";
  return j;
}

std::string read_text(const std::string& path) {
  std::error_code ec;
  TUTTI_CHECK_AS(CheckpointError, fs::exists(path, ec), path, ": not found");
  TUTTI_CHECK_AS(CheckpointError, fs::is_regular_file(path, ec), path, ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  TUTTI_CHECK_AS(CheckpointError, in.good(), path, ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  TUTTI_CHECK_AS(CheckpointError, !in.bad(), path, ": read failed");
  return text.str();
}

// A required or optional integer field of config.json that fits an int.
int int_field(const std::string& path, const Json& j, const char* key) {
  TUTTI_CHECK_AS(CheckpointError, j.contains(key), path, ": missing \"", key, "\"");
  const Json& v = j[key];
  TUTTI_CHECK_AS(CheckpointError, v.is_number_integer(), path, ": \"", key, "\" is ", v.dump(), ", expected an integer");
  const bool fits = v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(INT_MAX)
                                           : v.get<int64_t>() >= INT_MIN && v.get<int64_t>() <= INT_MAX;
  TUTTI_CHECK_AS(CheckpointError, fits, path, ": \"", key, "\" is ", v.dump(), ", out of range");
  return static_cast<int>(v.get<int64_t>());
}

// A boolean option of GPT2Config that tutti's model supports only at one value.
void require_flag(const std::string& path, const Json& j, const char* key, bool supported, const char* why) {
  if (!j.contains(key) || j[key].is_null()) return;  // GPT2Config's default, which tutti matches
  const Json& v = j[key];
  TUTTI_CHECK_AS(CheckpointError, v.is_boolean(), path, ": \"", key, "\" is ", v.dump(), ", expected true or false");
  TUTTI_CHECK_AS(CheckpointError, v.get<bool>() == supported, path, ": \"", key, "\": ", v.dump(),
                 " is not supported (", why, ")");
}

// Rejects GPT2Config options under which transformers computes something tutti's GPT does not.
void check_supported_options(const std::string& path, const Json& j, const nn::GPTConfig& c) {
  if (j.contains("activation_function")) {
    const Json& act = j["activation_function"];
    const bool tanh_gelu = act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast";
    TUTTI_CHECK_AS(CheckpointError, tanh_gelu, path, ": \"activation_function\": ", act.dump(),
                   " is not supported (tutti's GPT uses the tanh GELU, \"gelu_new\")");
  }
  if (j.contains("n_inner") && !j["n_inner"].is_null()) {
    const int n_inner = int_field(path, j, "n_inner");
    TUTTI_CHECK_AS(CheckpointError, n_inner == 4 * c.n_embd, path, ": \"n_inner\": ", n_inner,
                   " is not supported (tutti's MLP is 4 * n_embd = ", 4 * c.n_embd, " wide)");
  }
  require_flag(path, j, "tie_word_embeddings", true, "the LM head is tied to wte");
  require_flag(path, j, "scale_attn_weights", true, "attention is scaled by 1/sqrt(head_dim)");
  require_flag(path, j, "scale_attn_by_inverse_layer_idx", false, "no per-layer attention scaling");
  require_flag(path, j, "add_cross_attention", false, "decoder-only model");
}

// "h.<digits>.attn.bias" and "h.<digits>.attn.masked_bias": causal-mask buffers older
// transformers versions saved with the weights; they hold no learned values.
bool is_attention_buffer(const std::string& name) {
  if (name.rfind("h.", 0) != 0) return false;
  size_t i = 2;
  const size_t digits_start = i;
  while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i]))) ++i;
  if (i == digits_start) return false;
  const std::string_view rest = std::string_view(name).substr(i);
  return rest == ".attn.bias" || rest == ".attn.masked_bias";
}

std::string list_names(const std::vector<std::string>& names) {
  constexpr size_t kShown = 8;
  std::string out;
  for (size_t i = 0; i < names.size() && i < kShown; ++i) out += (i ? ", '" : "'") + names[i] + "'";
  if (names.size() > kShown) out += " and " + std::to_string(names.size() - kShown) + " more";
  return out;
}

}  // namespace

// ============================================================================================
// Saving
// ============================================================================================

void save_gpt_config(const std::string& dir, const nn::GPTConfig& config) {
  write_file_atomic(join(dir, "config.json"), config_json(config).dump(2) + "\n");
}

std::string shard_file_name(const std::string& stem, int shard, int shards) {
  if (shards == 1) return stem + ".safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "-%05d-of-%05d.safetensors", shard + 1, shards);
  return stem + buf;
}

void write_gpt_tensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& parameters) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (auto& [name, t] : parameters) tensors.emplace_back(std::string(kPrefix) + name, t);
  write_safetensors(path, tensors, {{"format", "pt"}});
}

void write_gpt_index(const std::string& dir, const std::vector<std::string>& files) {
  Json map = Json::object();
  uint64_t total = 0;
  for (const std::string& file : files)
    for (auto& [name, t] : read_safetensors(join(dir, file.c_str())).tensors) {
      map[name] = file;
      total += t.nbytes();
    }
  Json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
  write_file_atomic(join(dir, kIndexFile), index.dump(2) + "\n");
}

std::vector<std::pair<std::string, Tensor>> read_gpt_tensors(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(join(dir, kIndexFile), ec)) return read_safetensors(join(dir, "model.safetensors")).tensors;
  const std::string index_path = join(dir, kIndexFile);
  std::vector<std::string> files;
  try {
    const Json index = Json::parse(read_text(index_path));
    for (auto& [name, file] : index.at("weight_map").items()) {
      const std::string f = file.get<std::string>();
      TUTTI_CHECK_AS(CheckpointError, !f.empty() && f.find('/') == std::string::npos && f != "." && f != "..",
                     index_path, ": tensor '", name, "' is in '", f, "', not a file of the checkpoint directory");
      if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
    }
  } catch (const Json::exception& e) {
    TUTTI_FAIL(CheckpointError, index_path, ": not a model index: ", e.what());
  }
  std::vector<std::pair<std::string, Tensor>> all;
  for (const std::string& f : files)
    for (auto& named : read_safetensors(join(dir, f.c_str())).tensors) all.push_back(std::move(named));
  return all;
}

void save_gpt(const std::string& dir, const nn::GPT& model) {
  save_gpt(dir, model.config(), model.named_parameters());
}

void save_gpt(const std::string& dir, const nn::GPTConfig& config,
              const std::vector<std::pair<std::string, Tensor>>& parameters) {
  std::error_code ec;
  const bool created = fs::create_directories(dir, ec);
  TUTTI_CHECK_AS(CheckpointError, !ec, dir, ": cannot create the checkpoint directory: ", ec.message());
  TUTTI_CHECK_AS(CheckpointError, fs::is_directory(dir, ec), dir, ": exists and is not a directory");

  save_gpt_config(dir, config);
  write_gpt_tensors(join(dir, "model.safetensors"), parameters);

  // A new directory's own entry must be durable too.
  if (created) fsync_directory(fs::absolute(fs::path(dir)).lexically_normal().parent_path().string());
}

// ============================================================================================
// Loading
// ============================================================================================

nn::GPTConfig load_gpt_config(const std::string& dir) {
  const std::string path = join(dir, "config.json");
  const std::string text = read_text(path);
  Json j;
  try {
    j = Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    TUTTI_FAIL(CheckpointError, path, ": not valid JSON: ", e.what());
  }
  TUTTI_CHECK_AS(CheckpointError, j.is_object(), path, ": expected a JSON object, got a JSON ", j.type_name());
  TUTTI_CHECK_AS(CheckpointError, j.contains("model_type"), path, ": missing \"model_type\" (expected \"gpt2\")");
  TUTTI_CHECK_AS(CheckpointError, j["model_type"] == "gpt2", path, ": \"model_type\" is ", j["model_type"].dump(),
                 "; tutti loads only \"gpt2\"");

  nn::GPTConfig c;
  c.n_layer = int_field(path, j, "n_layer");
  c.n_head = int_field(path, j, "n_head");
  c.n_embd = int_field(path, j, "n_embd");
  c.block_size = int_field(path, j, "n_positions");
  c.vocab_size = int_field(path, j, "vocab_size");
  if (j.contains("layer_norm_epsilon")) {
    const Json& eps = j["layer_norm_epsilon"];
    TUTTI_CHECK_AS(CheckpointError, eps.is_number(), path, ": \"layer_norm_epsilon\" is ", eps.dump(),
                   ", expected a number");
    c.layer_norm_epsilon = eps.get<float>();
  }
  try {
    c.validate();
  } catch (const ConfigError& e) {
    TUTTI_FAIL(CheckpointError, path, ": ", e.what());
  }
  check_supported_options(path, j, c);
  return c;
}

void load_gpt_weights(const std::string& dir, nn::GPT& model) {
  const std::string path = join(dir, fs::exists(join(dir, kIndexFile)) ? kIndexFile : "model.safetensors");
  SafetensorsFile file{read_gpt_tensors(dir), {}};

  // The file must hold the whole model, whatever part of it this rank holds.
  std::map<std::string, Shape> expected;
  for (auto& [name, shape] : nn::GPT::full_parameter_shapes(model.config())) expected.emplace(name, shape);

  // Match every tensor of the file to a parameter before changing any, so a rejected checkpoint
  // leaves the model as it was.
  std::map<std::string, std::pair<std::string, Tensor>> found;  // parameter name -> (file name, tensor)
  std::vector<std::string> extra;
  for (auto& [file_name, t] : file.tensors) {
    std::string name = file_name;
    if (name.rfind(kPrefix, 0) == 0) name = name.substr(kPrefix.size());
    if (name == "lm_head.weight" || is_attention_buffer(name)) continue;  // tied to wte / causal mask
    auto want = expected.find(name);
    if (want == expected.end()) {
      extra.push_back(file_name);
      continue;
    }
    auto [previous, inserted] = found.emplace(name, std::make_pair(file_name, t));
    TUTTI_CHECK_AS(CheckpointError, inserted, path, ": tensors '", previous->second.first, "' and '", file_name,
                   "' both name the parameter '", name, "'");
    TUTTI_CHECK_AS(CheckpointError, t.dtype() == DType::f32, path, ": tensor '", file_name, "' has dtype ",
                   dtype_name(t.dtype()), "; tutti loads f32 weights only");
    TUTTI_CHECK_AS(CheckpointError, t.shape() == want->second, path, ": tensor '", file_name, "' has shape ",
                   t.shape().str(), " but the model's '", name, "' is ", want->second.str());
  }
  TUTTI_CHECK_AS(CheckpointError, extra.empty(), path, ": ", extra.size(),
                 " tensor(s) the model does not have: ", list_names(extra));
  std::vector<std::string> missing;
  for (const auto& [name, shape] : nn::GPT::full_parameter_shapes(model.config()))
    if (!found.count(name)) missing.push_back(std::string(kPrefix) + name);
  TUTTI_CHECK_AS(CheckpointError, missing.empty(), path, ": ", missing.size(), " parameter(s) missing: ",
                 list_names(missing));

  // In place, so optimizers and other holders of the parameter handles see the loaded values;
  // under tensor parallelism each rank takes its shard.
  comm::Communicator* tp = model.partition().tp;
  for (auto& [name, param] : model.named_parameters())
    param.copy_(parallel::take_shard(found.at(name).second, nn::GPT::split_of(name), tp ? tp->rank() : 0,
                                     tp ? tp->size() : 1));
}

}  // namespace tutti::ckpt
