#!/usr/bin/env bash
# Stop the single-node SLURM started by .ci/slurm_up.sh: slurmd, slurmctld, then munged.
set -uo pipefail
daemons=(slurmd slurmctld munged)
for d in "${daemons[@]}"; do
  pkill -x "$d" && echo "slurm: stopped $d"
done
for _ in $(seq 10); do
  left=""
  for d in "${daemons[@]}"; do pgrep -x "$d" >/dev/null && left="$left $d"; done
  [ -z "$left" ] && exit 0
  sleep 1
done
echo "slurm: still running after 10 s:$left"
