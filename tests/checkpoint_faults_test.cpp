// Damaged checkpoints: every kind of damage is refused on load, a run falls back to its newest
// good checkpoint and says which and why, `tutti inspect` reports it, nothing is deleted; a save
// killed at any instant or failing on a full disk leaves the previous checkpoint loadable.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "process_util.hpp"
#include "tutti/ckpt/manifest.hpp"
#include "tutti/core/error.hpp"
#include "tutti/core/random.hpp"
#include "tutti/train/run_dir.hpp"

namespace fs = std::filesystem;
using namespace tutti;
using tutti::test::Result;
using tutti::test::scratch;
using tutti::test::shell;
using tutti::test::slurp;

namespace {

nn::GPTConfig tiny_config(int dim = 16) {
  nn::GPTConfig c;
  c.n_layer = 1;
  c.n_head = 2;
  c.n_embd = dim;
  c.block_size = 16;
  return c;
}

// A checkpoint of `model` at `step`, with moments derived from the weights.
train::CheckpointSnapshot snapshot_of(const nn::GPT& model, int64_t step) {
  train::NamedTensors moments;
  for (auto& [name, t] : model.named_parameters()) {
    moments.emplace_back(name + ".exp_avg", t.to(Device::cpu()).clone());
    moments.emplace_back(name + ".exp_avg_sq", t.to(Device::cpu()).clone());
  }
  train::TrainerState state;
  state.step = step;
  state.seed = 1;
  state.data_path = "data.txt";
  state.data_position = step;
  return train::snapshot(model, std::move(moments), step, state, {.dp = 2, .zero = 1, .world = 2});
}

// A run directory with checkpoints at steps 10 and 20, each of a different model.
fs::path make_run(const std::string& name) {
  const fs::path run = scratch() / name;
  fs::remove_all(run);
  for (int step : {10, 20}) {
    nn::GPT model(tiny_config());
    Rng rng(static_cast<uint64_t>(step));
    model.init_weights(rng);
    train::save_checkpoint(run.string(), snapshot_of(model, step), 5);
  }
  return run;
}

std::string ckpt_dir(const fs::path& run, int step) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08d", step);
  return (run / "checkpoints" / name).string();
}

void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary | std::ios::trunc) << text; }

// Every file under `dir` with its contents, to prove nothing was changed or deleted.
std::map<std::string, std::string> tree(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    out[e.path().lexically_relative(dir).string()] = e.is_regular_file() ? slurp(e.path()) : "<dir>";
  return out;
}

struct Damage {
  const char* kind;
  std::function<void(const fs::path&)> apply;  // to a checkpoint directory
  const char* reason;                          // what the error must say
};

const std::vector<Damage>& damages() {
  static const std::vector<Damage> all = {
      {"truncated file",
       [](const fs::path& d) {
         const std::string s = slurp(d / "model.safetensors");
         write(d / "model.safetensors", s.substr(0, s.size() / 2));
       },
       "model.safetensors: 16068 bytes, the manifest says 32136 (truncated)"},
      {"flipped byte",
       [](const fs::path& d) {
         std::string s = slurp(d / "optimizer.safetensors");
         s[s.size() - 100] ^= 0x10;
         write(d / "optimizer.safetensors", s);
       },
       "optimizer.safetensors: checksum mismatch"},
      {"missing file", [](const fs::path& d) { fs::remove(d / "trainer_state.json"); },
       "trainer_state.json: listed in the manifest but missing"},
      {"manifest naming a file that is not there",
       [](const fs::path& d) {
         ckpt::Manifest m = ckpt::read_manifest(d.string());
         m.files["rng_state.safetensors"] = {64, 42};
         write(d / "manifest.json", ckpt::format_manifest(m));
       },
       "rng_state.safetensors: listed in the manifest but missing"},
      {"corrupted manifest",
       [](const fs::path& d) {
         const std::string s = slurp(d / "manifest.json");
         write(d / "manifest.json", s.substr(0, s.size() / 2));
       },
       "manifest.json: not valid JSON"},
      {"manifest without a file",
       [](const fs::path& d) {
         ckpt::Manifest m = ckpt::read_manifest(d.string());
         m.files.erase("model.safetensors");
         write(d / "manifest.json", ckpt::format_manifest(m));
       },
       "manifest.json does not list model.safetensors"},
      {"no manifest", [](const fs::path& d) { fs::remove(d / "manifest.json"); }, "manifest.json: missing"},
  };
  return all;
}

