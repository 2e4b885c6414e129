#!/usr/bin/env bash
# A real Slurm cluster on one machine (Debian 12's 22.05 packages) for skydiff's tests: the
# controller on this host and N compute nodes (slurmd), each in its own network namespace with
# its own address on a private bridge, as separate hosts would be.
#   local-slurm.sh start [--force]   install if missing, set up the network, write the config, start, wait until idle
#   local-slurm.sh stop              cancel jobs, shut down, end the daemons by their PIDs, remove the network
#   local-slurm.sh status            exit 0 when every node is up (prints their states and the config)
#   local-slurm.sh address           the controller host's address on the bridge (where the nodes reach it)
# Run as root.  It writes /etc/slurm/slurm.conf afresh at every start (the hostname must
# match), so it refuses to start over a slurm.conf it did not write (no marker line) unless
# --force is given: never run it on a real cluster's host.
# The nodes: namespace skydiff-nK (K = 1..N) holds one end of a veth pair, address NET.(10+K),
# the other end on the bridge skydiff-br, address NET.1, on the host; the namespaces have no
# route beyond the bridge (a task cannot reach any other network).  Each slurmd runs there under
# its own UTS namespace whose hostname is its node name (how slurmd knows which node it is),
# entered with nsenter rather than `ip netns exec`, which remounts /sys and so hides the cgroup
# file system slurmd needs.  Tasks on a node therefore reach services of this host (PostgreSQL,
# the Kafka broker) only over TCP at NET.1, as a cluster's nodes reach a database server.
# Why the other settings (each seen with Slurm 22.05 on a 2-core machine): a slurm.conf naming
# another host fails ("This host not a valid controller"), hence the rewrite at every start;
# RequeueExit=75 is the only way Slurm retries a task that failed, without a limit
# (quadrant.sbatch caps it); without slurmdbd there is no sacct, so finished tasks are read from
# the jobcomp/filetxt file (and scontrol, kept MinJobAge s); the SchedulerParameters start array
# tasks within seconds instead of at Slurm's default intervals; LLN=YES (least loaded node)
# spreads an array over the nodes instead of filling the first; ports 6817/6818 are fixed, so
# one instance per machine.
# Environment: SKYDIFF_SLURM_NODES (compute nodes, default 2), SKYDIFF_SLURM_CPUS (CPUs
# declared per node, default 32: many instant array tasks then schedule in ~2 s instead of ~23 s
# on 2 real cores), SKYDIFF_SLURM_NET (the bridge's /24 prefix, default 10.231.0),
# SKYDIFF_SLURM_STATE (state, spool, logs and the job completion file; default
# /var/lib/skydiff-slurm), SKYDIFF_SLURM_CONF (default /etc/slurm/slurm.conf; clients then need
# SLURM_CONF set to it).
set -euo pipefail

MARKER="# skydiff local-slurm: written by slurm/local-slurm.sh"
CONF=${SKYDIFF_SLURM_CONF:-/etc/slurm/slurm.conf}
export SLURM_CONF=$CONF   # daemons and clients read the config from here
STATE=${SKYDIFF_SLURM_STATE:-/var/lib/skydiff-slurm}
NODES=${SKYDIFF_SLURM_NODES:-2}
CPUS=${SKYDIFF_SLURM_CPUS:-32}
NET=${SKYDIFF_SLURM_NET:-10.231.0}
BRIDGE=skydiff-br
HOST_ADDR=$NET.1
START_TIMEOUT_S=30
STOP_TIMEOUT_S=20

