// safetensors reading and writing. The reader trusts nothing in the file: every field of the
// header is checked, and the tensors are required to tile the data region exactly, before a
// single tensor byte is read. The writer follows the reference implementation's layout (compact
// JSON, "__metadata__" first, header padded with spaces to a multiple of 8) and never leaves a
// half-written file at the destination: it writes a temporary file, fsyncs it and renames it.
#include "tutti/ckpt/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>

#include "tutti/core/error.hpp"
#include "ckpt/strict_json.hpp"

namespace tutti::ckpt {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; a big-endian host would need byte swapping");

namespace {

using Json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
constexpr const char* kMetadataKey = "__metadata__";

// ============================================================================================
// File descriptors
// ============================================================================================

// Owns one POSIX file descriptor.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }
  // Closes now and reports the error close() returns (it can carry a deferred write error).
  int close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_ = -1;
};

std::string errno_text() { return std::strerror(errno); }

FileDescriptor open_or_throw(const std::string& path, int flags, mode_t mode = 0) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  TUTTI_CHECK_AS(CheckpointError, fd >= 0, path, ": cannot open: ", errno_text());
  return FileDescriptor(fd);
}

// Reads exactly `bytes` at `offset`; a short read means the file changed under us.
void read_exact(const FileDescriptor& fd, const std::string& path, void* dst, size_t bytes, uint64_t offset) {
  char* out = static_cast<char*>(dst);
  while (bytes > 0) {
    const ssize_t n = ::pread(fd.get(), out, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    TUTTI_CHECK_AS(CheckpointError, n >= 0, path, ": read failed at byte ", offset, ": ", errno_text());
    TUTTI_CHECK_AS(CheckpointError, n > 0, path, ": unexpected end of file at byte ", offset,
                   " (was the file changed while it was read?)");
    out += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void write_all(const FileDescriptor& fd, const std::string& path, const void* src, size_t bytes) {
  const char* in = static_cast<const char*>(src);
  while (bytes > 0) {
    const ssize_t n = ::write(fd.get(), in, bytes);
    if (n < 0 && errno == EINTR) continue;
    TUTTI_CHECK_AS(CheckpointError, n > 0, path, ": write failed: ", n < 0 ? errno_text() : "no progress");
    in += n;
    bytes -= static_cast<size_t>(n);
  }
}

std::string parent_directory(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Writes the bytes produced by `write_body` to `path` atomically: a temporary file beside it,
// fsync, rename over `path`, fsync of the directory. On any failure the temporary is removed
// and whatever was at `path` before is untouched.
template <class WriteBody>
void write_atomically(const std::string& path, WriteBody&& write_body) {
  TUTTI_CHECK_AS(CheckpointError, !path.empty(), "cannot write a file with an empty path");
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  try {
    FileDescriptor fd = open_or_throw(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    write_body(fd, tmp);
    TUTTI_CHECK_AS(CheckpointError, ::fsync(fd.get()) == 0, tmp, ": fsync failed: ", errno_text());
    TUTTI_CHECK_AS(CheckpointError, fd.close() == 0, tmp, ": close failed: ", errno_text());
    TUTTI_CHECK_AS(CheckpointError, ::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename ", tmp, " to ", path,
                   ": ", errno_text());
  } catch (...) {
    ::unlink(tmp.c_str());  // may not exist (open failed); nothing else to do about an error here
    throw;
  }
  fsync_directory(parent_directory(path));
}

// ============================================================================================
// Header parsing and validation
// ============================================================================================

std::optional<DType> parse_dtype(const std::string& name) {
  if (name == "F32") return DType::f32;
  if (name == "BF16") return DType::bf16;
  if (name == "F16") return DType::f16;
  if (name == "I32") return DType::i32;
  if (name == "I64") return DType::i64;
  return std::nullopt;
}

const char* dtype_tag(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
  }
  return "?";
}

struct Entry {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // within the data region
};

// Parses the header JSON, rejecting duplicate keys at any level (nlohmann keeps the last one
// silently, which would let two different tensors share a name unnoticed).
Json parse_header_json(const std::string& path, const std::string& text) {
  std::string duplicate;
  Json header;
  try {
    header = parse_json_noting_duplicates(text, duplicate);
  } catch (const nlohmann::json::exception& e) {
    TUTTI_FAIL(CheckpointError, path, ": the header is not valid JSON: ", e.what());
  }
  TUTTI_CHECK_AS(CheckpointError, duplicate.empty(), path, ": the header names '", duplicate, "' more than once");
  TUTTI_CHECK_AS(CheckpointError, header.is_object(), path, ": the header is a JSON ", header.type_name(),
                 ", expected an object");
  return header;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const Json& value) {
  TUTTI_CHECK_AS(CheckpointError, value.is_object(), path, ": \"__metadata__\" is a JSON ", value.type_name(),
                 ", expected an object of strings");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, v] : value.items()) {
    TUTTI_CHECK_AS(CheckpointError, v.is_string(), path, ": \"__metadata__\" entry '", key, "' is a JSON ",
                   v.type_name(), ", expected a string");
    metadata[key] = v.get<std::string>();
  }
  return metadata;
}

// Reads one unsigned integer of a JSON array, or throws naming `what`.
uint64_t parse_unsigned(const std::string& path, const std::string& name, const char* what, const Json& v) {
  TUTTI_CHECK_AS(CheckpointError, v.is_number_integer(), path, ": tensor '", name, "' ", what,
                 " holds a non-integer ", v.dump());
  TUTTI_CHECK_AS(CheckpointError, v.is_number_unsigned(), path, ": tensor '", name, "' ", what,
                 " holds a negative value ", v.dump());
  return v.get<uint64_t>();
}

Entry parse_entry(const std::string& path, const std::string& name, const Json& info) {
  TUTTI_CHECK_AS(CheckpointError, info.is_object(), path, ": tensor '", name, "' is described by a JSON ",
                 info.type_name(), ", expected an object with dtype, shape and data_offsets");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    TUTTI_CHECK_AS(CheckpointError, info.contains(key), path, ": tensor '", name, "' has no \"", key, "\"");
  Entry e;
  e.name = name;

  const Json& dtype = info["dtype"];
  TUTTI_CHECK_AS(CheckpointError, dtype.is_string(), path, ": tensor '", name, "' dtype is a JSON ", dtype.type_name(),
                 ", expected a string");
  const std::optional<DType> parsed = parse_dtype(dtype.get<std::string>());
  TUTTI_CHECK_AS(CheckpointError, parsed.has_value(), path, ": tensor '", name, "' has unsupported dtype '",
                 dtype.get<std::string>(), "' (tutti reads F32, BF16, F16, I32 and I64)");
  e.dtype = *parsed;

  const Json& shape = info["shape"];
  TUTTI_CHECK_AS(CheckpointError, shape.is_array(), path, ": tensor '", name, "' shape is a JSON ", shape.type_name(),
                 ", expected an array");
  TUTTI_CHECK_AS(CheckpointError, shape.size() <= static_cast<size_t>(kMaxDims), path, ": tensor '", name, "' has ",
                 shape.size(), " dimensions; tutti supports at most ", kMaxDims);
  // numel x dtype size must not overflow: bound the product by the largest signed 64-bit value.
  const uint64_t limit = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t bytes = dtype_size(e.dtype);
  for (const Json& d : shape) {
    const uint64_t dim = parse_unsigned(path, name, "shape", d);
    TUTTI_CHECK_AS(CheckpointError, dim <= limit && (dim == 0 || bytes <= limit / dim), path, ": tensor '", name,
                   "' shape ", shape.dump(), " is too large");
    bytes *= dim;
    e.shape.push_back(static_cast<int64_t>(dim));
  }

  const Json& offsets = info["data_offsets"];
  TUTTI_CHECK_AS(CheckpointError, offsets.is_array() && offsets.size() == 2, path, ": tensor '", name,
                 "' data_offsets is ", offsets.dump(), ", expected an array [begin, end]");
  e.begin = parse_unsigned(path, name, "data_offsets", offsets[0]);
  e.end = parse_unsigned(path, name, "data_offsets", offsets[1]);
  TUTTI_CHECK_AS(CheckpointError, e.begin <= e.end, path, ": tensor '", name, "' data_offsets [", e.begin, ", ", e.end,
                 "] end before they begin");
  TUTTI_CHECK_AS(CheckpointError, e.end - e.begin == bytes, path, ": tensor '", name, "' data_offsets [", e.begin,
                 ", ", e.end, "] span ", e.end - e.begin, " bytes but ", dtype_tag(e.dtype), " shape ",
                 e.shape.str(), " needs ", bytes);
  return e;
}

// The tensors, sorted by offset, must tile [0, data_size) exactly: no overlap, no gap, nothing
// after the last one. Zero-size tensors may share an offset, as the reference allows.
void check_layout(const std::string& path, std::vector<Entry>& entries, uint64_t header_bytes, uint64_t data_size) {
  for (const Entry& e : entries)
    TUTTI_CHECK_AS(CheckpointError, e.end <= data_size, path, ": tensor '", e.name, "' data_offsets [", e.begin, ", ",
                   e.end, "] exceed the data size ", data_size);
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const Entry* previous = nullptr;
  for (const Entry& e : entries) {
    TUTTI_CHECK_AS(CheckpointError, e.begin >= expected, path, ": tensor '", e.name, "' data_offsets [", e.begin, ", ",
                   e.end, "] overlap tensor '", previous ? previous->name : "", "' which ends at ", expected);
    TUTTI_CHECK_AS(CheckpointError, e.begin == expected, path, ": a gap of ", e.begin - expected,
                   " bytes in the data before tensor '", e.name, "' (bytes [", expected, ", ", e.begin,
                   ") belong to no tensor)");
    expected = e.end;
    previous = &e;
  }
  TUTTI_CHECK_AS(CheckpointError, expected == data_size, path, ": ", data_size - expected,
                 " trailing bytes after the last tensor (file length ", 8 + header_bytes + data_size,
                 ", expected 8 + ", header_bytes, " + ", expected, " = ", 8 + header_bytes + expected, ")");
}

}  // namespace

// ============================================================================================
// Reading
// ============================================================================================

SafetensorsFile read_safetensors(const std::string& path) {
  FileDescriptor fd = open_or_throw(path, O_RDONLY);
  struct stat st{};
  TUTTI_CHECK_AS(CheckpointError, ::fstat(fd.get(), &st) == 0, path, ": cannot stat: ", errno_text());
  TUTTI_CHECK_AS(CheckpointError, S_ISREG(st.st_mode), path, ": not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  TUTTI_CHECK_AS(CheckpointError, file_size >= 8, path, ": file of ", file_size,
                 " bytes is too short for the 8-byte header length");

  unsigned char length_bytes[8];
  read_exact(fd, path, length_bytes, sizeof(length_bytes), 0);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length_bytes[i];
  TUTTI_CHECK_AS(CheckpointError, header_bytes >= 2, path, ": header length ", header_bytes,
                 " is too small for a JSON object");
  TUTTI_CHECK_AS(CheckpointError, header_bytes <= kMaxHeaderBytes, path, ": header length ", header_bytes,
                 " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  TUTTI_CHECK_AS(CheckpointError, header_bytes <= file_size - 8, path, ": header length ", header_bytes,
                 " exceeds the ", file_size - 8, " bytes after the length field (file truncated?)");
  const uint64_t data_size = file_size - 8 - header_bytes;

  std::string text(static_cast<size_t>(header_bytes), '\0');
  read_exact(fd, path, text.data(), text.size(), 8);
  TUTTI_CHECK_AS(CheckpointError, text[0] == '{', path, ": the header does not start with '{'");
  const Json header = parse_header_json(path, text);

  SafetensorsFile file;
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == kMetadataKey) {
      file.metadata = parse_metadata(path, info);
    } else {
      entries.push_back(parse_entry(path, name, info));
    }
  }
  check_layout(path, entries, header_bytes, data_size);

  // Everything is validated: now read the tensors, in file order.
  file.tensors.reserve(entries.size());
  for (const Entry& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype, Device::cpu());
    read_exact(fd, path, t.raw_data(), t.nbytes(), 8 + header_bytes + e.begin);
    file.tensors.emplace_back(e.name, std::move(t));
  }
  return file;
}

