// Checkpoint manifests: writing, strict parsing, and checking files against them with xxHash.
#include "tutti/ckpt/manifest.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <set>
#include <vector>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "tutti/ckpt/safetensors.hpp"
#include "tutti/core/error.hpp"
#include "ckpt/strict_json.hpp"

namespace tutti::ckpt {

namespace {

using Json = nlohmann::ordered_json;
namespace fs = std::filesystem;

constexpr size_t kMaxManifestBytes = 1'000'000;
constexpr const char* kChecksumKey = "xxh3_64";
constexpr const char* kConfigHashPrefix = "xxh3_64:";

// ============================================================================================
// Parsing helpers
// ============================================================================================

// Parses JSON, rejecting duplicate keys at any level (nlohmann would keep the last silently).
Json parse_strict(const std::string& path, const std::string& text) {
  std::string duplicate;
  Json j;
  try {
    j = parse_json_noting_duplicates(text, duplicate);
  } catch (const nlohmann::json::exception& e) {
    TUTTI_FAIL(CheckpointError, path, ": not valid JSON: ", e.what());
  }
  TUTTI_CHECK_AS(CheckpointError, duplicate.empty(), path, ": the key '", duplicate, "' appears twice in one object");
  TUTTI_CHECK_AS(CheckpointError, j.is_object(), path, ": a JSON ", j.type_name(), ", expected an object");
  return j;
}

const Json& field(const std::string& path, const Json& object, const char* key, const char* where) {
  TUTTI_CHECK_AS(CheckpointError, object.contains(key), path, ": ", where, " has no \"", key, "\"");
  return object[key];
}

// An integer in [lo, hi].
int64_t integer(const std::string& path, const Json& v, const char* what, int64_t lo, int64_t hi) {
  TUTTI_CHECK_AS(CheckpointError, v.is_number_integer(), path, ": ", what, " is ", v.dump(), ", expected an integer");
  // lo >= 0 and hi >= lo here, so an unsigned value fits when it lies in [lo, hi] as unsigned.
  const bool fits = v.is_number_unsigned()
                        ? v.get<uint64_t>() >= static_cast<uint64_t>(lo) && v.get<uint64_t>() <= static_cast<uint64_t>(hi)
                        : v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;
  TUTTI_CHECK_AS(CheckpointError, fits, path, ": ", what, " is ", v.dump(), ", outside [", lo, ", ", hi, "]");
  return v.is_number_unsigned() ? static_cast<int64_t>(v.get<uint64_t>()) : v.get<int64_t>();
}

bool is_hex64(const std::string& s) {
  if (s.size() != 16) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

uint64_t parse_hex64(const std::string& s) { return std::stoull(s, nullptr, 16); }

// A file name inside the checkpoint directory: no separators, not "." or "..", not the manifest.
bool is_plain_name(const std::string& name) {
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." && name != kManifestFile &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

std::string errno_text() { return std::strerror(errno); }

// Owns a file descriptor for the duration of a read.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

struct Xxh3StateDeleter {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};

}  // namespace

// ============================================================================================
// Formatting and parsing
// ============================================================================================

std::string hex64(uint64_t value) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, value >>= 4) s[static_cast<size_t>(i)] = digits[value & 0xf];
  return s;
}

uint64_t xxh3_64(const std::string& bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

std::string format_manifest(const Manifest& m) {
  Json j = Json::object();
  j["format"] = kManifestFormat;
  j["step"] = m.step;
  j["layout"] = {{"dp", m.layout.dp}, {"pp", m.layout.pp}, {"tp", m.layout.tp}, {"zero", m.layout.zero},
                 {"world", m.layout.world}};
  j["config_hash"] = m.config_hash;
  Json files = Json::object();
  for (const auto& [name, d] : m.files) files[name] = {{"bytes", d.bytes}, {kChecksumKey, hex64(d.xxh3)}};
  j["files"] = std::move(files);
  return j.dump(2) + "\n";
}

Manifest parse_manifest(const std::string& text, const std::string& path) {
  TUTTI_CHECK_AS(CheckpointError, text.size() <= kMaxManifestBytes, path, ": ", text.size(),
                 " bytes, more than a manifest can hold (", kMaxManifestBytes, ")");
  const Json j = parse_strict(path, text);
  const Json& format = field(path, j, "format", "the manifest");
  TUTTI_CHECK_AS(CheckpointError, format.is_string() && format.get<std::string>() == kManifestFormat, path,
                 ": format is ", format.dump(), ", expected \"", kManifestFormat, "\"");
  Manifest m;
  m.step = integer(path, field(path, j, "step", "the manifest"), "step", 0, std::numeric_limits<int64_t>::max());

  const Json& layout = field(path, j, "layout", "the manifest");
  TUTTI_CHECK_AS(CheckpointError, layout.is_object(), path, ": layout is a JSON ", layout.type_name(),
                 ", expected an object {\"dp\", \"zero\", \"world\"}");
  constexpr int64_t kMaxRanks = 1 << 24;
  m.layout.dp = integer(path, field(path, layout, "dp", "layout"), "layout.dp", 1, kMaxRanks);
  m.layout.zero = integer(path, field(path, layout, "zero", "layout"), "layout.zero", 0, 3);
  m.layout.world = integer(path, field(path, layout, "world", "layout"), "layout.world", 1, kMaxRanks);
  // pp and tp came with model parallelism; a manifest without them was written with 1 and 1.
  if (layout.contains("pp")) m.layout.pp = integer(path, layout.at("pp"), "layout.pp", 1, kMaxRanks);
  if (layout.contains("tp")) m.layout.tp = integer(path, layout.at("tp"), "layout.tp", 1, kMaxRanks);
  TUTTI_CHECK_AS(CheckpointError, m.layout.world == m.layout.dp * m.layout.pp * m.layout.tp, path, ": layout.world ",
                 m.layout.world, " is not dp x pp x tp = ", m.layout.dp, " x ", m.layout.pp, " x ", m.layout.tp);

  const Json& config_hash = field(path, j, "config_hash", "the manifest");
  TUTTI_CHECK_AS(CheckpointError, config_hash.is_string(), path, ": config_hash is ", config_hash.dump(),
                 ", expected a string");
  m.config_hash = config_hash.get<std::string>();
  const std::string prefix = kConfigHashPrefix;
  TUTTI_CHECK_AS(CheckpointError,
                 m.config_hash.empty() ||
                     (m.config_hash.rfind(prefix, 0) == 0 && is_hex64(m.config_hash.substr(prefix.size()))),
                 path, ": config_hash ", config_hash.dump(), " is not \"xxh3_64:\" and 16 hex digits");

  const Json& files = field(path, j, "files", "the manifest");
  TUTTI_CHECK_AS(CheckpointError, files.is_object(), path, ": files is a JSON ", files.type_name(),
                 ", expected an object");
  for (const auto& [name, info] : files.items()) {
    TUTTI_CHECK_AS(CheckpointError, is_plain_name(name), path, ": files lists ", Json(name).dump(),
                   ", not a plain file name of the checkpoint directory");
    const std::string where = "file '" + name + "'";
    TUTTI_CHECK_AS(CheckpointError, info.is_object(), path, ": ", where, " is described by a JSON ", info.type_name(),
                   ", expected {\"bytes\", \"", kChecksumKey, "\"}");
    FileDigest d;
    d.bytes = static_cast<uint64_t>(integer(path, field(path, info, "bytes", where.c_str()), (where + " bytes").c_str(),
                                            0, std::numeric_limits<int64_t>::max()));
    const Json& sum = field(path, info, kChecksumKey, where.c_str());
    TUTTI_CHECK_AS(CheckpointError, sum.is_string() && is_hex64(sum.get<std::string>()), path, ": ", where, " ",
                   kChecksumKey, " is ", sum.dump(), ", expected 16 lower-case hex digits");
    d.xxh3 = parse_hex64(sum.get<std::string>());
    m.files.emplace(name, d);
  }
  return m;
}

// ============================================================================================
// Files
// ============================================================================================

FileDigest digest_file(const std::string& path) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  TUTTI_CHECK_AS(CheckpointError, fd >= 0, path, ": cannot open: ", errno_text());
  FdCloser closer{fd};
  std::unique_ptr<XXH3_state_t, Xxh3StateDeleter> state(XXH3_createState());
  TUTTI_CHECK_AS(CheckpointError, state && XXH3_64bits_reset(state.get()) == XXH_OK, "xxHash: cannot allocate a state");
  std::vector<char> buffer(1 << 20);
  FileDigest d;
  for (;;) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    TUTTI_CHECK_AS(CheckpointError, n >= 0, path, ": read failed at byte ", d.bytes, ": ", errno_text());
    if (n == 0) break;
    XXH3_64bits_update(state.get(), buffer.data(), static_cast<size_t>(n));
    d.bytes += static_cast<uint64_t>(n);
  }
  d.xxh3 = XXH3_64bits_digest(state.get());
  return d;
}

