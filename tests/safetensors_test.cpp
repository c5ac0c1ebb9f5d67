// safetensors: round trips, the exact bytes of a tiny file, a corruption suite (every malformed
// file must raise CheckpointError, never crash or throw anything else) and the atomic-write
// protocol (a failed write leaves what was at the path untouched).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tutti/ckpt/safetensors.hpp"

using namespace tutti;
namespace fs = std::filesystem;
using ckpt::read_safetensors;
using ckpt::write_safetensors;
using Named = std::vector<std::pair<std::string, Tensor>>;

namespace {

// ============================================================================================
// Helpers
// ============================================================================================

// A fresh directory, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "tutti_st_XXXXXX").string();
    TUTTI_CHECK(::mkdtemp(pattern.data()) != nullptr, "mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file from a header text (unpadded, as another writer might produce) and raw data bytes.
std::string make_file(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

std::string float_bytes(const std::vector<float>& v) {
  std::string s(v.size() * sizeof(float), '\0');
  if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
  return s;
}

// The outcome of reading `bytes` as a file: "" when it was accepted, else the CheckpointError
// message. Any other exception fails the test.
std::string read_outcome(const TempDir& dir, const std::string& bytes) {
  const std::string path = dir.file("probe.safetensors");
  write_bytes(path, bytes);
  try {
    read_safetensors(path);
    return "";
  } catch (const CheckpointError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(path), std::string::npos) << "the message does not name the file: " << what;
    return what.empty() ? "(empty message)" : what;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a CheckpointError: " << e.what();
    return e.what();
  }
}

// Expects `bytes` rejected with a message containing `expected`.
void expect_rejected(const TempDir& dir, const std::string& bytes, const std::string& expected) {
  const std::string message = read_outcome(dir, bytes);
  EXPECT_FALSE(message.empty()) << "accepted a malformed file; expected: " << expected;
  EXPECT_NE(message.find(expected), std::string::npos) << "message: " << message << "\nexpected to contain: " << expected;
}

// Two f32 tensors: a (2) at [0, 8), b (1) at [8, 12).
const std::string kValidHeader =
    R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
const std::string kValidData = float_bytes({1.0f, 2.0f, 3.0f});

}  // namespace

// ============================================================================================
// Round trips
// ============================================================================================

TEST(Safetensors, RoundTripOfEveryKind) {
  TempDir dir;
  Tensor matrix = Tensor::from_vector({2, 3}, std::vector<float>{0.5f, -1, 2, 3.25f, 4, -5e-8f});
  Tensor ids = Tensor::from_vector({4}, std::vector<int32_t>{7, -1, 0, 2147483647});
  Tensor empty = Tensor::zeros({0, 5});
  Tensor scalar = Tensor::from_vector({}, std::vector<float>{3.5f});
  Tensor transposed = matrix.transpose(0, 1);  // written contiguous
  Tensor half = Tensor::empty({3}, DType::bf16);
  const uint16_t half_bits[3] = {0x3f80, 0xc000, 0x7fc0};
  std::memcpy(half.raw_data(), half_bits, sizeof(half_bits));
  Tensor wide = Tensor::empty({2}, DType::i64);
  const int64_t wide_values[2] = {-(int64_t{1} << 40), 42};
  std::memcpy(wide.raw_data(), wide_values, sizeof(wide_values));

  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, {{"matrix", matrix}, {"ids", ids}, {"empty", empty}, {"scalar", scalar},
                           {"transposed", transposed}, {"half", half}, {"wide", wide}});
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"m.safetensors"});  // no temporary left

  const ckpt::SafetensorsFile file = read_safetensors(path);
  ASSERT_EQ(file.tensors.size(), 7u);
  const char* names[] = {"matrix", "ids", "empty", "scalar", "transposed", "half", "wide"};
  for (size_t i = 0; i < 7; ++i) EXPECT_EQ(file.tensors[i].first, names[i]);
  const Tensor& m = file.tensors[0].second;
  EXPECT_EQ(m.shape(), (Shape{2, 3}));
  EXPECT_EQ(m.dtype(), DType::f32);
  EXPECT_TRUE(m.device().is_cpu());
  EXPECT_EQ(m.to_vector<float>(), matrix.to_vector<float>());
  EXPECT_EQ(file.tensors[1].second.dtype(), DType::i32);
  EXPECT_EQ(file.tensors[1].second.to_vector<int32_t>(), ids.to_vector<int32_t>());
  EXPECT_EQ(file.tensors[2].second.shape(), (Shape{0, 5}));
  EXPECT_EQ(file.tensors[2].second.numel(), 0);
  EXPECT_EQ(file.tensors[3].second.ndim(), 0);
  EXPECT_EQ(file.tensors[3].second.item(), 3.5f);
  EXPECT_EQ(file.tensors[4].second.shape(), (Shape{3, 2}));
  EXPECT_EQ(file.tensors[4].second.to_vector<float>(), (std::vector<float>{0.5f, 3.25f, -1, 4, 2, -5e-8f}));
  EXPECT_EQ(file.tensors[5].second.dtype(), DType::bf16);
  EXPECT_EQ(std::memcmp(file.tensors[5].second.raw_data(), half_bits, sizeof(half_bits)), 0);
  EXPECT_EQ(file.tensors[6].second.to_vector<int64_t>(), (std::vector<int64_t>{wide_values[0], wide_values[1]}));
  EXPECT_TRUE(file.metadata.empty());
}

