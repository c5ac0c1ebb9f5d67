#include "launch/hosts.hpp"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <cerrno>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <thread>

#include "launch/process.hpp"
#include "tutti/core/error.hpp"

namespace tutti::launch {

std::vector<Host> read_hostfile(const std::string& path) {
  std::ifstream in(path);
  TUTTI_CHECK_AS(ConfigError, in.good(), "cannot read the hostfile '", path, "'");
  std::vector<Host> hosts;
  std::string line;
  static const std::regex slots_re("^(slots|max_slots)=([0-9]+)$");
  for (int n = 1; std::getline(in, line); ++n) {
    if (const size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    Host h;
    if (!(words >> h.name)) continue;
    for (std::string w; words >> w;) {
      std::smatch m;
      TUTTI_CHECK_AS(InvalidArgument, std::regex_match(w, m, slots_re), path, ":", n, ": '", w,
                     "' is not slots=N (a hostfile line is: HOST [slots=N])");
      if (m[1] == "slots") h.slots = std::stoi(m[2]);
    }
    hosts.push_back(h);
  }
  TUTTI_CHECK_AS(ConfigError, !hosts.empty(), "the hostfile '", path, "' names no host");
  return hosts;
}

bool host_reachable(const std::string& host, int port, double timeout_s) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  TUTTI_CHECK_AS(InvalidArgument, rc == 0, "unknown host '", host, "': ", ::gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, ::freeaddrinfo);
  for (addrinfo* a = list.get(); a; a = a->ai_next) {
    UniqueFd sock(::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol));
    if (sock.get() < 0) continue;
    if (::connect(sock.get(), a->ai_addr, a->ai_addrlen) == 0) return true;
    if (errno == ECONNREFUSED) return true;  // a host that answers, with nothing on the port
    if (errno != EINPROGRESS) continue;
    pollfd p{sock.get(), POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(timeout_s * 1000)) != 1) continue;
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(sock.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err == 0 || err == ECONNREFUSED) return true;
  }
  return false;
}

bool host_up(const std::string& host, const LaunchOptions& options) {
  if (options.host_check.empty()) return host_reachable(host, options.probe_port, options.probe_timeout);
  std::string cmd = options.host_check;
  for (size_t at; (at = cmd.find("{host}")) != std::string::npos;) cmd.replace(at, 6, host);
  ChildProcess check({"/bin/sh", "-c", cmd}, {});
  const auto t0 = Clock::now();
  while (!check.poll() && seconds_since(t0) < 10.0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int status = check.stop(0.0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

std::vector<std::string> drop_unreachable(std::vector<Host>& hosts, const LaunchOptions& options) {
  std::vector<std::string> lost;
  std::vector<Host> kept;
  for (const Host& h : hosts) {
    bool up = false;
    try {
      up = host_up(h.name, options);
    } catch (const Error&) {
      up = false;  // no longer resolves
    }
    if (up) kept.push_back(h);
    else lost.push_back(h.name);
  }
  hosts = kept;
  return lost;
}

std::string describe_hosts(const std::vector<Host>& hosts) {
  if (hosts.empty()) return "this machine";
  std::string s = std::to_string(hosts.size()) + " host(s):";
  for (const Host& h : hosts) s += " " + h.name;
  return s;
}

}  // namespace tutti::launch
