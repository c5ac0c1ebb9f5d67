// tutti: the command line. Parsing and dispatch only; the work lives in the library.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>

#include "tutti/ckpt/gpt_checkpoint.hpp"
#include "tutti/comm/communicator.hpp"
#include "tutti/ckpt/safetensors.hpp"
#include "tutti/autograd/node.hpp"
#include "tutti/core/error.hpp"
#include "tutti/core/threads.hpp"
#include "tutti/launch/supervisor.hpp"
#include "tutti/train/run_dir.hpp"
#include "tutti/train/sweep.hpp"
#include "tutti/train/trace_report.hpp"
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
  std::string config_file, resume, preset, trace;
  std::map<std::string, std::string> values;  // settings given as flags
};

void add_train(CLI::App& app, TrainArgs& args) {
  auto* cmd = app.add_subcommand("train", "Train a byte-level GPT (defaults: the nanoGPT Shakespeare recipe)");
  cmd->add_option("--config", args.config_file, "TOML file of settings (keys as the flags below, '_' for '-')")
      ->check(CLI::ExistingFile);
  cmd->add_option("--resume", args.resume, "continue the run in this output directory from its latest checkpoint");
  cmd->add_option("--trace", args.trace,
                  "write every rank's timeline to this new file (Chrome trace / Perfetto JSON; summary: tutti inspect "
                  "trace FILE)");
  cmd->add_option("--preset", args.preset,
                  "start from a named setup, before --config and flags: gpt2 (GPT-2 124M on synthetic tokens, "
                  "vocabulary 50304, context 1024, batch 16: a speed run) or shakespeare (the default)");
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
  cmd->get_option("--preset")->excludes(cmd->get_option("--resume"));
}

