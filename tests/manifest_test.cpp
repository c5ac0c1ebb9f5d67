// Checkpoint manifests: round trip, the strict parser, file digests and checks against files.
#include "tutti/ckpt/manifest.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "process_util.hpp"
#include "tutti/core/error.hpp"

namespace fs = std::filesystem;
using namespace tutti;
using tutti::test::scratch;
using tutti::test::slurp;

namespace {

ckpt::Manifest sample() {
  ckpt::Manifest m;
  m.step = 20;
  m.layout = {.dp = 2, .pp = 2, .tp = 1, .zero = 1, .world = 4};
  m.config_hash = "xxh3_64:0123456789abcdef";
  m.files["config.json"] = {515, 0xcded95b5120e3b7cull};
  m.files["model.safetensors"] = {32136, 0x1b98f99d901c0726ull};
  return m;
}

void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary | std::ios::trunc) << text; }

// Parsing `text` throws CheckpointError mentioning `what`.
void expect_rejected(const std::string& text, const std::string& what) {
  try {
    ckpt::parse_manifest(text, "m.json");
    ADD_FAILURE() << "accepted: " << text;
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << "'" << what << "' not in: " << e.what();
    EXPECT_EQ(std::string(e.what()).rfind("m.json", 0), 0u) << e.what();
  }
}

// sample() as text with `from` replaced by `to`.
std::string edited(const std::string& from, const std::string& to) {
  std::string text = ckpt::format_manifest(sample());
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return text.replace(at, from.size(), to);
}

}  // namespace

TEST(Manifest, RoundTrip) {
  const ckpt::Manifest m = sample();
  const std::string text = ckpt::format_manifest(m);
  EXPECT_EQ(ckpt::parse_manifest(text, "m.json"), m);
  EXPECT_NE(text.find("\"xxh3_64\": \"1b98f99d901c0726\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"dp\": 2"), std::string::npos) << text;
  ckpt::Manifest empty;  // no config hash, no files
  EXPECT_EQ(ckpt::parse_manifest(ckpt::format_manifest(empty), "m.json"), empty);
}

// Manifests written before model parallelism have no pp and tp: they mean 1 and 1.
TEST(Manifest, LayoutWithoutPipelineOrTensorParallelismReadsAsOne) {
  ckpt::Manifest m = sample();
  m.layout = {.dp = 4, .zero = 1, .world = 4};
  std::string text = ckpt::format_manifest(m);
  for (const std::string key : {"\"pp\": 1,", "\"tp\": 1,"}) {
    const size_t at = text.find(key);
    ASSERT_NE(at, std::string::npos) << text;
    text.erase(at, key.size());
  }
  EXPECT_EQ(ckpt::parse_manifest(text, "old.json").layout, m.layout);
}

TEST(Manifest, ParserRejectsAnythingElse) {
  expect_rejected("", "not valid JSON");
  expect_rejected("[1, 2]", "expected an object");
  expect_rejected(ckpt::format_manifest(sample()).substr(0, 100), "not valid JSON");
  expect_rejected(edited("tutti-checkpoint-manifest/1", "tutti-checkpoint-manifest/9"), "format");
  expect_rejected(edited("\"step\": 20", "\"step\": -1"), "step");
  expect_rejected(edited("\"step\": 20", "\"step\": 2.5"), "step");
  expect_rejected(edited("\"step\": 20", "\"step\": \"20\""), "step");
  expect_rejected(edited("\"step\": 20,", ""), "no \"step\"");
  expect_rejected(edited("\"dp\": 2", "\"dp\": 0"), "layout.dp");
  expect_rejected(edited("\"zero\": 1", "\"zero\": 4"), "layout.zero");
  expect_rejected(edited("\"world\": 4", "\"world\": 3"), "is not dp x pp x tp = 2 x 2 x 1");
  expect_rejected(edited("\"pp\": 2", "\"pp\": 0"), "layout.pp");
  expect_rejected(edited("\"world\": 4", "\"world\": 18446744073709551615"), "layout.world");
  expect_rejected(edited("xxh3_64:0123456789abcdef", "md5:0123"), "config_hash");
  expect_rejected(edited("1b98f99d901c0726", "1B98F99D901C0726"), "hex");
  expect_rejected(edited("1b98f99d901c0726", "1b98f99d"), "hex");
  expect_rejected(edited("\"bytes\": 32136", "\"bytes\": -5"), "bytes");
  expect_rejected(edited("\"bytes\": 32136,", ""), "no \"bytes\"");
  for (const char* name : {"../model.safetensors", "sub/model.safetensors", "manifest.json", "", "..", "."})
    expect_rejected(edited("\"model.safetensors\"", "\"" + std::string(name) + "\""), "plain file name");
  expect_rejected(edited("\"model.safetensors\"", "\"a\\u0000b\""), "plain file name");
  expect_rejected(edited("\"config.json\"", "\"model.safetensors\""), "twice");
  expect_rejected(edited("\"step\": 20", "\"step\": 20, \"step\": 21"), "twice");
  expect_rejected(std::string(1'000'001, ' '), "more than a manifest can hold");
}

