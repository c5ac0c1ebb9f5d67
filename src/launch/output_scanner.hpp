// The output of mpirun: forwarded as it comes, scanned line by line for what it says about the
// ranks (progress lines, a rank killed by a signal, MPI_ABORT, "tutti: error", a lost daemon).
#pragma once
#include <cstdint>
#include <string>

#include "launch/process.hpp"

namespace tutti::launch {

// How one attempt ended, filled in while it is watched.
struct AttemptReport {
  std::string kind;         // "" (ran to the end) | killed | exited | hung | host lost
  std::string detail;       // one line: which rank/host, signal/status, heartbeat age
  int status = 0;           // mpirun's wait status
  int64_t max_step = -1;    // the most steps the attempt is known to have completed
  int64_t first_step = -1;  // the step it started from (its first heartbeats)
  bool resumed = false;     // every rank beat at least once
  bool announced = false;   // "failure detected" already logged (at the moment of detection)
  Clock::time_point detected;
};

class OutputScanner {
 public:
  explicit OutputScanner(AttemptReport& report) : report_(report) {}

  // Reads what is available on fd, writes it to to_fd unchanged, scans complete lines; `pending`
  // keeps the unfinished last line of this fd. Returns false at end of file.
  bool pump(int fd, int to_fd, std::string& pending);

  std::string rank_failure;  // what mpirun said about the first rank that failed
  std::string host_failure;  // what it said about a lost daemon
  std::string rank_error;    // the first "tutti: error ..." line

 private:
  void scan(const std::string& line);

  AttemptReport& report_;  // max_step follows the progress lines
};

}  // namespace tutti::launch
