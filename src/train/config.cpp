#include "tutti/train/config.hpp"

#include <charconv>
#include <sstream>
#include <toml++/toml.h>

#include "tutti/core/error.hpp"

namespace tutti::train {

void TrainConfig::validate() const {
  model().validate();
  auto positive = [](const char* name, int64_t v) {
    TUTTI_CHECK_AS(ConfigError, v > 0, name, " must be positive, got ", v);
  };
  auto non_negative = [](const char* name, double v) {
    TUTTI_CHECK_AS(ConfigError, v >= 0, name, " must be >= 0, got ", v);
  };
  positive("batch", batch);
  positive("steps", steps);
  positive("eval_interval", eval_interval);
  positive("eval_batches", eval_batches);
  positive("checkpoint_interval", checkpoint_interval);
  positive("keep_checkpoints", keep_checkpoints);
  positive("log_interval", log_interval);
  non_negative("warmup", warmup);
  non_negative("decay_steps", decay_steps);
  non_negative("sample_tokens", sample_tokens);
  non_negative("threads", threads);
  non_negative("dp", dp);
  positive("pp", pp);
  positive("tp", tp);
  non_negative("micro_batch", micro_batch);
  non_negative("micro_batches", micro_batches);
  TUTTI_CHECK_AS(ConfigError, schedule == "gpipe" || schedule == "1f1b", "schedule must be gpipe or 1f1b, got '",
                 schedule, "'");
  TUTTI_CHECK_AS(ConfigError, zero >= 0 && zero <= 2, "zero must be 0, 1 or 2, got ", zero);
  positive("bucket_mib", bucket_mib);
  positive("comm_timeout", comm_timeout);
  non_negative("checkpoint_minutes", checkpoint_minutes);
  positive("max_bad_steps", max_bad_steps);
  non_negative("straggler_interval", straggler_interval);
  TUTTI_CHECK_AS(ConfigError, straggler_threshold > 0, "straggler_threshold must be positive, got ", straggler_threshold);
  TUTTI_CHECK_AS(ConfigError, workflow == "concurrent" || workflow == "serial",
                 "workflow must be concurrent or serial, got '", workflow, "'");
  TUTTI_CHECK_AS(ConfigError, eval_rank >= -1, "eval_rank must be a rank (0, 1, ...) or -1 for none, got ", eval_rank);
  non_negative("lr", lr);
  non_negative("min_lr", min_lr);
  non_negative("weight_decay", weight_decay);
  non_negative("grad_clip", grad_clip);
  TUTTI_CHECK_AS(ConfigError, beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got ", beta1);
  TUTTI_CHECK_AS(ConfigError, beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got ", beta2);
  TUTTI_CHECK_AS(ConfigError, decay == "cosine" || decay == "constant", "decay must be cosine or constant, got '",
                 decay, "'");
  TUTTI_CHECK_AS(ConfigError, vocab >= 2, "vocab must be at least 2, got ", vocab);
  TUTTI_CHECK_AS(ConfigError, data == "synthetic" || vocab >= 256, "vocab ", vocab,
                 " is smaller than the 256 byte values of a data file (use --data synthetic for other vocabularies)");
  TUTTI_CHECK_AS(ConfigError, dtype == "fp32" || dtype == "bf16", "dtype must be fp32 or bf16, got '", dtype, "'");
  TUTTI_CHECK_AS(ConfigError, dtype == "fp32" || compute_device().is_cuda(),
                 "dtype bf16 needs --device cuda: the CPU backend computes in fp32 only");
  compute_device();
  TUTTI_CHECK_AS(ConfigError, !data.empty(), "data path is empty");
  TUTTI_CHECK_AS(ConfigError, !out.empty(), "output directory is empty");
}

nn::GPTConfig TrainConfig::model() const {
  nn::GPTConfig m;
  m.n_layer = layers;
  m.n_head = heads;
  m.n_embd = dim;
  m.block_size = context;
  m.vocab_size = vocab;
  m.compute = dtype == "bf16" ? DType::bf16 : DType::f32;
  return m;
}

Device TrainConfig::compute_device() const {
  if (device == "cpu") return Device::cpu();
  if (device == "cuda") return Device::cuda(0);
  int index = -1;
  const char* digits = device.c_str() + 5;
  if (device.rfind("cuda:", 0) == 0 && *digits) {
    const auto [end, ec] = std::from_chars(digits, device.c_str() + device.size(), index);
    if (ec != std::errc() || *end) index = -1;
  }
  TUTTI_CHECK_AS(ConfigError, index >= 0, "device must be cpu, cuda or cuda:N, got '", device, "'");
  return Device::cuda(index);
}

namespace {

template <class T>
T parse_number(const std::string& name, const std::string& text) {
  T value{};
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  TUTTI_CHECK_AS(ConfigError, ec == std::errc() && ptr == end, "setting ", name, ": '", text, "' is not a valid ",
                 std::is_integral_v<T> ? "integer" : "number");
  return value;
}

template <class T>
Setting number(const std::string& name, const std::string& help, T& field) {
  Setting s{name, help, std::is_integral_v<T> ? Setting::Kind::integer : Setting::Kind::real, {}, {}};
  s.get = [&field] {
    char buf[64];
    auto [end, ec] = std::to_chars(buf, buf + sizeof buf, field);  // shortest text that reads back exactly
    std::string t(buf, end);
    if constexpr (!std::is_integral_v<T>)
      if (t.find_first_of(".eEn") == std::string::npos) t += ".0";  // stays a TOML float
    return t;
  };
  s.set = [&field, name](const std::string& text) { field = parse_number<T>(name, text); };
  return s;
}

Setting text(const std::string& name, const std::string& help, std::string& field) {
  Setting s{name, help, Setting::Kind::text, {}, {}};
  s.get = [&field] {
    std::string q = "\"";
    for (char c : field) q += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
    return q + "\"";
  };
  s.set = [&field](const std::string& t) { field = t; };
  return s;
}

}  // namespace

std::vector<Setting> settings(TrainConfig& c) {
  return {
      number("layers", "transformer blocks", c.layers),
      number("heads", "attention heads per block (must divide dim)", c.heads),
      number("dim", "embedding width", c.dim),
      number("context", "context length in tokens (bytes)", c.context),
      number("vocab", "vocabulary size (256 for the bytes of a data file; e.g. 50304 with --data synthetic)", c.vocab),
      text("data", "training text (the last 10% of its bytes is the validation split), or synthetic: random "
           "tokens for speed runs", c.data),
      text("out", "output directory of the run (checkpoints, run.toml, metrics.jsonl)", c.out),
      number("batch", "global batch: sequences per optimizer step over all ranks (also --global-batch)", c.batch),
      number("steps", "optimizer steps", c.steps),
      number("lr", "peak learning rate", c.lr),
      number("min_lr", "learning rate at the end of the decay", c.min_lr),
      number("warmup", "linear warmup steps", c.warmup),
      text("decay", "learning-rate decay after warmup: cosine or constant", c.decay),
      number("decay_steps", "step at which the decay reaches min_lr (0: steps)", c.decay_steps),
      number("weight_decay", "AdamW weight decay (matrices and embeddings only)", c.weight_decay),
      number("beta1", "AdamW beta1", c.beta1),
      number("beta2", "AdamW beta2", c.beta2),
      number("grad_clip", "clip the global gradient norm to this (0: off)", c.grad_clip),
      number("seed", "seed of initialisation and data order", c.seed),
      number("eval_interval", "evaluate the validation loss every N steps", c.eval_interval),
      number("eval_batches", "batches per evaluation", c.eval_batches),
      number("checkpoint_interval", "write a checkpoint every N steps (and at the end)", c.checkpoint_interval),
      number("checkpoint_minutes", "also write a checkpoint every this many minutes (0: off)", c.checkpoint_minutes),
      number("keep_checkpoints", "how many recent checkpoints to keep", c.keep_checkpoints),
      number("log_interval", "log a line every N steps when not on a terminal", c.log_interval),
      number("sample_tokens", "tokens of the sample printed at the end (0: none)", c.sample_tokens),
      text("device", "where the model trains: cpu, cuda or cuda:N (one GPU per process)", c.device),
      text("dtype", "fp32, or bf16: mixed precision (bf16 matrix products with fp32 accumulation; fp32 weights, "
           "gradients and AdamW state; GPU only)", c.dtype),
      number("threads", "compute threads per rank (0: every core)", c.threads),
      number("dp", "data-parallel replicas (0: the world size of the MPI launch / (pp x tp))", c.dp),
      number("pp", "pipeline stages: the blocks cut into pp stages balanced by their cost", c.pp),
      number("tp", "tensor-parallel ranks per stage: heads, MLP and vocabulary split over them", c.tp),
      number("micro_batch", "sequences per forward pass on a rank (0: batch / dp, no accumulation)", c.micro_batch),
      number("micro_batches", "micro-batches per replica and step (0: batch / dp / micro_batch)", c.micro_batches),
      text("schedule", "pipeline schedule: 1f1b (bounded activation memory) or gpipe", c.schedule),
      number("zero", "0: plain data parallelism, 1: shard optimizer state, 2: shard gradients too", c.zero),
      number("bucket_mib", "gradient bucket size in MiB (reduction starts per bucket during backward)",
             c.bucket_mib),
      number("comm_timeout", "seconds a collective may wait for the other ranks before the run fails",
             c.comm_timeout),
      number("max_bad_steps", "steps with a non-finite loss or gradient are skipped; this many in a row roll "
             "back to the last checkpoint", c.max_bad_steps),
      number("straggler_interval", "every N steps compare the ranks' compute time and name slow ones (0: never)",
             c.straggler_interval),
      number("straggler_threshold", "a rank whose compute time exceeds the median by more than this fraction is "
             "named a straggler", c.straggler_threshold),
      text("workflow", "concurrent: batches prepared ahead, evaluations and checkpoints in the background; serial: "
           "each in turn on the training thread", c.workflow),
      number("eval_rank", "a rank of the launch that only evaluates snapshots of the weights (-1: none)", c.eval_rank),
  };
}

void apply_preset(TrainConfig& c, const std::string& name) {
  if (name == "shakespeare") {
    const std::string data = c.data;  // where the corpus is: the caller's default
    c = TrainConfig{};
    c.data = data;
    return;
  }
  TUTTI_CHECK_AS(ConfigError, name == "gpt2", "unknown preset '", name, "'; the presets are gpt2, shakespeare");
  c.layers = 12;
  c.heads = 12;
  c.dim = 768;
  c.context = 1024;
  c.vocab = 50304;
  c.data = "synthetic";
  c.batch = 16;
  c.lr = 6e-4f;
  c.min_lr = 6e-5f;
  c.beta2 = 0.95f;
  c.warmup = 10;
  c.steps = 50;
  c.eval_interval = 1000;
  c.eval_batches = 1;
  c.checkpoint_interval = 1000;
  c.log_interval = 10;
  c.sample_tokens = 0;
}

void apply_toml_file(TrainConfig& config, const std::string& path) {
  toml::table table;
  try {
    table = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    TUTTI_FAIL(ConfigError, "config file '", path, "': ", e.description(), " at ", where.str());
  }
  auto all = settings(config);
  for (auto&& [key, node] : table) {
    const std::string name(key.str());
    auto it = std::find_if(all.begin(), all.end(), [&](const Setting& s) { return s.name == name; });
    TUTTI_CHECK_AS(ConfigError, it != all.end(), "config file '", path, "': unknown key '", name, "'");
    std::string value;
    if (it->kind == Setting::Kind::text) {
      TUTTI_CHECK_AS(ConfigError, node.is_string(), "config file '", path, "': '", name, "' must be a string");
      value = *node.value<std::string>();
    } else if (node.is_integer()) {
      value = std::to_string(*node.value<int64_t>());
    } else {
      TUTTI_CHECK_AS(ConfigError, node.is_floating_point() && it->kind == Setting::Kind::real, "config file '", path,
                     "': '", name, "' must be ", it->kind == Setting::Kind::integer ? "an integer" : "a number");
      std::ostringstream o;
      o.precision(9);
      o << *node.value<double>();
      value = o.str();
    }
    it->set(value);
  }
}

std::string to_toml(TrainConfig config) {
  std::string out = "# tutti training run; every key is also a flag of `tutti train`\n";
  for (const Setting& s : settings(config)) out += s.name + " = " + s.get() + "\n";
  return out;
}

}  // namespace tutti::train