TEST(Safetensors, MetadataRoundTrip) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"note", "quotes \" and \\ and \xc3\xbc"}, {"empty", ""}};
  write_safetensors(path, {{"x", Tensor::full({3}, 1.0f)}}, metadata);
  const ckpt::SafetensorsFile file = read_safetensors(path);
  EXPECT_EQ(file.metadata, metadata);
  ASSERT_EQ(file.tensors.size(), 1u);
  EXPECT_EQ(file.tensors[0].second.to_vector<float>(), (std::vector<float>{1, 1, 1}));
}

TEST(Safetensors, EmptyFileHasNoTensors) {
  TempDir dir;
  const std::string path = dir.file("e.safetensors");
  write_safetensors(path, {});
  // "{}" padded with six spaces to 8 bytes.
  EXPECT_EQ(read_bytes(path), le64(8) + "{}      ");
  EXPECT_TRUE(read_safetensors(path).tensors.empty());
}

// The exact bytes, derived from the format by hand: the 8-byte little-endian header length, the
// compact JSON header with "__metadata__" first and the fields in the reference's order
// (dtype, shape, data_offsets), padded with spaces to a multiple of 8, then the data. The
// reference implementation (Python safetensors 0.8.0, save_file({"a": tensor([1., -2.])},
// metadata={"format": "pt"})) wrote these same 104 bytes.
TEST(Safetensors, ByteExactTinyFile) {
  TempDir dir;
  const std::string path = dir.file("tiny.safetensors");
  write_safetensors(path, {{"a", Tensor::from_vector({2}, std::vector<float>{1.0f, -2.0f})}}, {{"format", "pt"}});

  // {"__metadata__":{"format":"pt"},      32 characters
  // "a":{"dtype":"F32",                    19
  // "shape":[2],                           12
  // "data_offsets":[0,8]}}                 22   -> 85, padded with 3 spaces to 88 = 0x58
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"
      "   ";
  ASSERT_EQ(header.size(), 88u);
  std::string expected("\x58\x00\x00\x00\x00\x00\x00\x00", 8);
  expected += header;
  expected += std::string("\x00\x00\x80\x3f", 4);  // 1.0f  = 0x3f800000, little-endian
  expected += std::string("\x00\x00\x00\xc0", 4);  // -2.0f = 0xc0000000
  EXPECT_EQ(read_bytes(path), expected);
}

// Files from other writers: unpadded header, whitespace, header order unlike data order.
TEST(Safetensors, ReadsHandMadeFilesInDataOrder) {
  TempDir dir;
  const std::string header =
      R"( {"b": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]},
           "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": "ignored"}} )";
  int32_t b = -9;
  std::string data = float_bytes({1.5f, 2.5f}) + std::string(reinterpret_cast<const char*>(&b), 4);
  EXPECT_NE(read_outcome(dir, make_file(header, data)), "");  // must start with '{'
  const std::string trimmed = header.substr(1);
  ASSERT_EQ(read_outcome(dir, make_file(trimmed, data)), "");
  const ckpt::SafetensorsFile file = read_safetensors(dir.file("probe.safetensors"));
  ASSERT_EQ(file.tensors.size(), 2u);
  EXPECT_EQ(file.tensors[0].first, "a");
  EXPECT_EQ(file.tensors[0].second.to_vector<float>(), (std::vector<float>{1.5f, 2.5f}));
  EXPECT_EQ(file.tensors[1].first, "b");
  EXPECT_EQ(file.tensors[1].second.to_vector<int32_t>(), (std::vector<int32_t>{-9}));
}

