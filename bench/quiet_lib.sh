# Sourced by the bench scripts that measure on a shared machine: how much CPU other processes use
# while a run goes on (all CPU time the kernel accounts, user, nice, system, irq, softirq and steal,
# minus what the sourcing script's children used), and waiting for a quiet machine before a run.
cpu_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }  # jiffies, all CPUs
child_cpu() { sed 's/.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }  # cutime + cstime of the script's shell
hz="$(getconf CLK_TCK)"

# wait_quiet [TRIES]: until other processes use < 0.1 core over one second, checking every 10 s
# (gives up after TRIES checks, default 12: about 2 minutes).
wait_quiet() {
  local b0 b1 tries max="${1:-12}"
  for tries in $(seq 1 "$max"); do
    b0="$(cpu_busy)"; sleep 1; b1="$(cpu_busy)"
    ((b1 - b0 < hz / 10)) && return 0
    ((tries == 1)) && echo "  (waiting for a quiet machine: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    sleep 9
  done
  echo "  (machine still busy after $((max / 6)) minutes; running anyway)" >&2
}

# other_cores B0 C0 T0 T1: the cores other processes used on average between T0 and T1 (seconds),
# given cpu_busy and child_cpu taken at T0 (read again now).
other_cores() {
  awk -v b="$(( $(cpu_busy) - $1 ))" -v c="$(( $(child_cpu) - $2 ))" -v t0="$3" -v t1="$4" -v hz="$hz" \
    'BEGIN { f = (b - c) / hz / (t1 - t0); printf "%.2f", f < 0 ? 0 : f }'
}
