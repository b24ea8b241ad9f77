#!/usr/bin/env bash
# bench/cpu-split.sh — CPU time (jiffies, utime + stime) used so far by each command name,
# summed over its processes: run it before and after a workload and subtract. Used by
# scripts/bench to say which part (nats-server, postgres, taskmesh, the load generator) spends
# the machine's CPU during the throughput workload.
set -euo pipefail
for p in /proc/[0-9]*; do
  stat=$(cat "$p/stat" 2>/dev/null) || continue
  comm=${stat#*(}
  comm=${comm%%)*}
  rest=${stat##*) }
  # Fields after the command: state is 1st, utime the 12th, stime the 13th.
  read -r -a f <<<"$rest"
  echo "${comm// /_} $((f[11] + f[12]))"
done | awk '{t[$1] += $2} END {for (c in t) print c, t[c]}'