TEST(Safetensors, HeaderIsPaddedToEightBytes) {
  TempDir dir;
  for (size_t len = 1; len <= 16; ++len) {
    const std::string path = dir.file("p.safetensors");
    write_safetensors(path, {{std::string(len, 'n'), Tensor::full({1}, 2.0f)}});
    const std::string bytes = read_bytes(path);
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u);
    EXPECT_EQ(bytes.size(), 8 + n + 4);
    EXPECT_EQ(bytes[8 + n - 1] == ' ' || bytes[8 + n - 1] == '}', true);
    EXPECT_EQ(read_safetensors(path).tensors.at(0).first, std::string(len, 'n'));
  }
}

// ============================================================================================
// Corruption suite
// ============================================================================================

TEST(SafetensorsCorruption, ValidBaselineIsAccepted) {
  TempDir dir;
  EXPECT_EQ(read_outcome(dir, make_file(kValidHeader, kValidData)), "");
}

TEST(SafetensorsCorruption, TruncatedAtEveryByte) {
  TempDir dir;
  const std::string path = dir.file("t.safetensors");
  write_safetensors(path, {{"w", Tensor::full({3, 2}, 0.25f)}, {"i", Tensor::from_vector({2}, std::vector<int32_t>{1, 2})}},
                    {{"format", "pt"}});
  const std::string good = read_bytes(path);
  for (size_t cut = 0; cut < good.size(); ++cut)
    EXPECT_NE(read_outcome(dir, good.substr(0, cut)), "") << "accepted the file cut at byte " << cut;
  EXPECT_EQ(read_outcome(dir, good), "");
}

TEST(SafetensorsCorruption, BadHeaderLength) {
  TempDir dir;
  const std::string body = kValidHeader + kValidData;
  expect_rejected(dir, le64(body.size() + 1) + body, "exceeds the");
  expect_rejected(dir, le64(uint64_t{1} << 63) + body, "header length 9223372036854775808 exceeds");
  expect_rejected(dir, le64(~uint64_t{0}) + body, "exceeds");
  expect_rejected(dir, le64(100'000'001) + body, "exceeds the limit of 100000000 bytes");
  expect_rejected(dir, le64(0) + body, "header length 0 is too small");
  expect_rejected(dir, le64(1) + body, "header length 1 is too small");
  expect_rejected(dir, "", "too short");
  expect_rejected(dir, "\x10\x00\x00", "too short");
}

TEST(SafetensorsCorruption, GarbageJson) {
  TempDir dir;
  expect_rejected(dir, make_file("{not json at all}", ""), "not valid JSON");
  expect_rejected(dir, make_file("{\"a\":", ""), "not valid JSON");
  expect_rejected(dir, make_file(kValidHeader + "}", kValidData), "not valid JSON");
  expect_rejected(dir, make_file(std::string("{\"\xff\xfe\":{}}"), ""), "not valid JSON");  // not UTF-8
  expect_rejected(dir, make_file("[1, 2, 3]", ""), "does not start with '{'");
  expect_rejected(dir, make_file(std::string("{\0}", 3), ""), "not valid JSON");
  expect_rejected(dir, make_file(std::string(16, ' '), ""), "does not start with '{'");
}