// ============================================================================================
// Writing
// ============================================================================================

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Bring every tensor to the host first, so a device error can't leave a partial file behind.
  std::vector<Tensor> host;
  host.reserve(tensors.size());
  std::set<std::string> names;
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TUTTI_CHECK_AS(CheckpointError, name != kMetadataKey, path, ": a tensor cannot be named \"", kMetadataKey, "\"");
    TUTTI_CHECK_AS(CheckpointError, names.insert(name).second, path, ": tensor name '", name, "' given twice");
    TUTTI_CHECK_AS(CheckpointError, tensor.defined(), path, ": tensor '", name, "' is undefined");
    Tensor t = tensor.to(Device::cpu()).contiguous();
    Json info = Json::object();
    info["dtype"] = dtype_tag(t.dtype());
    info["shape"] = t.shape().vec();
    info["data_offsets"] = {offset, offset + t.nbytes()};
    header[name] = std::move(info);
    offset += t.nbytes();
    host.push_back(std::move(t));
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // a name or metadata value that is not UTF-8
    TUTTI_FAIL(CheckpointError, path, ": cannot encode the header: ", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = static_cast<unsigned char>(static_cast<uint64_t>(text.size()) >> (8 * i));

  write_atomically(path, [&](const FileDescriptor& fd, const std::string& tmp) {
    write_all(fd, tmp, length_bytes, sizeof(length_bytes));
    write_all(fd, tmp, text.data(), text.size());
    for (const Tensor& t : host) write_all(fd, tmp, t.raw_data(), t.nbytes());
  });
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_atomically(path, [&](const FileDescriptor& fd, const std::string& tmp) {
    write_all(fd, tmp, contents.data(), contents.size());
  });
}

void fsync_directory(const std::string& path) {
  FileDescriptor fd = open_or_throw(path, O_RDONLY | O_DIRECTORY);
  TUTTI_CHECK_AS(CheckpointError, ::fsync(fd.get()) == 0, path, ": fsync of the directory failed: ", errno_text());
}

}  // namespace tutti::ckpt
