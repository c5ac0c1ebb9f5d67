#!/usr/bin/env bash
# Open MPI's remote-shell agent for the namespace cluster of scripts/netns_cluster.sh: where mpirun
# would `ssh HOST orted ...`, it runs `netns_agent.sh HOST orted ...` (--mca plm_rsh_agent), and this
# script starts the command inside HOST's network namespace instead.
#
# Called like ssh:  netns_agent.sh [ssh options] HOST COMMAND...
#   HOST      tutti-h<i>, or its address 10.77.0.<11+i> (what a hostfile of addresses gives)
#   COMMAND   words joined by spaces and run by `bash -c`, as sshd runs it with the login shell;
#             Open MPI 4.1 passes " orted" followed by "-mca NAME "VALUE"" words quoted for a shell.
#
# Each launch also gets its own UTS namespace whose hostname is the host's name, so processor names
# differ per host as on a real cluster. Unlike ssh, the command inherits mpirun's environment
# (PATH, LD_LIBRARY_PATH, OMPI_*): nothing is lost on the way, and nothing needs -x to arrive.
#
# TUTTI_NETNS_AGENT_LOG=FILE appends each call's argv to FILE (to see what mpirun passes).
set -euo pipefail

PREFIX=tutti-h
SUBNET=10.77.0
FIRST_HOST_OCTET=11

die() { echo "netns_agent: $*" >&2; exit 255; }  # 255: what ssh returns when it cannot connect

if [ -n "${TUTTI_NETNS_AGENT_LOG:-}" ]; then
  line=$(printf 'netns_agent argc=%d:' "$#"; printf ' [%s]' "$@")
  echo "$line" >>"$TUTTI_NETNS_AGENT_LOG"  # one write per call: concurrent launches don't interleave
fi

# ssh options Open MPI or a user's plm_rsh_args might add (-x, -q, -o X, -l USER, -p PORT...)
# mean nothing here; skip them, with their argument where ssh's takes one.
while [ $# -gt 0 ]; do
  case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;
    -[bcDEeFIiJLlmOopQRSWw]?*) shift ;;
    --) shift; break ;;
    -*) shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || die "usage: netns_agent.sh [ssh options] HOST COMMAND..."
host=$1
shift

# Strip a user@ prefix, then map a name or an address to its namespace.
host=${host#*@}
if [[ "$host" =~ ^$PREFIX([0-9]+)$ ]]; then
  ns=$host
elif [[ "$host" =~ ^${SUBNET//./\\.}\.([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge "$FIRST_HOST_OCTET" ]; then
  ns="$PREFIX$((BASH_REMATCH[1] - FIRST_HOST_OCTET))"
else
  die "'$host' is not a host of the namespace cluster ($PREFIX<i> or $SUBNET.<$FIRST_HOST_OCTET+i>)"
fi
[ -e "/run/netns/$ns" ] || die "host '$host': namespace $ns does not exist (scripts/netns_cluster.sh create N)"

# $* joins the words with spaces, which is what ssh sends to the remote shell.
# shellcheck disable=SC2016  # $0 and $1 are the inner shell's
exec ip netns exec "$ns" unshare --uts bash -c 'echo "$0" >/proc/sys/kernel/hostname && exec bash -c "$1"' \
  "$ns" "$*"