TEST(SafetensorsCorruption, BadEntries) {
  TempDir dir;
  const std::string d4 = float_bytes({1.0f});
  auto one = [&](const std::string& info) { return make_file("{\"x\":" + info + "}", d4); };
  expect_rejected(dir, one(R"({"dtype":"F64","shape":[1],"data_offsets":[0,4]})"), "unsupported dtype 'F64'");
  expect_rejected(dir, one(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})"), "unsupported dtype 'f32'");
  expect_rejected(dir, one(R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})"), "dtype is a JSON number");
  expect_rejected(dir, one(R"({"shape":[1],"data_offsets":[0,4]})"), "tensor 'x' has no \"dtype\"");
  expect_rejected(dir, one(R"({"dtype":"F32","data_offsets":[0,4]})"), "has no \"shape\"");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1]})"), "has no \"data_offsets\"");
  expect_rejected(dir, one(R"([1,2])"), "tensor 'x' is described by a JSON array");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":1,"data_offsets":[0,4]})"), "shape is a JSON number");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})"), "shape holds a negative value -1");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})"), "shape holds a non-integer");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":["1"],"data_offsets":[0,4]})"), "shape holds a non-integer");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1,1,1,1,1,1,1],"data_offsets":[0,4]})"), "7 dimensions");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})"),
                  "is too large");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]})"), "too large");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1],"data_offsets":[0]})"), "expected an array [begin, end]");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1],"data_offsets":{"0":4}})"), "expected an array");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})"), "negative value -4");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,0]})"), "end before they begin");
  expect_rejected(dir, one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,1e1]})"), "non-integer");
  expect_rejected(dir, make_file(R"({"__metadata__":{"format":1}})", ""), "\"__metadata__\" entry 'format'");
  expect_rejected(dir, make_file(R"({"__metadata__":"pt"})", ""), "\"__metadata__\" is a JSON string");
}

TEST(SafetensorsCorruption, OffsetsBeyondData) {
  TempDir dir;
  const std::string path = dir.file("probe.safetensors");
  const std::string message =
      read_outcome(dir, make_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})", float_bytes({1, 2})));
  EXPECT_NE(message.find(path + ": tensor 'x' data_offsets [0, 12] exceed the data size 8"), std::string::npos)
      << message;
}

TEST(SafetensorsCorruption, SizeMismatchWithShape) {
  TempDir dir;
  expect_rejected(dir, make_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", float_bytes({1})),
                  "tensor 'x' data_offsets [0, 4] span 4 bytes but F32 shape (2) needs 8");
  expect_rejected(dir, make_file(R"({"x":{"dtype":"I64","shape":[1],"data_offsets":[0,4]}})", float_bytes({1})),
                  "needs 8");
  expect_rejected(dir, make_file(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[0,4]}})", float_bytes({1})),
                  "needs 0");
}

TEST(SafetensorsCorruption, OverlapGapAndTrailingBytes) {
  TempDir dir;
  const std::string d12 = float_bytes({1, 2, 3});
  expect_rejected(
      dir,
      make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                d12),
      "tensor 'b' data_offsets [4, 12] overlap tensor 'a' which ends at 8");
  expect_rejected(
      dir,
      make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                float_bytes({1})),
      "overlap");
  expect_rejected(
      dir,
      make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                d12),
      "a gap of 4 bytes in the data before tensor 'b'");
  expect_rejected(dir, make_file(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", float_bytes({1, 2})),
                  "a gap of 4 bytes");
  expect_rejected(dir, make_file(kValidHeader, kValidData + "xyz"), "3 trailing bytes after the last tensor");
  expect_rejected(dir, make_file("{}", "x"), "1 trailing bytes");
  // Zero-size tensors may share an offset with their neighbours.
  EXPECT_EQ(read_outcome(dir, make_file(R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                                        R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                        R"("f":{"dtype":"I32","shape":[2,0],"data_offsets":[4,4]}})",
                                        float_bytes({1}))),
            "");
}

TEST(SafetensorsCorruption, DuplicateNames) {
  TempDir dir;
  expect_rejected(
      dir,
      make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                float_bytes({1, 2})),
      "the header names 'a' more than once");
  expect_rejected(dir,
                  make_file(R"({"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})", float_bytes({1})),
                  "names 'dtype' more than once");
  expect_rejected(dir, make_file(R"({"__metadata__":{},"__metadata__":{}})", ""), "more than once");
}

