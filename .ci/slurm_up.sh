#!/usr/bin/env bash
# A real single-node SLURM on localhost, so the sweep executor's tests run against real sbatch (issue 14).
# Idempotent: installs slurmctld/slurmd/munge if sbatch is missing, writes the munge key and slurm.conf only if
# absent, starts only the daemons that are not running, waits for the node to be idle and runs one test job.
# When it cannot set SLURM up (not root, no apt-get, install failure, node never idle) it says why in one line and
# exits 0: the tests still run and the SLURM ones skip with a reason (the `slurm` fixture in tests/conftest.py).
# No cgroups (this runs in containers): proctrack/linuxproc, task/none. Stop it with .ci/slurm_down.sh.
set -uo pipefail

skip() { echo "slurm: not set up ($*); SLURM tests will skip"; exit 0; }

if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then exec sudo -n bash "$0" "$@"; fi
  skip "not root and no passwordless sudo"
fi

LOG=/tmp/slurm_up.log
if ! command -v sbatch >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || skip "sbatch missing and no apt-get to install it"
  t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  # A fresh image may have empty package lists: update only when the plain install fails.
  apt-get install -y -q "${pkgs[@]}" >"$LOG" 2>&1 \
    || { apt-get update -q >>"$LOG" 2>&1 && apt-get install -y -q "${pkgs[@]}" >>"$LOG" 2>&1; } \
    || skip "apt-get install ${pkgs[*]} failed, see $LOG"
  command -v sbatch >/dev/null 2>&1 || skip "sbatch still missing after install, see $LOG"
  echo "slurm: installed ${pkgs[*]} in $((SECONDS - t0)) s"
fi

HOST=$(hostname -s)
t0=$SECONDS

# munge: a 1 KB random key readable only by munge, then munged as munge.
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 400 /etc/munge/munge.key
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c /usr/sbin/munged || skip "munged did not start, see /var/log/munge/munged.log"
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [ ! -s /etc/slurm/slurm.conf ]; then
  CPUS=$(nproc)
  # 90% of RAM: a RealMemory above what slurmd finds would drain the node ("Low RealMemory").
  MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >/etc/slurm/slurm.conf <<EOF
# Written by .ci/slurm_up.sh: single-node SLURM on localhost for the tests. No cgroups (containers).
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Cancel jobs whose dependency can never be met (afterok on a failed job) instead of leaving them pending.
DependencyParameters=kill_invalid_depend
# Schedule a batch job as soon as it is submitted (default: up to 3 s later); trivial jobs then take ~1 s.
SchedulerParameters=batch_sched_delay=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
fi

if ! pgrep -x slurmctld >/dev/null; then
  slurmctld || skip "slurmctld did not start, see /var/log/slurm/slurmctld.log"
fi
if ! pgrep -x slurmd >/dev/null; then
  slurmd || skip "slurmd did not start, see /var/log/slurm/slurmd.log"
fi

# Wait for the node: idle (or mixed, if jobs already run). A node left down/drained by an earlier run is resumed.
state=""
for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle* | mixed*) break ;;
    down* | drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 ;;
  esac
  sleep 1
done
case "$state" in
  idle* | mixed*) ;;
  *) skip "node $HOST is '${state:-not reported}' after 60 s, see /var/log/slurm/slurmd.log" ;;
esac
echo "slurm: daemons up and node idle in $((SECONDS - t0)) s"

# Prove it: one trivial job, submitted and polled (sbatch --wait polls every 2 to 10 s, which costs up to 10 s).
out=/tmp/slurm_up_test.out
rm -f "$out"
t1=$SECONDS
job=$(sbatch --parsable --job-name=slurm_up --chdir=/tmp --output="$out" --wrap hostname) \
  || skip "sbatch failed, see /var/log/slurm/slurmctld.log"
jstate=""
for _ in $(seq 120); do
  jstate=$(scontrol show job "$job" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*')
  case "$jstate" in JobState=PENDING | JobState=CONFIGURING | JobState=RUNNING | JobState=COMPLETING | "") ;; *) break ;; esac
  sleep 0.5
done
if [ "$jstate" != JobState=COMPLETED ] || [ "$(cat "$out" 2>/dev/null)" != "$(hostname)" ]; then
  skip "test job $job ended as '${jstate:-unknown}', see /var/log/slurm/slurmctld.log"
fi
rm -f "$out"
echo "slurm: node $HOST idle, test job ran ($((SECONDS - t1)) s submit to done)"