Result run_tutti(const std::string& args) { return shell(std::string(TUTTI_CLI) + " " + args); }

}  // namespace

// ============================================================================================
// Good checkpoints
// ============================================================================================

TEST(CheckpointFaults, ManifestDescribesTheCheckpoint) {
  const fs::path run = make_run("good");
  const train::CheckpointCheck c = train::verify_checkpoint(ckpt_dir(run, 20));
  ASSERT_TRUE(c.ok()) << c.summary();
  EXPECT_EQ(c.manifest->step, 20);
  EXPECT_EQ(c.manifest->layout, (ckpt::CheckpointLayout{.dp = 2, .zero = 1, .world = 2}));
  EXPECT_EQ(c.manifest->config_hash, train::config_hash(tiny_config()));
  EXPECT_NE(train::config_hash(tiny_config()), train::config_hash(tiny_config(32)));
  std::vector<std::string> names;
  for (auto& [name, digest] : c.manifest->files) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"config.json", "model.safetensors", "optimizer.safetensors",
                                             "trainer_state.json"}));
  const train::CheckpointChoice choice = train::choose_checkpoint(run.string());
  EXPECT_EQ(choice.dir, ckpt_dir(run, 20));
  EXPECT_EQ(choice.note, "");

  nn::GPT model(tiny_config());
  const train::LoadedCheckpoint loaded = train::load_checkpoint(ckpt_dir(run, 20), model);
  EXPECT_EQ(loaded.state.step, 20);
  EXPECT_EQ(loaded.manifest.layout, (ckpt::CheckpointLayout{.dp = 2, .zero = 1, .world = 2}));

  Result r = run_tutti("inspect " + run.string());
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  for (const char* text : {"step 20, layout dp=2 pp=1 tp=1 zero=1 world=2", "model: 1 layers, 2 heads, dim 16, context 16",
                           "model.safetensors", "32136 bytes", "OK", "transformer.wte.weight", "f32", "(256, 16)",
                           "wte.weight.exp_avg_sq", "total: 4 files", "step_00000010 OK step_00000020 OK"})
    EXPECT_NE(r.out.find(text), std::string::npos) << "'" << text << "' not in:\n" << r.out;
  Result one = run_tutti("inspect " + ckpt_dir(run, 10));
  EXPECT_EQ(one.code, 0) << one.err;
  EXPECT_NE(one.out.find("step 10"), std::string::npos) << one.out;
  Result help = run_tutti("inspect --help");
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("checksum"), std::string::npos) << help.out;
  EXPECT_NE(run_tutti("inspect").code, 0);
}

// ============================================================================================
// Every kind of damage
// ============================================================================================

