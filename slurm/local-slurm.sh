#!/usr/bin/env bash
# A real one-machine Slurm (Debian 12's 22.05 packages) for skydiff's tests.
#   local-slurm.sh start [--force]   install if missing, write the config, start, wait until idle
#   local-slurm.sh stop              cancel jobs, shut down, end the daemons by their PIDs
#   local-slurm.sh status            exit 0 when the node is up (prints its state and config)
# Run as root.  It writes /etc/slurm/slurm.conf afresh at every start (the hostname must
# match), so it refuses to start over a slurm.conf it did not write (no marker line) unless
# --force is given: never run it on a real cluster's host.  Why the settings (each seen with
# Slurm 22.05 on a 2-core machine): a slurm.conf naming another host fails ("This host not a
# valid controller"), hence the rewrite at every start; RequeueExit=75 is the only way Slurm
# retries a task that failed, without a limit (quadrant.sbatch caps it); without slurmdbd there
# is no sacct, so finished tasks are read from the jobcomp/filetxt file (and scontrol, kept
# MinJobAge s); the SchedulerParameters start array tasks within seconds instead of at
# Slurm's default intervals; ports 6817/6818 are fixed, so one instance per machine.
# Environment: SKYDIFF_SLURM_CPUS (CPUs declared on the node, default 64: 64 instant array
# tasks then schedule in ~2 s instead of ~23 s on 2 real cores), SKYDIFF_SLURM_STATE
# (state, spool, logs and the job completion file; default /var/lib/skydiff-slurm),
# SKYDIFF_SLURM_CONF (default /etc/slurm/slurm.conf; clients then need SLURM_CONF set to it).
set -euo pipefail

MARKER="# skydiff local-slurm: written by slurm/local-slurm.sh"
CONF=${SKYDIFF_SLURM_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF   # daemons and clients read the config from here
STATE=${SKYDIFF_SLURM_STATE:-/var/lib/skydiff-slurm}
CPUS=${SKYDIFF_SLURM_CPUS:-64}
START_TIMEOUT_S=30
STOP_TIMEOUT_S=20
PIDFILES=(/run/slurmctld.pid /run/slurmd.pid /run/munge/munged.pid)

say() { echo "local-slurm: $*" >&2; }
die() { say "$*"; exit 1; }

# A PID is alive when /proc shows a non-zombie process with the expected command name:
# PID 1 in these containers reaps late, so `kill -0` would see zombies as alive.
alive() {
  local pid=$1 comm=$2 state
  [ -r "/proc/$pid/status" ] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status")
  [ "$state" != Z ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

pid_of() { [ -s "$1" ] && tr -dc 0-9 < "$1" || true; }

ours() { [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qxF "$MARKER"; }

node_state() { timeout 5 sinfo -h -N -o %T 2>/dev/null | head -n 1 || true; }

install_packages() {
  local need=()
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  [ ${#need[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge /run/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged did not start"
}

write_conf() {
  local host node
  host=$(hostname -s)
  # slurmd -C describes this machine; the CPU count is overridden (config_overrides keeps
  # it) so that many one-core array tasks are scheduled at once.
  node=$(slurmd -C | head -n 1 | sed -E "s/ (CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+//g")
  install -d "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat > "$CONF.tmp" <<EOF
$MARKER
# Rewritten at every start; do not edit (see slurm/local-slurm.sh).
ClusterName=skydiff
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
RequeueExit=75
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$node CPUs=$CPUS NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

daemons_alive() {
  local pid
  pid=$(pid_of /run/slurmctld.pid); [ -n "$pid" ] && alive "$pid" slurmctld || return 1
  pid=$(pid_of /run/slurmd.pid); [ -n "$pid" ] && alive "$pid" slurmd || return 1
}

do_start() {
  local force=${1:-}
  if [ -f "$CONF" ] && ! ours && [ "$force" != --force ]; then
    die "$CONF exists and was not written by this script; refusing to overwrite it (use --force on a test machine only)"
  fi
  if ours && daemons_alive && [ "$(node_state)" = idle ]; then
    say "already running ($(hostname -s), node idle)"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "run as root"
  install_packages
  do_stop quiet
  start_munge
  # Fresh state: job ids restart at 1 and the completion file starts empty.
  rm -rf "$STATE/ctld" "$STATE/d" "$STATE/jobcomp.txt"
  write_conf
  slurmctld
  slurmd
  local deadline=$((SECONDS + START_TIMEOUT_S)) state=
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    if [ "$state" = idle ]; then
      say "up: node $(hostname -s) idle, $CPUS CPUs, job completions in $STATE/jobcomp.txt"
      return 0
    fi
    sleep 0.2
  done
  die "node not idle after ${START_TIMEOUT_S} s (state '${state}'); logs in $STATE/log"
}

do_stop() {
  local quiet=${1:-} pid comm i
  if [ -f "$CONF" ] && ! ours; then
    die "$CONF was not written by this script; not stopping a real cluster"
  fi
  if daemons_alive; then
    timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  for i in "${!PIDFILES[@]}"; do
    pid=$(pid_of "${PIDFILES[$i]}")
    comm=$(basename "${PIDFILES[$i]}" .pid)
    [ -n "$pid" ] || continue
    # munged is only ours to stop when slurm used it; it is harmless to keep otherwise,
    # but a clean stop leaves nothing behind.
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while alive "$pid" "$comm" && [ $SECONDS -lt $deadline ]; do
      kill -TERM "$pid" 2>/dev/null || true
      sleep 0.2
    done
    if alive "$pid" "$comm"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "${PIDFILES[$i]}"
  done
  [ -n "$quiet" ] || say "stopped"
}

do_status() {
  if ours && daemons_alive; then
    echo "node $(hostname -s): $(node_state); config $CONF (local-slurm); completions $STATE/jobcomp.txt"
    [ "$(node_state)" = idle ] || [ "$(node_state)" = mixed ] || [ "$(node_state)" = allocated ]
  else
    echo "local Slurm not running"
    return 3
  fi
}

case "${1:-}" in
  start)  do_start "${2:-}" ;;
  stop)   do_stop ;;
  status) do_status ;;
  *)      echo "usage: $0 start [--force] | stop | status" >&2; exit 2 ;;
esac
