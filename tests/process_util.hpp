// Helpers for tests that run the tutti program: a scratch directory per test process, reading
// whole files, and running a shell command with its output captured.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace tutti::test {

namespace fs = std::filesystem;

struct Result {
  int code;  // exit status, -1 when killed by a signal
  std::string out, err;
};

// An empty directory, unique to this test process, created on first use.
inline fs::path scratch() {
  static fs::path dir = [] {
    fs::path p = fs::temp_directory_path() / ("tutti_test_" + std::to_string(::getpid()));
    fs::remove_all(p);
    fs::create_directories(p);
    return p;
  }();
  return dir;
}

inline std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline Result shell(const std::string& cmd) {
  const fs::path out = scratch() / "stdout.txt", err = scratch() / "stderr.txt";
  const int status = std::system((cmd + " >" + out.string() + " 2>" + err.string()).c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

}  // namespace tutti::test
