#!/bin/bash
# A real, single-node slurm on localhost (munge + slurmctld + slurmd), to try and test the slurm path of
# attnres-train on a laptop or a CI box: launch/slurm.sbatch, preemption/requeue, submitit sweeps.
#
#   bash launch/slurm_local.sh start     # install (Debian/Ubuntu, as root, if missing), configure, start; idempotent
#   eval "$(bash launch/slurm_local.sh env)"   # SLURM_CONF for sbatch/srun/squeue/scontrol in this shell
#   bash launch/slurm_local.sh status    # sinfo of the local cluster; exit 1 if it is not up
#   bash launch/slurm_local.sh stop      # stop the daemons started here (the packages stay installed)
#
# The cluster has one node named after this host (address 127.0.0.1: no DNS needed) with CPUs = nproc and RealMemory = 90% of MemTotal, one
# partition `local` (default), no GPUs, and lives in SLURM_LOCAL_DIR (default /tmp/attnres-slurm: slurm.conf,
# state, spool, logs). It never touches /etc/slurm. Exit codes (one `error:` line otherwise): 0 ok, 2 the daemons
# did not start, 3 slurm is missing and cannot be installed here (not root, not Debian/Ubuntu, apt-get failed).
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/attnres-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
die() { echo "error: $*" >&2; exit 2; }
cannot() { echo "error: $*" >&2; exit 3; }  # slurm is missing and cannot be installed here

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
  && command -v munged >/dev/null; }

install() {
  have_slurm && return 0
  [ "$(id -u)" = 0 ] || cannot "slurm is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client munge)"
  command -v apt-get >/dev/null || cannot "slurm is not installed and this is not a Debian/Ubuntu system: install slurmctld, slurmd, slurm-client and munge"
  echo "installing slurm and munge (apt-get) ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } >"$DIR/install.log" 2>&1 \
    || cannot "apt-get install failed (see $DIR/install.log)"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null 2>&1 || true; fi
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not come up"
}

write_conf() {
  local cpus mem
  cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # GNU nproc honours OMP_NUM_THREADS: not the node's CPUs
  mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF.new" <<EOF
# written by launch/slurm_local.sh: one node, this host
ClusterName=attnres-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
KillWait=30
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.new" "$CONF"
}

is_up() {
  SLURM_CONF="$CONF" sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc|comp)'
}

cmd_start() {
  mkdir -p "$DIR"
  if [ -f "$CONF" ] && is_up; then echo "slurm is up ($CONF)"; return 0; fi
  install
  start_munge
  write_conf
  export SLURM_CONF="$CONF"
  pgrep -f "slurmctld.*$CONF" >/dev/null || slurmctld -c -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  pgrep -f "slurmd.*$CONF" >/dev/null || slurmd -c -f "$CONF" || die "slurmd did not start (see $DIR/log/slurmd.log)"
  for _ in $(seq 120); do
    if is_up; then echo "slurm is up ($CONF): $(sinfo -h -o '%P %D node(s) %c CPUs %t')"; return 0; fi
    SLURM_CONF="$CONF" scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  die "the local node did not become idle within 60 s (see $DIR/log/)"
}

cmd_stop() {
  local pid
  for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if [ -f "$f" ] && pid="$(cat "$f")" && kill -0 "$pid" 2>/dev/null; then kill "$pid"; fi
  done
  for _ in $(seq 50); do pgrep -f "slurm(ctld|d) .*-f $CONF" >/dev/null || break; sleep 0.1; done
  echo "slurm stopped ($DIR)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) [ -f "$CONF" ] && is_up && SLURM_CONF="$CONF" sinfo || { echo "slurm is not up ($DIR)"; exit 1; } ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: launch/slurm_local.sh start|stop|status|env" ;;
esac
