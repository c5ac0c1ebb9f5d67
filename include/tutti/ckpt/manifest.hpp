// The manifest of a checkpoint directory: `manifest.json`, written last, names every file of the
// checkpoint with its size and XXH3-64 checksum, the step, and the layout that wrote it:
//
//   {"format": "tutti-checkpoint-manifest/1", "step": 20,
//    "layout": {"dp": 2, "zero": 1, "world": 2}, "config_hash": "xxh3_64:5c0e...",
//    "files": {"config.json": {"bytes": 702, "xxh3_64": "9f1c2a..."}, ...}}
//
// A checkpoint is complete and undamaged exactly when its manifest parses and every file it lists
// is present with that size and checksum. This part depends on nothing but JSON and xxHash, so the
// parser can be fuzzed on its own (fuzz/manifest_fuzz.cpp).
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tutti::ckpt {

inline constexpr const char* kManifestFile = "manifest.json";
inline constexpr const char* kManifestFormat = "tutti-checkpoint-manifest/1";

// How the training job that wrote a checkpoint was split. Checkpoints hold the single-process
// layout of every tensor whatever wrote them; this records the writer for inspection, agreement
// between ranks and resharding decisions.
struct CheckpointLayout {
  int64_t dp = 1;     // data-parallel replicas
  int64_t pp = 1;     // pipeline stages
  int64_t tp = 1;     // tensor-parallel ranks per stage
  int64_t zero = 0;   // ZeRO stage (0: none)
  int64_t world = 1;  // ranks in the job: dp x pp x tp
  bool operator==(const CheckpointLayout&) const = default;
};

struct FileDigest {
  uint64_t bytes = 0;
  uint64_t xxh3 = 0;  // XXH3_64bits of the whole file, seed 0
  bool operator==(const FileDigest&) const = default;
};

struct Manifest {
  int64_t step = 0;
  CheckpointLayout layout;
  std::string config_hash;                  // "xxh3_64:<16 hex>" of the model shape, "" when unknown
  std::map<std::string, FileDigest> files;  // file name within the directory -> digest
  bool operator==(const Manifest&) const = default;
};

// The manifest as JSON text (ends with a newline).
std::string format_manifest(const Manifest& manifest);
// Parses and validates manifest text; `path` names it in errors. Throws CheckpointError on
// anything but the format above: unknown format tag, missing or mistyped fields, negative or
// out-of-range numbers, file names that are not plain names, checksums that are not 16 lower-case
// hex digits, duplicate keys, or more than 1 MB of text.
Manifest parse_manifest(const std::string& text, const std::string& path);

// Reads `dir`/manifest.json (CheckpointError when missing or invalid).
Manifest read_manifest(const std::string& dir);
// Hashes the named files of `dir` and writes `dir`/manifest.json atomically (temporary file,
// fsync, rename). Returns what it wrote.
Manifest write_manifest(const std::string& dir, int64_t step, const CheckpointLayout& layout,
                        const std::string& config_hash, const std::vector<std::string>& files);

// Size and XXH3-64 of a file, read in chunks. Throws CheckpointError when it cannot be read.
FileDigest digest_file(const std::string& path);
// XXH3-64 of a byte string.
uint64_t xxh3_64(const std::string& bytes);
// 16 lower-case hex digits.
std::string hex64(uint64_t value);

// The result of checking one listed file against the manifest.
struct FileCheck {
  std::string name;
  FileDigest expected;
  std::optional<FileDigest> actual;  // absent when the file could not be read
  std::string problem;               // "" when the file matches
};
// Checks every file the manifest lists against what is in `dir`: present, a regular file, same
// size, same checksum (hashed only when the size matches). Never throws for a damaged file.
std::vector<FileCheck> check_files(const std::string& dir, const Manifest& manifest);

}  // namespace tutti::ckpt
