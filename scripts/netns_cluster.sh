#!/usr/bin/env bash
# A pretend cluster on one machine: N network namespaces ("hosts") joined by a bridge.
#
#   scripts/netns_cluster.sh create N   # hosts tutti-h0..tutti-h{N-1}; idempotent
#   scripts/netns_cluster.sh destroy    # every tutti-h* host, its veth, its processes, the bridge
#   scripts/netns_cluster.sh status     # hosts, addresses, bridge
#   scripts/netns_cluster.sh check      # can this machine host namespaces at all? (no side effects)
#
# Wiring, like a rack behind one switch:
#
#   root namespace:  bridge tutti-br0 10.77.0.1/24 -- veth tutti-v0 ... tutti-v{N-1}
#   host i:          namespace tutti-h<i>, lo up, eth0 = 10.77.0.<11+i>/24 (other end of tutti-v<i>)
#
# Every host reaches every other host and the root namespace (where mpirun runs) over the bridge,
# and nothing else: there is no route out, so a rank that talks to the wrong address fails fast.
#
# Exit codes: 0 done; 77 this machine cannot do it (not root, no `ip`, namespaces not permitted),
# the code CTest treats as "skipped"; 1 anything else.
set -euo pipefail

PREFIX=tutti-h
BRIDGE=tutti-br0
VETH_PREFIX=tutti-v
SUBNET=10.77.0          # a /24; the bridge is .1, host i is .(11+i)
FIRST_HOST_OCTET=11
MAX_HOSTS=$((254 - FIRST_HOST_OCTET + 1))

die() { echo "netns_cluster: $*" >&2; exit 1; }
unsupported() { echo "netns_cluster: $*" >&2; exit 77; }

host_name() { echo "$PREFIX$1"; }
host_addr() { echo "$SUBNET.$((FIRST_HOST_OCTET + $1))"; }

# ---- preconditions ----------------------------------------------------------------------------
require_capable() {
  [ "$(id -u)" = 0 ] || unsupported "must run as root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN); uid is $(id -u)"
  command -v ip >/dev/null || unsupported "'ip' not found: install iproute2"
  # A container without CAP_SYS_ADMIN, or a read-only /run, refuses here: say so once, clearly.
  local probe="tutti-probe-$$" err
  if ! err=$(ip netns add "$probe" 2>&1); then
    unsupported "'ip netns add' is not permitted here: $err"
  fi
  if ! err=$(ip link add "tutti-pb$$" type bridge 2>&1); then
    ip netns del "$probe" 2>/dev/null || true
    unsupported "cannot create a bridge here: $err"
  fi
  ip link del "tutti-pb$$" 2>/dev/null || true
  ip netns del "$probe" 2>/dev/null || true
}

# No `cmd | grep -q` here: grep quitting early SIGPIPEs cmd, which pipefail reports as "not found".
netns_exists() { [ -e "/run/netns/$1" ]; }
has_addr() { [[ "$(ip "${@:3}" -o -4 addr show dev "$1")" == *" inet $2/24 "* ]]; }  # DEV ADDR [-n NS]
link_exists() { ip link show "$1" >/dev/null 2>&1; }