// Every single-byte change of a valid file is either still a valid file or a CheckpointError.
TEST(SafetensorsCorruption, ByteFlipsNeverCrash) {
  TempDir dir;
  const std::string good = make_file(kValidHeader, kValidData);
  int rejected = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    for (unsigned char mask : {0x01, 0x10, 0x80, 0xff}) {
      std::string bad = good;
      bad[i] = static_cast<char>(static_cast<unsigned char>(bad[i]) ^ mask);
      if (!read_outcome(dir, bad).empty()) ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {  // random garbage after a plausible length
    std::string bad = le64(rng() % 64);
    for (int j = 0; j < 64; ++j) bad.push_back(static_cast<char>("{}[]\":,0123456789-aFIE \x80"[rng() % 23]));
    read_outcome(dir, bad);
  }
}

TEST(SafetensorsCorruption, NotAFile) {
  TempDir dir;
  EXPECT_THROW(read_safetensors(dir.file("missing.safetensors")), CheckpointError);
  EXPECT_THROW(read_safetensors(dir.path().string()), CheckpointError);
}

// ============================================================================================
// Writing: atomic protocol and argument checks
// ============================================================================================

TEST(SafetensorsWrite, MissingDirectoryThrowsAndLeavesNothing) {
  TempDir dir;
  const std::string path = dir.file("absent/m.safetensors");
  EXPECT_THROW(write_safetensors(path, {{"x", Tensor::full({2}, 1.0f)}}), CheckpointError);
  EXPECT_THROW(ckpt::write_file_atomic(path, "text"), CheckpointError);
  EXPECT_TRUE(dir.entries().empty());
}

TEST(SafetensorsWrite, OverwriteReplacesContentAndLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, {{"x", Tensor::full({2}, 1.0f)}});
  write_safetensors(path, {{"y", Tensor::full({3}, 2.0f)}});
  const ckpt::SafetensorsFile file = read_safetensors(path);
  ASSERT_EQ(file.tensors.size(), 1u);
  EXPECT_EQ(file.tensors[0].first, "y");
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"m.safetensors"});
}

TEST(SafetensorsWrite, InvalidArgumentsThrowBeforeTouchingThePath) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, {{"x", Tensor::full({2}, 1.0f)}});
  const std::string before = read_bytes(path);
  EXPECT_THROW(write_safetensors(path, {{"a", Tensor::full({1}, 0.0f)}, {"a", Tensor::full({1}, 0.0f)}}),
               CheckpointError);
  EXPECT_THROW(write_safetensors(path, {{"__metadata__", Tensor::full({1}, 0.0f)}}), CheckpointError);
  EXPECT_THROW(write_safetensors(path, {{"u", Tensor()}}), CheckpointError);
  EXPECT_THROW(write_safetensors(path, {{std::string("\xff"), Tensor::full({1}, 0.0f)}}), CheckpointError);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"m.safetensors"});
}

TEST(SafetensorsWrite, RenameFailureRemovesTemporary) {
  TempDir dir;
  const std::string path = dir.file("occupied");
  fs::create_directories(fs::path(path) / "child");  // rename of a file over a non-empty directory fails
  EXPECT_THROW(write_safetensors(path, {{"x", Tensor::full({2}, 1.0f)}}), CheckpointError);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"occupied"});
}

// A write that fails half-way (here: the file-size limit makes write() fail with EFBIG) keeps
// the old file intact and removes the partial temporary.
TEST(SafetensorsWrite, FailedWriteKeepsOldContent) {
  TempDir dir;
  const std::string path = dir.file("m.safetensors");
  write_safetensors(path, {{"old", Tensor::full({4}, 1.0f)}});
  const std::string before = read_bytes(path);

  struct rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  bool threw_checkpoint_error = false;
  try {
    write_safetensors(path, {{"big", Tensor::full({1 << 16}, 2.0f)}});
  } catch (const CheckpointError& e) {
    threw_checkpoint_error = std::string(e.what()).find("write failed") != std::string::npos;
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw_checkpoint_error);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"m.safetensors"});
}

TEST(SafetensorsWrite, WriteFileAtomic) {
  TempDir dir;
  const std::string path = dir.file("latest");
  ckpt::write_file_atomic(path, "step_000010\n");
  EXPECT_EQ(read_bytes(path), "step_000010\n");
  ckpt::write_file_atomic(path, "");
  EXPECT_EQ(read_bytes(path), "");
  ckpt::write_file_atomic(path, "step_000020");
  EXPECT_EQ(read_bytes(path), "step_000020");
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"latest"});
  EXPECT_NO_THROW(ckpt::fsync_directory(dir.path().string()));
  EXPECT_THROW(ckpt::fsync_directory(dir.file("nope")), CheckpointError);
}
