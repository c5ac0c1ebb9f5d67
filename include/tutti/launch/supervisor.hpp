// The supervisor behind `tutti launch`: starts the ranks of a training run through mpirun, watches
// them (mpirun's exit status, per-rank heartbeat files), and when a rank dies, hangs or a host goes
// away, stops every process of the job and restarts it from the newest committed checkpoint with
// `train --resume OUT`, on fewer ranks when hosts were lost. Every event is one log line; a summary
// closes the job. See docs/fault_tolerance.md.
#pragma once
#include <cstdint>
#include <map>
#include <ostream>
#include <string>
#include <vector>

namespace tutti::launch {

struct LaunchOptions {
  int ranks = 0;                        // ranks of the first attempt
  std::string hostfile;                 // "HOST [slots=N]" lines; empty: every rank on this machine
  int min_ranks = 0;                    // fewest ranks to continue on after a host is lost; 0: ranks
  int max_restarts = 10;                // restarts over the whole job
  double heartbeat_timeout = 30.0;      // seconds a rank's heartbeat may stand still
  double startup_timeout = 120.0;       // seconds until every rank has beaten once (MPI start, loading)
  double kill_grace = 5.0;              // seconds between SIGTERM and SIGKILL of the mpirun group
  int probe_port = 22;                  // TCP port a host probe connects to (refused = reachable)
  double probe_timeout = 2.0;           // seconds
  std::string host_check;               // instead of the TCP probe: a shell command, {host} replaced,
                                        // exit 0 = reachable (e.g. "ssh {host} true")
  std::vector<std::string> mpirun_args;  // passed to mpirun before the program
  std::vector<std::string> train_args;   // the words after `train`
  std::string tutti_binary;             // the program the ranks run (`tutti`)
  std::string mpirun = "mpirun";
  std::ostream* log = nullptr;          // event lines; nullptr: stderr
};

struct Host {
  std::string name;  // as written in the hostfile (a name or an address)
  int slots = 0;     // 0: not given
};

// Reads an Open MPI hostfile (blank lines and # comments skipped). Throws InvalidArgument naming
// the line of a malformed entry, ConfigError when the file cannot be read or names no host.
std::vector<Host> read_hostfile(const std::string& path);

// Whether `host` answers a TCP connection to `port` (accepted or refused) within `timeout_s`.
// Throws InvalidArgument when the name does not resolve.
bool host_reachable(const std::string& host, int port, double timeout_s);

// The largest rank count in [min_ranks, available] that is a multiple of pp x tp (model_parallel)
// whose data-parallel replicas divide the global batch into equal parts (and those into
// micro-batches of micro_batch, or into micro_batches of them, when set); 0 when there is none.
int choose_ranks(int available, int min_ranks, int64_t batch, int64_t micro_batch, int64_t model_parallel = 1,
                 int64_t micro_batches = 0);

// One recovery: from the failure being detected to every rank training again.
struct Recovery {
  std::string failure;       // killed | exited | hung | host lost
  int64_t resumed_step = 0;  // the checkpoint step the new attempt started from
  int64_t steps_lost = 0;    // steps the failed attempt completed beyond that checkpoint
  double seconds = 0.0;      // detection -> every rank beating again in the new attempt
  int ranks = 0;             // ranks of the new attempt
};

struct LaunchSummary {
  int exit_code = 1;  // 0: the run finished
  int attempts = 0;
  std::map<std::string, int> failures;  // by kind
  int64_t steps_recomputed = 0;
  double wall_seconds = 0.0;
  std::vector<Recovery> recoveries;
  std::string error;  // why the job stopped, when exit_code != 0
};

// Runs the job to the end: the run finishing (exit_code 0), the restart budget spent, no rank
// count left that the hosts and the batch allow, or a failure before the first step of a fresh
// run (a configuration error restarting would only repeat). Bad options throw InvalidArgument or
// ConfigError before anything starts.
LaunchSummary supervise(const LaunchOptions& options);

}  // namespace tutti::launch
