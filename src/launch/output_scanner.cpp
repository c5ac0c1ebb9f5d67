#include "launch/output_scanner.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <regex>

namespace tutti::launch {

bool OutputScanner::pump(int fd, int to_fd, std::string& pending) {
  char buf[65536];
  const ssize_t n = ::read(fd, buf, sizeof buf);
  if (n <= 0) return n < 0 && errno == EINTR;
  for (ssize_t off = 0; off < n;) {
    const ssize_t w = ::write(to_fd, buf + off, size_t(n - off));
    if (w <= 0) break;
    off += w;
  }
  pending.append(buf, size_t(n));
  size_t start = 0;
  for (size_t nl; (nl = pending.find_first_of("\r\n", start)) != std::string::npos; start = nl + 1)
    scan(pending.substr(start, nl - start));
  pending.erase(0, start);
  return true;
}

void OutputScanner::scan(const std::string& line) {
  static const std::regex progress("^step +([0-9]+)/[0-9]+ \\|");
  static const std::regex died("process rank ([0-9]+) with PID ([0-9]+) on node (\\S+) exited on signal ([0-9]+)");
  static const std::regex aborted("MPI_ABORT was invoked on rank ([0-9]+)");
  static const std::regex error("^tutti: error.*");
  static const std::regex daemon("(lost communication with a remote daemon|daemon .*failed|unable to reliably start)");
  std::smatch m;
  if (std::regex_search(line, m, progress)) report_.max_step = std::max<int64_t>(report_.max_step, std::stoll(m[1]));
  if (rank_failure.empty() && std::regex_search(line, m, died))
    rank_failure = "rank " + m[1].str() + (m[2] == "0" ? "" : " (pid " + m[2].str() + ")") + " on host " + m[3].str() + " killed by signal " +
                   m[4].str() + " (" + ::strsignal(std::stoi(m[4])) + ")";
  if (rank_failure.empty() && std::regex_search(line, m, aborted)) rank_failure = "rank " + m[1].str() + " aborted the job";
  if (rank_error.empty() && std::regex_search(line, m, error)) rank_error = line;
  if (host_failure.empty() && std::regex_search(line, m, daemon)) host_failure = "mpirun: " + line;
}

}  // namespace tutti::launch