Manifest read_manifest(const std::string& dir) {
  const std::string path = (fs::path(dir) / kManifestFile).string();
  std::error_code ec;
  TUTTI_CHECK_AS(CheckpointError, fs::exists(path, ec), path, ": missing");
  TUTTI_CHECK_AS(CheckpointError, fs::is_regular_file(path, ec), path, ": not a regular file");
  const uintmax_t size = fs::file_size(path, ec);
  TUTTI_CHECK_AS(CheckpointError, !ec && size <= kMaxManifestBytes, path, ": ", size,
                 " bytes, more than a manifest can hold");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TUTTI_CHECK_AS(CheckpointError, fd >= 0, path, ": cannot open: ", errno_text());
  FdCloser closer{fd};
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    TUTTI_CHECK_AS(CheckpointError, n >= 0, path, ": read failed: ", errno_text());
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    TUTTI_CHECK_AS(CheckpointError, text.size() <= kMaxManifestBytes, path, ": more than a manifest can hold");
  }
  return parse_manifest(text, path);
}

Manifest write_manifest(const std::string& dir, int64_t step, const CheckpointLayout& layout,
                        const std::string& config_hash, const std::vector<std::string>& files) {
  Manifest m;
  m.step = step;
  m.layout = layout;
  m.config_hash = config_hash;
  for (const std::string& name : files) {
    TUTTI_CHECK_AS(CheckpointError, is_plain_name(name), "cannot list '", name, "' in a manifest");
    m.files[name] = digest_file((fs::path(dir) / name).string());
  }
  write_file_atomic((fs::path(dir) / kManifestFile).string(), format_manifest(m));
  return m;
}