# ---- create -----------------------------------------------------------------------------------
create_bridge() {
  link_exists "$BRIDGE" || ip link add "$BRIDGE" type bridge
  has_addr "$BRIDGE" "$SUBNET.1" || ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

create_host() {
  local i=$1 ns veth addr
  ns=$(host_name "$i"); veth="$VETH_PREFIX$i"; addr=$(host_addr "$i")
  netns_exists "$ns" || ip netns add "$ns"
  ip -n "$ns" link set lo up
  if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    # A root-side end left over from a half-finished run has lost its peer: start again.
    link_exists "$veth" && ip link del "$veth"
    ip link add "$veth" type veth peer name "tutti-p$i"
    ip link set "tutti-p$i" netns "$ns"
    ip -n "$ns" link set "tutti-p$i" name eth0
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  has_addr eth0 "$addr" -n "$ns" || ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
}

# bash's /dev/tcp to the (closed) discard port: "refused" proves the address answers, where a
# timeout or "no route" proves it doesn't. No ping or nc needed.
reachable_from() {
  local ns=$1 addr=$2 out
  out=$(LC_ALL=C timeout 3 ip netns exec "$ns" bash -c ": </dev/tcp/$addr/9" 2>&1) && return 0
  [[ "$out" == *"Connection refused"* ]]
}

# Links come up asynchronously: a few tries before judging the wiring.
wait_reachable() {
  local _
  for _ in 1 2 3; do
    reachable_from "$1" "$2" && return 0
    sleep 0.2
  done
  return 1
}

create() {
  local n=$1 i
  if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt "$MAX_HOSTS" ]; then
    die "create needs a host count from 1 to $MAX_HOSTS, got '$n'"
  fi
  require_capable
  create_bridge
  for ((i = 0; i < n; i++)); do create_host "$i"; done
  # A host re-made by a repair has a new MAC address; forget the old ones everywhere.
  ip neigh flush dev "$BRIDGE"
  for ((i = 0; i < n; i++)); do ip -n "$(host_name "$i")" neigh flush dev eth0; done
  for ((i = 0; i < n; i++)); do
    wait_reachable "$(host_name "$i")" "$SUBNET.1" ||
      die "$(host_name "$i") cannot reach the bridge $SUBNET.1 (a firewall on bridged traffic, e.g. br_netfilter with an INPUT DROP policy?)"
  done
  if [ "$n" -ge 2 ]; then
    wait_reachable "$(host_name 0)" "$(host_addr 1)" ||
      die "$(host_name 0) cannot reach $(host_name 1) at $(host_addr 1) across the bridge (br_netfilter with a FORWARD DROP policy?)"
  fi
  echo "netns_cluster: $n host(s) up: $(for ((i = 0; i < n; i++)); do printf '%s=%s ' "$(host_name "$i")" "$(host_addr "$i")"; done)bridge $BRIDGE=$SUBNET.1"
}

# ---- destroy ----------------------------------------------------------------------------------
# Processes still inside a host (an orted left by a killed mpirun) would keep its namespace and veth
# alive after `ip netns del`; they can only be ours, so stop them first.
stop_processes_in() {
  local ns=$1 pids
  mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
  [ ${#pids[@]} -gt 0 ] || return 0
  echo "netns_cluster: stopping processes left in $ns: ${pids[*]}" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    [ ${#pids[@]} -gt 0 ] || return 0
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

destroy() {
  [ "$(id -u)" = 0 ] || unsupported "must run as root to destroy namespaces; uid is $(id -u)"
  command -v ip >/dev/null || unsupported "'ip' not found: install iproute2"
  local ns link failed=0
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+\$" || true); do
    stop_processes_in "$ns"
    ip netns del "$ns" || failed=1
  done
  for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${VETH_PREFIX}[0-9]+\$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  if link_exists "$BRIDGE"; then ip link del "$BRIDGE" || failed=1; fi
  [ "$failed" = 0 ] || die "some pieces could not be removed; see 'scripts/netns_cluster.sh status'"
  echo "netns_cluster: destroyed"
}

# ---- status -----------------------------------------------------------------------------------
status() {
  local ns found=0
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+\$" || true); do
    found=1
    printf '%-10s %s  pids: %s\n' "$ns" \
      "$(ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')" \
      "$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
  done
  [ "$found" = 1 ] || echo "no $PREFIX* namespaces"
  if link_exists "$BRIDGE"; then
    echo "$BRIDGE  $(ip -o -4 addr show dev "$BRIDGE" | awk '{print $4}')"
  else
    echo "no bridge $BRIDGE"
  fi
}

case "${1:-}" in
  create) [ $# -eq 2 ] || die "usage: $0 create N"; create "$2" ;;
  destroy) destroy ;;  # every tutti-h* host, whatever N it was created with
  status) status ;;
  check) require_capable; echo "netns_cluster: namespaces and bridges can be created here" ;;
  *) echo "usage: $0 create N | destroy | status | check" >&2; exit 1 ;;
esac
