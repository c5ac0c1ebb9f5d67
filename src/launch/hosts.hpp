// The hosts of a launch: whether each still answers, by a TCP probe or the --host-check command.
// read_hostfile and host_reachable are public (tutti/launch/supervisor.hpp); these build on them.
#pragma once
#include <string>
#include <vector>

#include "tutti/launch/supervisor.hpp"

namespace tutti::launch {

// Whether `host` is up: `options.host_check` ({host} replaced) exits 0 within 10 s, or, without a
// check command, the host answers on `options.probe_port`. Throws InvalidArgument for an unknown name.
bool host_up(const std::string& host, const LaunchOptions& options);

// Removes the hosts that are no longer up (or no longer resolve) from `hosts`; returns their names.
std::vector<std::string> drop_unreachable(std::vector<Host>& hosts, const LaunchOptions& options);

// "this machine" without hosts, else "N host(s): a b c".
std::string describe_hosts(const std::vector<Host>& hosts);

}  // namespace tutti::launch