std::vector<FileCheck> check_files(const std::string& dir, const Manifest& manifest) {
  std::vector<FileCheck> checks;
  for (const auto& [name, expected] : manifest.files) {
    FileCheck c{name, expected, std::nullopt, ""};
    const std::string path = (fs::path(dir) / name).string();
    struct stat st{};
    if (::lstat(path.c_str(), &st) != 0) {
      c.problem = errno == ENOENT ? "listed in the manifest but missing" : "cannot stat: " + errno_text();
    } else if (!S_ISREG(st.st_mode)) {
      c.problem = "not a regular file";
    } else if (static_cast<uint64_t>(st.st_size) != expected.bytes) {
      c.actual = FileDigest{static_cast<uint64_t>(st.st_size), 0};
      c.problem = std::to_string(st.st_size) + " bytes, the manifest says " + std::to_string(expected.bytes) +
                  (static_cast<uint64_t>(st.st_size) < expected.bytes ? " (truncated)" : "");
    } else {
      try {
        c.actual = digest_file(path);
        if (c.actual->bytes != expected.bytes)
          c.problem = "changed while it was read";
        else if (c.actual->xxh3 != expected.xxh3)
          c.problem = "checksum mismatch (xxh3_64 " + hex64(c.actual->xxh3) + ", the manifest says " +
                      hex64(expected.xxh3) + ")";
      } catch (const CheckpointError& e) {
        c.problem = e.what();
      }
    }
    checks.push_back(std::move(c));
  }
  return checks;
}

}  // namespace tutti::ckpt
