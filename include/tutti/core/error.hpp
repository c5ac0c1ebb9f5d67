// Errors: every failure in the library is an exception with context; only main() catches.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace tutti {

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file = "", int line = 0)
      : std::runtime_error(message), file_(file), line_(line) {}
  const char* file() const { return file_; }
  int line() const { return line_; }

 private:
  const char* file_;
  int line_;
};

class InvalidArgument : public Error { using Error::Error; };
class ConfigError : public Error { using Error::Error; };
class CheckpointError : public Error { using Error::Error; };
class DataError : public Error { using Error::Error; };
class CommError : public Error { using Error::Error; };
class Timeout : public Error { using Error::Error; };

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
template <class E, class... Args>
[[noreturn]] void fail(const char* file, int line, const Args&... args) {
  throw E(concat(args...), file, line);
}
}  // namespace detail

}  // namespace tutti

// TUTTI_CHECK(cond, "message ", value, ...) throws tutti::Error with the message and file:line.
#define TUTTI_CHECK(cond, ...) \
  do { if (!(cond)) ::tutti::detail::fail<::tutti::Error>(__FILE__, __LINE__, __VA_ARGS__); } while (0)
// TUTTI_CHECK_AS(ExceptionType, cond, ...) throws the given subclass.
#define TUTTI_CHECK_AS(E, cond, ...) \
  do { if (!(cond)) ::tutti::detail::fail<E>(__FILE__, __LINE__, __VA_ARGS__); } while (0)
#define TUTTI_FAIL(E, ...) ::tutti::detail::fail<E>(__FILE__, __LINE__, __VA_ARGS__)