node_name() { echo "skydiff-n$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }
slurmd_pidfile() { echo "$STATE/d/slurmd-$1.pid"; }

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

# The nodes' states: "idle" when all are idle, else the distinct states seen, sorted.
node_state() {
  local states
  [ "$(timeout 5 sinfo -h -N -o %N 2>/dev/null | wc -l)" = "$NODES" ] || { echo down; return; }
  states=$(timeout 5 sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ' || true)
  echo "${states% }"
}

install_packages() {
  local need=()
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
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
  local host hw k nodes=() names=()
  host=$(hostname -s)
  # slurmd -C describes this machine; the CPU count is overridden (config_overrides keeps
  # it) so that many one-core array tasks are scheduled at once.
  hw=$(slurmd -C | head -n 1 | sed -E "s/^NodeName=[^ ]+ //; s/ ?(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+//g")
  for k in $(seq "$NODES"); do
    nodes+=("NodeName=$(node_name "$k") NodeAddr=$(node_addr "$k") $hw CPUs=$CPUS State=UNKNOWN")
    names+=("$(node_name "$k")")
  done
  install -d "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d" "$STATE/log"
  cat > "$CONF.tmp" <<EOF
$MARKER
# Rewritten at every start; do not edit (see slurm/local-slurm.sh).
ClusterName=skydiff
SlurmctldHost=$host($HOST_ADDR)
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
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=$STATE/d/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
$(printf '%s\n' "${nodes[@]}")
PartitionName=local Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP LLN=YES
EOF
  mv "$CONF.tmp" "$CONF"
}

# The bridge on the host and one namespace per node, linked by veth pairs.
network_up() {
  local k ns
  ip link add "$BRIDGE" type bridge 2>/dev/null \
    || die "cannot create the bridge $BRIDGE (the test cluster's nodes need network namespaces: root and a kernel allowing them)"
  ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for k in $(seq "$NODES"); do
    ns=$(node_name "$k")
    ip netns add "$ns" || die "cannot create the network namespace $ns"
    ip link add "skydiff-v$k" type veth peer name eth0 netns "$ns"
    ip link set "skydiff-v$k" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$k")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

network_down() {
  local ns pids link _
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^skydiff-n[0-9]+$/ {print $1}'); do
    # Whatever still runs in a node (a slurmd whose PID file is gone, a job step that
    # outlived its slurmd) would keep the namespace, and with it the veth pair, alive after
    # its name is deleted, and the next start would fail on "File exists".
    pids=$(ip netns pids "$ns" 2>/dev/null)
    if [ -n "$pids" ]; then
      kill -TERM $pids 2>/dev/null || true
      for _ in $(seq 25); do
        pids=$(ip netns pids "$ns" 2>/dev/null); [ -z "$pids" ] && break
        sleep 0.2
      done
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true     # removes its veth end, and so the pair
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep -E '^skydiff-v[0-9]+$'); do
    ip link del "$link" 2>/dev/null || true    # a pair whose namespace end outlived it
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

start_nodes() {
  local k name
  for k in $(seq "$NODES"); do
    name=$(node_name "$k")
    install -d "$STATE/d/$name"
    nsenter --net="/run/netns/$name" unshare --uts sh -c "hostname $name && exec slurmd"
  done
}

daemons_alive() {
  local pid k
  pid=$(pid_of /run/slurmctld.pid); [ -n "$pid" ] && alive "$pid" slurmctld || return 1
  for k in $(seq "$NODES"); do
    pid=$(pid_of "$(slurmd_pidfile "$(node_name "$k")")"); [ -n "$pid" ] && alive "$pid" slurmd || return 1
  done
}

do_start() {
  local force=${1:-}
  if [ -f "$CONF" ] && ! ours && [ "$force" != --force ]; then
    die "$CONF exists and was not written by this script; refusing to overwrite it (use --force on a test machine only)"
  fi
  if ours && daemons_alive && [ "$(node_state)" = idle ]; then
    say "already running ($NODES nodes idle)"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "run as root"
  install_packages
  do_stop quiet
  start_munge
  # Fresh state: job ids restart at 1 and the completion file starts empty.
  rm -rf "$STATE/ctld" "$STATE/d" "$STATE/jobcomp.txt"
  network_up
  write_conf
  slurmctld
  start_nodes
  local deadline=$((SECONDS + START_TIMEOUT_S)) state=
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    if [ "$state" = idle ]; then
      say "up: $NODES nodes idle ($CPUS CPUs each, in network namespaces on $BRIDGE, controller at $HOST_ADDR), job completions in $STATE/jobcomp.txt"
      return 0
    fi
    sleep 0.2
  done
  die "nodes not idle after ${START_TIMEOUT_S} s (states '${state}'); logs in $STATE/log"
}

# End a daemon by its PID file: TERM until it is gone (at most STOP_TIMEOUT_S), then KILL.
end_daemon() {
  local pidfile=$1 comm=$2 pid
  pid=$(pid_of "$pidfile")
  [ -n "$pid" ] || { rm -f "$pidfile"; return 0; }
  local deadline=$((SECONDS + STOP_TIMEOUT_S))
  while alive "$pid" "$comm" && [ $SECONDS -lt $deadline ]; do
    kill -TERM "$pid" 2>/dev/null || true
    sleep 0.2
  done
  if alive "$pid" "$comm"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

do_stop() {
  local quiet=${1:-} pidfile
  if [ -f "$CONF" ] && ! ours; then
    die "$CONF was not written by this script; not stopping a real cluster"
  fi
  if daemons_alive; then
    timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
  fi
  # Every node's slurmd (also of a start with another node count, or the one-node layout's
  # /run/slurmd.pid), the controller, and munged (only ours to stop when slurm used it;
  # harmless to keep, but a clean stop leaves nothing behind); then the network.
  for pidfile in "$STATE"/d/slurmd-*.pid /run/slurmd.pid; do
    [ -e "$pidfile" ] && end_daemon "$pidfile" slurmd
  done
  end_daemon /run/slurmctld.pid slurmctld
  end_daemon /run/munge/munged.pid munged
  network_down
  [ -n "$quiet" ] || say "stopped"
}

do_status() {
  if ours && daemons_alive; then
    local state
    state=$(node_state)
    echo "$NODES nodes: $state; controller at $HOST_ADDR; config $CONF (local-slurm); completions $STATE/jobcomp.txt"
    # Up: every node idle, mixed or allocated (a state such as down or drained is not).
    [ -n "$(echo "$state" | tr ' ' '\n' | grep -vxE 'idle|mixed|allocated')" ] && return 3
    [ "$state" != down ]
  else
    echo "local Slurm not running"
    return 3
  fi
}

case "${1:-}" in
  start)  do_start "${2:-}" ;;
  stop)   do_stop ;;
  status) do_status ;;
  address) echo "$HOST_ADDR" ;;
  *)      echo "usage: $0 start [--force] | stop | status | address" >&2; exit 2 ;;
esac
