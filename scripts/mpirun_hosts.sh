#!/usr/bin/env bash
# mpirun across the pretend hosts of scripts/netns_cluster.sh, the way a real cluster is driven:
# a hostfile, a remote-shell agent (scripts/netns_agent.sh instead of ssh), and TCP between hosts.
#
#   scripts/mpirun_hosts.sh -np N [--hosts H] [--timeout S] [MPIRUN OPTIONS...] -- PROGRAM [ARGS...]
#
#   -np N         ranks (required)
#   --hosts H     hosts tutti-h0..tutti-h{H-1} (default 2), created if missing and left up
#                 (scripts/netns_cluster.sh destroy removes them)
#   --timeout S   mpirun --timeout: kill the job after S seconds
#   other options before `--` go to mpirun unchanged (e.g. -x NAME, --mca NAME VALUE)
#
# Ranks are placed round robin, rank r on host r mod H. Each rank records its network namespace
# before exec'ing PROGRAM; afterwards every rank is checked to have run in its host's namespace and
# not in the root one, and the placement is printed. Exit status: PROGRAM's (through mpirun's), or
# 1 when placement was wrong, or 77 when this machine cannot create namespaces (CTest's "skipped").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
SUBNET=10.77.0
FIRST_HOST_OCTET=11

# ---- inside mpirun: record where this rank runs, then become the program ------------------------
if [ "${1:-}" = --rank-stamp ]; then
  stamp_dir=$2
  shift 3  # --rank-stamp DIR --
  rank=${OMPI_COMM_WORLD_RANK:?not started by Open MPI}
  printf '%s %s\n' "$(readlink /proc/self/ns/net)" "$(cat /proc/sys/kernel/hostname)" >"$stamp_dir/rank.$rank"
  exec "$@"
fi

die() { echo "mpirun_hosts: $*" >&2; exit 1; }

np="" hosts=2 timeout="" mpirun_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -np | -n | --np) np=${2:?}; shift 2 ;;
    --hosts) hosts=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --) shift; break ;;
    *) mpirun_extra+=("$1"); shift ;;
  esac
done
[ $# -ge 1 ] || die "usage: mpirun_hosts.sh -np N [--hosts H] [--timeout S] [MPIRUN OPTIONS...] -- PROGRAM [ARGS...]"
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "-np needs a positive rank count, got '$np'"
[[ "$hosts" =~ ^[1-9][0-9]*$ ]] || die "--hosts needs a positive host count, got '$hosts'"
command -v mpirun >/dev/null || die "mpirun not found (Debian: apt-get install openmpi-bin)"

# ---- hosts and hostfile -----------------------------------------------------------------------
"$here/netns_cluster.sh" create "$hosts" >&2  # exits 77 itself when namespaces are impossible

work=$(mktemp -d /tmp/tutti-mpirun-hosts.XXXXXX)
trap 'rm -rf "$work"' EXIT
slots=$(((np + hosts - 1) / hosts))
for ((h = 0; h < hosts; h++)); do
  echo "$SUBNET.$((FIRST_HOST_OCTET + h)) slots=$slots"
done >"$work/hostfile"
mkdir "$work/stamps"

# ---- launch -----------------------------------------------------------------------------------
# pml ob1 + btl tcp,self: ranks talk through the TCP BTL only (no shared memory, no UCX, which would
# otherwise find a same-machine shortcut); both the BTL and the runtime's out-of-band channel
# (orted -> mpirun) are restricted to the bridge subnet, the only network the hosts have.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# shellcheck disable=SC2054  # tcp,self is one value
cmd=(mpirun -np "$np" --hostfile "$work/hostfile" --map-by node --bind-to none --oversubscribe
  --mca plm_rsh_agent "$here/netns_agent.sh" --mca plm_rsh_no_tree_spawn 1
  --mca pml ob1 --mca btl tcp,self
  --mca btl_tcp_if_include "$SUBNET.0/24" --mca oob_tcp_if_include "$SUBNET.0/24")
[ -z "$timeout" ] || cmd+=(--timeout "$timeout")
cmd+=("${mpirun_extra[@]}" "$self" --rank-stamp "$work/stamps" -- "$@")

rc=0
"${cmd[@]}" || rc=$?

# ---- where did each rank run? -------------------------------------------------------------------
root_ns=$(readlink /proc/self/ns/net)
bad=0
for ((r = 0; r < np; r++)); do
  h=$((r % hosts))
  want_ns="net:[$(stat -L -c %i "/run/netns/tutti-h$h")]"
  if [ ! -f "$work/stamps/rank.$r" ]; then
    echo "mpirun_hosts: rank $r never started" >&2
    bad=1
    continue
  fi
  read -r got_ns got_name <"$work/stamps/rank.$r"
  if [ "$got_ns" = "$root_ns" ]; then
    echo "mpirun_hosts: rank $r ran in the root namespace $got_ns, not on a host" >&2
    bad=1
  elif [ "$got_ns" != "$want_ns" ]; then
    echo "mpirun_hosts: rank $r ran in $got_ns ($got_name), expected tutti-h$h $want_ns" >&2
    bad=1
  else
    echo "mpirun_hosts: rank $r ran on tutti-h$h ($SUBNET.$((FIRST_HOST_OCTET + h)), hostname $got_name, $got_ns)" >&2
  fi
done
[ "$rc" = 0 ] || { echo "mpirun_hosts: mpirun exited with $rc" >&2; exit "$rc"; }
[ "$bad" = 0 ] || exit 1
