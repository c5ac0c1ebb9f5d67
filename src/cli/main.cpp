// tutti: the command line. Parsing and dispatch only; the work lives in the library.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>

#include "tutti/ckpt/gpt_checkpoint.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/ckpt/safetensors.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/core/error.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/train/run_dir.hpp"
#include "tutti/train/trainer.hpp"

namespace fs = std::filesystem;
using namespace tutti;

namespace {

#ifndef TUTTI_DEFAULT_DATA
#define TUTTI_DEFAULT_DATA ""
#endif

// The corpus shipped in the repository: found from the working directory, else from the source
// tree this binary was built from.
std::string default_data_path() {
  const std::string relative = train::TrainConfig{}.data;
  if (fs::exists(relative) || std::string(TUTTI_DEFAULT_DATA).empty()) return relative;
  return TUTTI_DEFAULT_DATA;
}

std::vector<int32_t> bytes_of(const std::string& text) {
  std::vector<int32_t> tokens;
  for (unsigned char c : text) tokens.push_back(c);
  return tokens;
}

std::unique_ptr<nn::GPT> load_model(const std::string& dir) {
  const std::string ckpt_dir = train::resolve_checkpoint(dir);
  auto model = std::make_unique<nn::GPT>(ckpt::load_gpt_config(ckpt_dir));
  ckpt::load_gpt_weights(ckpt_dir, *model);
  return model;
}

void apply_threads(int threads) { set_num_threads(threads > 0 ? threads : hardware_threads()); }

// ------------------------------------------------------------------------------------------
// tutti train

struct TrainArgs {
  std::string config_file, resume;
  std::map<std::string, std::string> values;  // settings given as flags
};

void add_train(CLI::App& app, TrainArgs& args) {
  auto* cmd = app.add_subcommand("train", "Train a byte-level GPT (defaults: the nanoGPT Shakespeare recipe)");
  cmd->add_option("--config", args.config_file, "TOML file of settings (keys as the flags below, '_' for '-')")
      ->check(CLI::ExistingFile);
  cmd->add_option("--resume", args.resume, "continue the run in this output directory from its latest checkpoint");
  train::TrainConfig defaults;
  for (const train::Setting& s : train::settings(defaults)) {
    std::string flag = "--" + s.name;
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (s.name == "batch") flag += ",--global-batch";
    cmd->add_option_function<std::string>(
           flag, [&args, name = s.name](const std::string& v) { args.values[name] = v; },
           s.help + " [default: " + s.get() + "]")
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)  // a later flag overrides an earlier one
        ->type_name(s.kind == train::Setting::Kind::text ? "TEXT" : (s.kind == train::Setting::Kind::integer ? "INT" : "NUM"));
  }
  cmd->get_option("--config")->excludes(cmd->get_option("--resume"));
}

int run_train(const TrainArgs& args, comm::Communicator& world) {
  train::TrainConfig config;
  const bool resume = !args.resume.empty();
  if (resume) {
    config = train::load_run_config(args.resume);
  } else {
    config.data = default_data_path();
    if (!args.config_file.empty()) train::apply_toml_file(config, args.config_file);
  }
  auto all = train::settings(config);
  for (const auto& [name, value] : args.values)
    for (train::Setting& s : all)
      if (s.name == name) s.set(value);
  if (resume) {
    TUTTI_CHECK_AS(ConfigError, !args.values.count("out") || fs::equivalent(config.out, args.resume),
                   "--out cannot differ from --resume");
    config.out = args.resume;
  }
  train::TrainOptions options;
  options.resume = resume;
  options.live_progress = ::isatty(STDOUT_FILENO) != 0 && world.size() == 1;  // mpirun hands ranks a pty
  options.world = &world;
  train::TrainResult r = train::run_training(config, options);
  if (world.rank() != 0) return 0;
  std::cout << "done: " << r.steps << " steps, train loss " << r.train_loss << ", val loss " << r.val_loss << ", "
            << static_cast<int64_t>(r.tokens_per_second) << " tok/s, checkpoint " << r.checkpoint << "\n";
  return 0;
}

// ------------------------------------------------------------------------------------------
// tutti generate

struct GenerateArgs {
  std::string checkpoint, prompt;
  nn::SampleOptions sample;
  int threads = 0;
};

void add_generate(CLI::App& app, GenerateArgs& args) {
  auto* cmd = app.add_subcommand("generate", "Continue a prompt with a trained model (KV cache)");
  cmd->add_option("--checkpoint", args.checkpoint, "checkpoint directory, or a run directory (its latest checkpoint)")
      ->required();
  cmd->add_option("--prompt", args.prompt, "text to continue (bytes); empty starts from a newline");
  cmd->add_option("--max-tokens", args.sample.max_tokens, "tokens (bytes) to generate")->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--temperature", args.sample.temperature, "sampling temperature; 0 is greedy and deterministic")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", args.sample.top_k, "sample among the k most likely tokens (0: all)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", args.sample.seed, "sampling seed")->capture_default_str();
  cmd->add_option("--threads", args.threads, "compute threads (0: every core)")->capture_default_str();
}