TEST(Manifest, DigestIsXxh3OfTheWholeFile) {
  const fs::path p = scratch() / "digest.bin";
  write(p, "");
  EXPECT_EQ(ckpt::digest_file(p.string()), (ckpt::FileDigest{0, 0x2D06800538D394C2ull}));  // XXH3_64bits("")
  std::string big(3 << 20, 'x');  // more than one read chunk
  for (size_t i = 0; i < big.size(); i += 4099) big[i] = char(i);
  write(p, big);
  EXPECT_EQ(ckpt::digest_file(p.string()), (ckpt::FileDigest{big.size(), ckpt::xxh3_64(big)}));
  EXPECT_EQ(ckpt::hex64(0x2D06800538D394C2ull), "2d06800538d394c2");
  EXPECT_THROW(ckpt::digest_file((scratch() / "absent").string()), CheckpointError);
}

TEST(Manifest, CheckFilesFindsEveryKindOfDamage) {
  const fs::path dir = scratch() / "checked";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* name : {"a.bin", "b.bin", "c.bin", "d.bin", "e.bin"}) write(dir / name, std::string(1000, name[0]));
  const ckpt::Manifest written =
      ckpt::write_manifest(dir.string(), 7, {}, "", {"a.bin", "b.bin", "c.bin", "d.bin", "e.bin"});
  EXPECT_EQ(ckpt::read_manifest(dir.string()), written);
  for (const ckpt::FileCheck& c : ckpt::check_files(dir.string(), written)) EXPECT_EQ(c.problem, "") << c.name;

  std::string flipped = slurp(dir / "b.bin");
  flipped[500] ^= 1;
  write(dir / "b.bin", flipped);
  write(dir / "c.bin", std::string(999, 'c'));
  fs::remove(dir / "d.bin");
  fs::remove(dir / "e.bin");
  fs::create_directory(dir / "e.bin");
  std::map<std::string, std::string> problems;
  for (const ckpt::FileCheck& c : ckpt::check_files(dir.string(), written)) problems[c.name] = c.problem;
  EXPECT_EQ(problems["a.bin"], "");
  EXPECT_NE(problems["b.bin"].find("checksum mismatch"), std::string::npos) << problems["b.bin"];
  EXPECT_NE(problems["c.bin"].find("999 bytes, the manifest says 1000 (truncated)"), std::string::npos) << problems["c.bin"];
  EXPECT_NE(problems["d.bin"].find("missing"), std::string::npos) << problems["d.bin"];
  EXPECT_NE(problems["e.bin"].find("not a regular file"), std::string::npos) << problems["e.bin"];

  write(dir / "manifest.json", "{\"format\": ");
  EXPECT_THROW(ckpt::read_manifest(dir.string()), CheckpointError);
  fs::remove(dir / "manifest.json");
  EXPECT_THROW(ckpt::read_manifest(dir.string()), CheckpointError);
}