TEST(CheckpointFaults, EveryDamageIsRefusedAndTheRunFallsBack) {
  const fs::path good = make_run("pristine");
  for (const Damage& d : damages()) {
    SCOPED_TRACE(d.kind);
    const fs::path run = scratch() / "damaged";
    fs::remove_all(run);
    fs::copy(good, run, fs::copy_options::recursive);
    d.apply(ckpt_dir(run, 20));
    const auto before = tree(run);

    // Load refuses it, naming the problem, and leaves the model as it was.
    nn::GPT model(tiny_config());
    const std::string weights_before = model.named_parameters()[0].second.str();
    try {
      train::load_checkpoint(ckpt_dir(run, 20), model);
      ADD_FAILURE() << "loaded a damaged checkpoint";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find(d.reason), std::string::npos) << e.what();
    }
    EXPECT_EQ(model.named_parameters()[0].second.str(), weights_before);

    // A run falls back to the newest good checkpoint and says which and why.
    const train::CheckpointChoice choice = train::choose_checkpoint(run.string());
    EXPECT_EQ(choice.dir, ckpt_dir(run, 10));
    EXPECT_EQ(choice.note.rfind("checkpoint step_00000020 is damaged (", 0), 0u) << choice.note;
    EXPECT_NE(choice.note.find(d.reason), std::string::npos) << choice.note;
    EXPECT_NE(choice.note.find("; using step_00000010"), std::string::npos) << choice.note;
    EXPECT_EQ(train::load_checkpoint(choice.dir, model).state.step, 10);

    // A checkpoint named explicitly gets no fallback.
    EXPECT_THROW(train::choose_checkpoint(ckpt_dir(run, 20)), CheckpointError);

    // inspect reports it: exit 1, one error line per problem.
    Result r = run_tutti("inspect " + run.string());
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.err.find("tutti: error: step_00000020/" + std::string(d.reason)), std::string::npos) << r.err;
    EXPECT_NE(r.out.find("step_00000020 BAD"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("a resume would use step_00000010"), std::string::npos) << r.out;
    Result explicit_dir = run_tutti("inspect " + ckpt_dir(run, 20));
    EXPECT_EQ(explicit_dir.code, 1);
    EXPECT_NE(explicit_dir.err.find(d.reason), std::string::npos) << explicit_dir.err;

    // generate on the run warns and uses the good one; on the damaged checkpoint it fails.
    Result g = run_tutti("generate --checkpoint " + run.string() + " --max-tokens 2 --temperature 0");
    EXPECT_EQ(g.code, 0) << g.err;
    EXPECT_NE(g.err.find("tutti: warning: checkpoint step_00000020 is damaged"), std::string::npos) << g.err;
    Result bad = run_tutti("generate --checkpoint " + ckpt_dir(run, 20) + " --max-tokens 2");
    EXPECT_EQ(bad.code, 1);
    EXPECT_NE(bad.err.find(d.reason), std::string::npos) << bad.err;

    EXPECT_EQ(tree(run), before) << "the fallback changed or deleted something";
  }
}