int run_train(const TrainArgs& args, comm::Communicator& world) {
  train::TrainConfig config;
  const bool resume = !args.resume.empty();
  if (resume) {
    config = train::load_run_config(args.resume);
  } else {
    config.data = default_data_path();
    if (!args.preset.empty()) train::apply_preset(config, args.preset);
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
  options.trace = args.trace;
  train::TrainResult r = train::run_training(config, options);
  if (!r.lead) return 0;
  std::cout << "done: " << r.steps << " steps, train loss " << r.train_loss << ", val loss " << r.val_loss << ", "
            << static_cast<int64_t>(r.tokens_per_second) << " tok/s over the run";
  if (r.step_tokens_per_second > 0) std::cout << " (" << static_cast<int64_t>(r.step_tokens_per_second) << " at the median step)";
  std::cout << ", checkpoint " << r.checkpoint << "\n";
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

// ------------------------------------------------------------------------------------------
// tutti sweep

struct SweepArgs {
  std::string config_file, out;
  int workers = 0;
  bool dry_run = false;
};

void add_sweep(CLI::App& app, SweepArgs& args) {
  auto* cmd = app.add_subcommand(
      "sweep", "Run many small training jobs (a grid or random search over train settings) as separate `tutti train` "
               "processes, a few at once, stopping the ones that fall behind (successive halving); print a ranked "
               "table, write OUT/sweep.jsonl and OUT/sweep.svg");
  cmd->add_option("config", args.config_file, "sweep file (TOML): [base], [search] and [sweep] tables")
      ->required()->check(CLI::ExistingFile);
  cmd->add_option("--out", args.out, "the sweep's directory, which must be new or empty [default: [sweep] out]");
  cmd->add_option("--workers", args.workers, "trials at once [default: [sweep] workers, else cores / threads_per_trial]")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--dry-run", args.dry_run, "check the file and list the trials with their commands; run nothing");
  cmd->footer(
      "The sweep file (docs/sweep.md):\n"
      "  [base]    settings every trial shares: any key of `tutti train --help` (layers = 2, steps = 300, ...)\n"
      "  [search]  KEY = [v1, v2, ...]               a grid: every combination is a trial\n"
      "            KEY = {min = A, max = B, log = true}  a range: sampled in a random search\n"
      "  [sweep]   trials = N (random search; needed with ranges), seed = S, workers = W, threads_per_trial = 1,\n"
      "            out = \"runs/sweep\", metric = \"val_loss\" | \"train_loss\", eta = 3 (halving factor),\n"
      "            rungs = [steps...] (evaluation steps where trials are compared; [] turns halving off;\n"
      "            default eval_interval x eta^k)\n"
      "At a rung, a trial continues when it is within the top max(1, ceil(n / eta)) of the n trials that reached\n"
      "it so far; the others are stopped. out and threads are set by the sweep; dp, pp, tp and eval_rank cannot be\n"
      "set (a trial is one process).");
}

int run_sweep(const SweepArgs& args) {
  train::SweepConfig config = train::load_sweep_config(args.config_file);
  if (!args.out.empty()) config.out = args.out;
  if (args.workers > 0) config.workers = args.workers;
  const std::string binary = fs::read_symlink("/proc/self/exe").string();
  if (args.dry_run) {
    const std::vector<train::Trial> trials = train::plan_trials(config, binary);
    std::cout << train::format_plan(config, trials);
    return 0;
  }
  train::SweepOptions options;
  options.binary = binary;
  const train::SweepResult result = train::run_sweep(config, options);
  std::cout << "\n" << train::format_table(result, config.metric);
  const bool any = std::any_of(result.trials.begin(), result.trials.end(),
                               [](const train::TrialResult& r) { return r.status != train::TrialResult::Status::failed; });
  TUTTI_CHECK(any, "every trial failed; their output is in ", (fs::path(config.out) / "logs").string());
  return 0;
}

// ------------------------------------------------------------------------------------------
// tutti launch

struct LaunchArgs {
  launch::LaunchOptions options;
  std::vector<std::string> command;  // after `--`: train ARGS...
};

void add_launch(CLI::App& app, LaunchArgs& args) {
  auto* cmd = app.add_subcommand(
      "launch", "Run `train` through mpirun and restart it from its newest checkpoint when a rank dies, hangs or a "
                "host goes away:  tutti launch --ranks N [OPTIONS] -- train --out DIR ...");
  launch::LaunchOptions& o = args.options;
  cmd->add_option("--ranks", o.ranks, "ranks of the job")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--hosts", o.hostfile, "hostfile (HOST [slots=N] per line); ranks go round robin over the hosts")
      ->check(CLI::ExistingFile);
  cmd->add_option("--min-ranks", o.min_ranks, "fewest ranks to continue on when hosts are lost [default: --ranks]");
  cmd->add_option("--max-restarts", o.max_restarts, "restarts over the whole job")->capture_default_str();
  cmd->add_option("--heartbeat-timeout", o.heartbeat_timeout, "seconds a rank's heartbeat may stand still")
      ->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--startup-timeout", o.startup_timeout, "seconds for every rank to send its first heartbeat")
      ->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--probe-port", o.probe_port, "TCP port that host probes connect to (refused counts as reachable)")
      ->capture_default_str();
  cmd->add_option("--host-check", o.host_check, "shell command that exits 0 when {host} is up (default: a TCP probe)");
  cmd->add_option("--mpirun-arg", o.mpirun_args, "one argument for mpirun (repeat; --mpirun-arg=--mca ...)")
      ->allow_extra_args(false);
  cmd->add_option("command", args.command, "after `--`: train and its arguments");
}

int run_launch(LaunchArgs& args) {
  TUTTI_CHECK_AS(InvalidArgument, !args.command.empty() && args.command[0] == "train",
                 "launch needs the training command after '--': tutti launch --ranks N -- train --out DIR ...");
  args.options.train_args.assign(args.command.begin() + 1, args.command.end());
  args.options.tutti_binary = fs::read_symlink("/proc/self/exe").string();
  return launch::supervise(args.options).exit_code;
}

// ------------------------------------------------------------------------------------------
// tutti inspect

struct InspectArgs {
  std::string path;
  std::string trace_file;
  CLI::App* trace = nullptr;
};

void add_inspect(CLI::App& app, InspectArgs& args) {
  auto* cmd = app.add_subcommand(
      "inspect", "Show what a checkpoint holds (step, layout, model shape, files with sizes and checksums, tensors) "
                 "and verify it against its manifest. Given a run directory: every checkpoint's status, which one a "
                 "resume would use, and the details of the one 'latest' names. Exit 0 when everything is good, 1 "
                 "with one error line per problem otherwise");
  cmd->add_option("path", args.path, "checkpoint directory, or a run directory");
  args.trace = cmd->add_subcommand("trace", "Summarise a trace written by train --trace: each rank's share of step "
                                            "time in compute, exposed communication, pipeline bubble, data wait, "
                                            "checkpoint and evaluation, and the slowest rank");
  args.trace->add_option("file", args.trace_file, "the trace file")->required();
}

// One checkpoint's details on stdout; its problems, prefixed with `label`, appended to `problems`.
void print_checkpoint(const std::string& dir, const std::string& label, std::vector<std::string>& problems) {
  const train::CheckpointReport r = train::inspect_checkpoint(dir);
  std::printf("checkpoint %s: %s\n", dir.c_str(), r.problems.empty() ? "OK" : "BAD");
  if (r.check.manifest) {
    const ckpt::Manifest& m = *r.check.manifest;
    std::printf("  step %lld, layout dp=%lld pp=%lld tp=%lld zero=%lld world=%lld, config hash %s\n",
                (long long)m.step, (long long)m.layout.dp, (long long)m.layout.pp, (long long)m.layout.tp,
                (long long)m.layout.zero, (long long)m.layout.world,
                m.config_hash.empty() ? "(none)" : m.config_hash.c_str());
  }
  if (r.state)
    std::printf("  trainer: step %lld, optimizer steps %lld, seed %lld, data position %lld, last loss %.6g\n",
                (long long)r.state->step, (long long)r.optimizer_steps, (long long)r.state->seed,
                (long long)r.state->data_position, r.state->last_loss);
  if (r.config)
    std::printf("  model: %d layers, %d heads, dim %d, context %d, vocabulary %d (%lld parameters)\n", r.config->n_layer,
                r.config->n_head, r.config->n_embd, r.config->block_size, r.config->vocab_size,
                (long long)r.config->num_parameters());
  uint64_t file_bytes = 0;
  std::printf("  files:\n");
  for (const ckpt::FileCheck& f : r.check.files) {
    file_bytes += f.actual ? f.actual->bytes : 0;
    std::printf("    %-24s %12llu bytes  xxh3_64 %s  %s%s\n", f.name.c_str(), (unsigned long long)f.expected.bytes,
                ckpt::hex64(f.expected.xxh3).c_str(), f.problem.empty() ? "OK" : "BAD: ", f.problem.c_str());
  }
  if (!r.check.manifest) std::printf("    (no valid manifest: nothing to verify against)\n");
  size_t tensors = 0;
  uint64_t tensor_bytes = 0;
  for (const train::TensorFileInfo& file : r.tensor_files) {
    uint64_t bytes = 0;
    for (const train::TensorInfo& t : file.tensors) bytes += t.bytes;
    std::printf("  %s: %zu tensors, %llu bytes\n", file.file.c_str(), file.tensors.size(), (unsigned long long)bytes);
    for (const train::TensorInfo& t : file.tensors)
      std::printf("    %-48s %-4s %-16s %12llu\n", t.name.c_str(), std::string(dtype_name(t.dtype)).c_str(),
                  t.shape.str().c_str(), (unsigned long long)t.bytes);
    tensors += file.tensors.size();
    tensor_bytes += bytes;
  }
  std::printf("  total: %zu files, %llu bytes; %zu tensors, %llu bytes of tensor data\n", r.check.files.size(),
              (unsigned long long)file_bytes, tensors, (unsigned long long)tensor_bytes);
  for (const std::string& p : r.problems) problems.push_back(label + p);
}

int run_inspect(const InspectArgs& args) {
  if (args.trace->parsed()) {
    const train::TraceReport report = train::read_trace_report(args.trace_file);
    std::cout << "trace " << args.trace_file << "\n" << train::format_trace_report(report);
    return report.problems.empty() ? 0 : 1;
  }
  TUTTI_CHECK_AS(InvalidArgument, !args.path.empty(), "inspect needs a checkpoint or run directory, or: trace FILE");
  fs::path p = fs::path(args.path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "run/" -> "run"
  TUTTI_CHECK_AS(CheckpointError, fs::is_directory(p), "'", args.path, "' is not a directory");
  std::vector<std::string> problems;
  const bool is_checkpoint = fs::exists(p / "model.safetensors") || fs::exists(p / ckpt::kManifestFile) ||
                             fs::exists(p / "trainer_state.json");
  if (is_checkpoint) {
    print_checkpoint(p.string(), p.filename().string() + "/", problems);
  } else {
    const std::vector<std::string> names = train::list_checkpoints(args.path);
    TUTTI_CHECK_AS(CheckpointError, !names.empty() || fs::exists(p / "latest"), "'", args.path,
                   "' is neither a checkpoint nor a run directory with checkpoints");
    std::string latest;
    if (fs::exists(p / "latest")) {
      std::ifstream in(p / "latest");
      std::getline(in, latest);
    }
    std::printf("run %s: latest -> %s\n  checkpoints:", args.path.c_str(), latest.empty() ? "(none)" : latest.c_str());
    for (const std::string& name : names) {
      const train::CheckpointCheck c = train::verify_checkpoint((p / "checkpoints" / name).string());
      std::printf(" %s %s", name.c_str(), c.ok() ? "OK" : "BAD");
      if (name != latest)
        for (const std::string& problem : c.problems) problems.push_back(name + "/" + problem);
    }
    std::printf("\n");
    try {
      const train::CheckpointChoice choice = train::choose_checkpoint(args.path);
      std::printf("  a resume would use %s%s%s\n", fs::path(choice.dir).filename().c_str(),
                  choice.note.empty() ? "" : ": ", choice.note.c_str());
    } catch (const CheckpointError& e) {
      problems.push_back(e.what());
    }
    const fs::path shown = p / "checkpoints" / latest;
    if (!latest.empty() && fs::is_directory(shown)) print_checkpoint(shown.string(), latest + "/", problems);
    else if (!latest.empty()) problems.push_back("'latest' names " + latest + ", which does not exist");
  }
  std::fflush(stdout);
  for (const std::string& problem : problems) std::fprintf(stderr, "tutti: error: %s\n", problem.c_str());
  return problems.empty() ? 0 : 1;
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
  InspectArgs inspect_args;
  add_inspect(app, inspect_args);
  LaunchArgs launch_args;
  add_launch(app, launch_args);
  SweepArgs sweep_args;
  add_sweep(app, sweep_args);
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
    if (app.got_subcommand("inspect")) return run_inspect(inspect_args);
    if (app.got_subcommand("launch")) return run_launch(launch_args);
    if (app.got_subcommand("sweep")) return run_sweep(sweep_args);
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