int run_generate(const GenerateArgs& args) {
  apply_threads(args.threads);
  auto model = load_model(args.checkpoint);
  std::vector<int32_t> out = nn::generate(*model, bytes_of(args.prompt), args.sample);
  std::string text(out.begin(), out.end());
  std::cout << text << std::endl;
  return 0;
}

// ------------------------------------------------------------------------------------------
// tutti eval

struct EvalArgs {
  std::string checkpoint, data, prompt, logits_out;
  int batches = 20, batch = 12, threads = 0;
  int64_t seed = 1337;
};

void add_eval(CLI::App& app, EvalArgs& args) {
  auto* cmd = app.add_subcommand("eval", "Evaluate a checkpoint: validation loss, or the logits of a prompt");
  cmd->add_option("--checkpoint", args.checkpoint, "checkpoint directory, or a run directory")->required();
  cmd->add_option("--data", args.data, "text file whose last 10% is the validation split [default: the shipped corpus]");
  cmd->add_option("--batches", args.batches, "validation batches")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--batch", args.batch, "sequences per batch")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args.seed, "seed of the evaluation batches")->capture_default_str();
  cmd->add_option("--prompt", args.prompt, "with --logits-out: the text whose logits to write");
  cmd->add_option("--logits-out", args.logits_out, "write the prompt's logits (T, V) as 'logits' to this safetensors file");
  cmd->add_option("--threads", args.threads, "compute threads (0: every core)")->capture_default_str();
}

int run_eval(const EvalArgs& args) {
  apply_threads(args.threads);
  auto model = load_model(args.checkpoint);
  if (!args.logits_out.empty()) {
    TUTTI_CHECK_AS(InvalidArgument, !args.prompt.empty(), "--logits-out needs a non-empty --prompt");
    const std::vector<int32_t> tokens = bytes_of(args.prompt);
    TUTTI_CHECK_AS(InvalidArgument, int64_t(tokens.size()) <= model->config().block_size, "the prompt has ",
                   tokens.size(), " bytes, more than the model's context of ", model->config().block_size);
    NoGradGuard no_grad;
    Tensor logits = model->forward(Tensor::from_vector({1, int64_t(tokens.size())}, tokens));
    ckpt::write_safetensors(args.logits_out, {{"logits", logits.view({int64_t(tokens.size()), -1})}});
    std::cout << "wrote logits " << logits.shape().str() << " to " << args.logits_out << "\n";
    return 0;
  }
  data::TokenDataset dataset(args.data.empty() ? default_data_path() : args.data, model->config().block_size);
  const double val = train::evaluate(*model, dataset, data::Split::val, args.batches, args.batch, args.seed);
  std::cout << "val loss " << val << " (" << args.batches << " batches of " << args.batch << " x "
            << model->config().block_size << " tokens)\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tutti: train and run neural networks in parallel (data, tensor, pipeline and task parallelism)",
               "tutti"};
  app.set_version_flag("--version", std::string("tutti ") + TUTTI_VERSION);
  app.require_subcommand(1);
  TrainArgs train_args;
  GenerateArgs generate_args;
  EvalArgs eval_args;
  add_train(app, train_args);
  add_generate(app, generate_args);
  add_eval(app, eval_args);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  std::unique_ptr<comm::Communicator> world;
  try {
    if (app.got_subcommand("train")) {
      world = comm::make_world("auto");  // MPI under mpirun/srun, else a world of one
      return run_train(train_args, *world);
    }
    if (app.got_subcommand("generate")) return run_generate(generate_args);
    if (app.got_subcommand("eval")) return run_eval(eval_args);
  } catch (const std::exception& e) {
    const bool many = world && world->size() > 1;
    const std::string where =
        many ? " (rank " + std::to_string(world->rank()) + " of " + std::to_string(world->size()) + ")" : "";
    const std::string line = "tutti: error" + where + ": " + e.what() + "\n";
    std::fputs(line.c_str(), stderr);  // one write, so lines of several ranks do not interleave
    std::fflush(stderr);
    // Settings, data and checkpoints are checked alike on every rank, so every rank stops here
    // and can finish cleanly; anything else may have left other ranks waiting: end the job.
    const bool same_on_all_ranks = dynamic_cast<const ConfigError*>(&e) || dynamic_cast<const DataError*>(&e) ||
                                   dynamic_cast<const CheckpointError*>(&e);
    if (many && !same_on_all_ranks) world->abort(1);
    return 1;
  }
  return 2;
}