TEST(CheckpointFaults, NoGoodCheckpointIsOneErrorNamingEach) {
  const fs::path run = make_run("all_bad");
  damages()[0].apply(ckpt_dir(run, 20));
  damages()[1].apply(ckpt_dir(run, 10));
  try {
    train::choose_checkpoint(run.string());
    ADD_FAILURE() << "chose a damaged checkpoint";
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("has no good checkpoint"), std::string::npos) << msg;
    EXPECT_NE(msg.find("step_00000020 (model.safetensors: 16068 bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("step_00000010 (optimizer.safetensors: checksum mismatch"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos);
  }
  Result r = run_tutti("eval --checkpoint " + run.string() + " --batches 1 --batch 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("has no good checkpoint"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(ckpt_dir(run, 10)) && fs::exists(ckpt_dir(run, 20)));
}

TEST(CheckpointFaults, LatestMissingOrDanglingFallsBackToTheNewestGood) {
  const fs::path run = make_run("latest");
  fs::remove(run / "latest");
  train::CheckpointChoice c = train::choose_checkpoint(run.string());
  EXPECT_EQ(c.dir, ckpt_dir(run, 20));
  EXPECT_EQ(c.note, "'latest' is missing; using step_00000020");
  write(run / "latest", "step_00000030\n");
  c = train::choose_checkpoint(run.string());
  EXPECT_EQ(c.dir, ckpt_dir(run, 20));
  EXPECT_EQ(c.note, "'latest' names step_00000030, which does not exist; using step_00000020");
  write(run / "latest", "../../etc\n");
  EXPECT_EQ(train::choose_checkpoint(run.string()).dir, ckpt_dir(run, 20));
  // `latest` names the older one: it is the committed checkpoint, used without a note.
  write(run / "latest", "step_00000010\n");
  c = train::choose_checkpoint(run.string());
  EXPECT_EQ(c.dir, ckpt_dir(run, 10));
  EXPECT_EQ(c.note, "");
  fs::remove_all(run / "checkpoints");
  fs::create_directories(run / "checkpoints");
  EXPECT_THROW(train::choose_checkpoint(run.string()), CheckpointError);
}

// A plain model directory (ckpt::save_gpt, transformers' save_pretrained) has no manifest and
// no trainer state: generate and eval still read it, resume does not.
TEST(CheckpointFaults, PlainModelDirectoriesLoadForInferenceOnly) {
  const fs::path run = make_run("plain");
  const fs::path plain = scratch() / "plain_model";
  fs::remove_all(plain);
  fs::create_directories(plain);
  for (const char* f : {"config.json", "model.safetensors"}) fs::copy(fs::path(ckpt_dir(run, 20)) / f, plain / f);
  EXPECT_EQ(train::choose_checkpoint(plain.string()).dir, plain.string());
  nn::GPT model(tiny_config());
  EXPECT_THROW(train::load_checkpoint(plain.string(), model), CheckpointError);
}

// ============================================================================================
// Interrupted and failed saves
// ============================================================================================

TEST(CheckpointFaults, LeftoversOfAnInterruptedSaveAreIgnored) {
  const fs::path run = make_run("leftover");
  // A crash in the middle of step 30: a half-written temporary directory, a truncated file in it.
  const fs::path tmp = run / "checkpoints" / "step_00000030.tmp";
  fs::copy(ckpt_dir(run, 20), tmp, fs::copy_options::recursive);
  fs::remove(tmp / "manifest.json");
  const std::string s = slurp(tmp / "model.safetensors");
  write(tmp / "model.safetensors", s.substr(0, 1000));
  fs::create_directories(run / "checkpoints" / "step_00000030.old");
  EXPECT_EQ(train::list_checkpoints(run.string()), (std::vector<std::string>{"step_00000010", "step_00000020"}));
  const train::CheckpointChoice c = train::choose_checkpoint(run.string());
  EXPECT_EQ(c.dir, ckpt_dir(run, 20));
  EXPECT_EQ(c.note, "");
  EXPECT_TRUE(fs::exists(tmp)) << "choosing must not delete anything";
  // The next save of step 30 replaces the leftover.
  nn::GPT model(tiny_config());
  train::save_checkpoint(run.string(), snapshot_of(model, 30), 5);
  EXPECT_FALSE(fs::exists(tmp));
  EXPECT_EQ(train::choose_checkpoint(run.string()).dir, ckpt_dir(run, 30));
  // A renamed checkpoint directory that lost its manifest (as if written without one): skipped.
  fs::remove(fs::path(ckpt_dir(run, 30)) / "manifest.json");
  EXPECT_EQ(train::choose_checkpoint(run.string()).dir, ckpt_dir(run, 20));
}

// SIGKILL a process that saves checkpoints back to back, at random instants: every time, the
// run still resolves to a good checkpoint that loads.
TEST(CheckpointFaults, KillDuringSaveLeavesALoadableCheckpoint) {
  const fs::path run = scratch() / "killed";
  fs::remove_all(run);
  nn::GPT model(tiny_config(64));  // ~1.3 MB a checkpoint, so a kill lands mid-write often
  Rng rng(3);
  model.init_weights(rng);
  train::save_checkpoint(run.string(), snapshot_of(model, 1), 3);
  std::mt19937 gen(12345);
  int64_t next_step = 2;
  for (int trial = 0; trial < 12; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    train::CheckpointSnapshot snap = snapshot_of(model, next_step);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        for (int i = 0; i < 50; ++i, ++snap.state.step) train::save_checkpoint(run.string(), snap, 3);
      } catch (...) {
        ::_exit(3);
      }
      ::_exit(0);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 40000)(gen)));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    next_step += 50;
    const train::CheckpointChoice c = train::choose_checkpoint(run.string());
    EXPECT_EQ(c.note, "") << "a committed checkpoint was damaged by a kill";
    nn::GPT loaded(tiny_config(64));
    EXPECT_NO_THROW(train::load_checkpoint(c.dir, loaded));
  }
}

// A save that hits a full disk leaves the previous checkpoint and `latest` intact, removes its
// temporary directory and says so. Needs a small tmpfs, so root (or CAP_SYS_ADMIN).
TEST(CheckpointFaults, DiskFullDuringSaveKeepsThePreviousCheckpoint) {
  const fs::path mnt = scratch() / "small_disk";
  fs::create_directories(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=256k") != 0)
    GTEST_SKIP() << "cannot mount a small tmpfs at " << mnt << " (" << std::strerror(errno)
                 << "); run as root to test a full disk";
  struct Unmount {
    fs::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{mnt};
  const fs::path run = mnt / "run";
  nn::GPT model(tiny_config());
  train::save_checkpoint(run.string(), snapshot_of(model, 10), 5);  // ~97 KB
  const std::string latest = slurp(run / "latest");

  // Fill the disk, then free ~40 KB: step 20 gets through config.json and model.safetensors and
  // fails in optimizer.safetensors.
  {
    std::ofstream filler(mnt / "filler", std::ios::binary);
    const std::string block(4096, 'f');
    while (filler.write(block.data(), block.size()) && filler.flush()) {
    }
  }
  fs::resize_file(mnt / "filler", fs::file_size(mnt / "filler") - 40 * 1024);
  try {
    train::save_checkpoint(run.string(), snapshot_of(model, 20), 5);
    ADD_FAILURE() << "the save succeeded on a full disk";
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cannot save checkpoint step_00000020"), std::string::npos) << msg;
    EXPECT_NE(msg.find("No space left on device"), std::string::npos) << msg;
    EXPECT_NE(msg.find("the previous checkpoints and 'latest' are unchanged"), std::string::npos) << msg;
  }
  EXPECT_EQ(slurp(run / "latest"), latest);
  EXPECT_FALSE(fs::exists(run / "checkpoints" / "step_00000020.tmp"));
  EXPECT_FALSE(fs::exists(run / "checkpoints" / "step_00000020"));
  const train::CheckpointChoice c = train::choose_checkpoint(run.string());
  EXPECT_EQ(c.dir, ckpt_dir(run, 10));
  EXPECT_EQ(c.note, "");
  nn::GPT loaded(tiny_config());
  EXPECT_EQ(train::load_checkpoint(c.dir, loaded).state.step, 10);
  // With the space back, the same save succeeds.
  fs::remove(mnt / "filler");
  train::save_checkpoint(run.string(), snapshot_of(model, 20), 5);
  EXPECT_EQ(train::choose_checkpoint(run.string()).dir, ckpt_dir(run, 20));
}

// ============================================================================================
// Resume through the program
// ============================================================================================

TEST(CheckpointFaults, ResumeFallsBackAndSaysWhy) {
  const fs::path run = scratch() / "resume_run";
  fs::remove_all(run);
  const std::string tiny = " --layers 1 --heads 2 --dim 16 --context 16 --batch 2 --eval-batches 1 --sample-tokens 0 ";
  Result r = run_tutti("train" + tiny + "--steps 4 --checkpoint-interval 2 --out " + run.string());
  ASSERT_EQ(r.code, 0) << r.err;
  std::string s = slurp(fs::path(ckpt_dir(run, 4)) / "model.safetensors");
  s[s.size() / 2] ^= 1;
  write(fs::path(ckpt_dir(run, 4)) / "model.safetensors", s);
  r = run_tutti("train --resume " + run.string() + " --steps 6");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("tutti: warning: checkpoint step_00000004 is damaged (model.safetensors: checksum mismatch"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("; using step_00000002"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("resumed from " + ckpt_dir(run, 2) + " at step 2"), std::string::npos) << r.out;
  EXPECT_TRUE(train::verify_checkpoint(ckpt_dir(run, 6)).ok());
}
