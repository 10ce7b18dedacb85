#!/usr/bin/env bash
# A throw-away SLURM cluster of N "nodes" (default 2: n1, n2) on this one machine, for tests and
# trials of slurm/*.sh and train/launch/executor.py.  Usage: slurm/cluster.sh up|down|status
#
# Everything it creates lives under $CLIP_SLURM_DIR (config, state, logs, PIDs); it edits /etc/hosts
# (node names -> 127.0.0.1, marked lines) and, only when no slurm.conf exists there, links
# /etc/slurm/slurm.conf to its own config so that plain `sbatch` works.  `down` undoes both and stops
# only the daemons that `up` started, by their recorded PIDs.  Needs root (it starts slurmd).
set -euo pipefail

STATE=${CLIP_SLURM_DIR:-/tmp/clip-slurm}
NODES=${CLIP_SLURM_NODES:-2}
CPUS_PER_NODE=${CLIP_SLURM_CPUS:-4}     # declared, may exceed the real cores (SlurmdParameters=config_overrides)
PORT_BASE=${CLIP_SLURM_PORT:-17000}     # slurmctld listens here, node i on PORT_BASE+i
CONF=$STATE/slurm.conf
HOSTS_MARK="# clip-slurm-cluster $STATE"
ETC_CONF=/etc/slurm/slurm.conf

say() { echo "cluster: $*" >&2; }

# A PID file names one of our daemons only if that process still runs the expected program;
# a recycled PID must never be signalled.
alive() {  # alive PIDFILE PROGRAM
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  say "installing slurmctld slurmd slurm-client munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
           slurmctld slurmd slurm-client munge >/dev/null; }
}

write_config() {
  local host first_id i
  host=$(hostname -s)
  # Wiping the state restarts job ids at 1; a time-based first id keeps a new cluster's job ids
  # from colliding with an earlier cluster's (submitit names its result files after the job id).
  first_id=$(( $(date +%s) % 60000000 + 1000 ))
  cat >"$CONF" <<EOF
# Written by slurm/cluster.sh: a throw-away cluster on one host. Not for production.
ClusterName=clip
SlurmctldHost=$host
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential lifetime + a 1 s scheduler tick: a requeued job restarts in seconds, not 120 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in this container: track processes by parent PID, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
FirstJobId=$first_id
MinJobAge=600
InactiveLimit=0
KillWait=30
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT_BASE + i)) CPUs=$CPUS_PER_NODE RealMemory=8000 State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

start_munge() {
  # Reuse a munged that already answers (not ours: not recorded, never stopped by `down`).
  if munge -n </dev/null >/dev/null 2>&1; then return 0; fi
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || setpriv --reuid munge --regid munge --init-groups mungekey --create
  # setsid and setpriv exec in place, so $! is munged itself; setsid keeps the daemons out of the
  # caller's process group (a Ctrl-C in pytest must not kill them half-way).
  setsid setpriv --reuid munge --regid munge --init-groups /usr/sbin/munged --foreground \
    >>"$STATE/log/munged.log" 2>&1 &
  echo $! >"$STATE/run/munged.ours"
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
  say "munged did not start; see $STATE/log/munged.log"; return 1
}

# One exact line per cluster (the state dir names it), so `down` removes its own line and no other.
hosts_line() { echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_MARK"; }

add_hosts() {
  grep -qxF "$(hosts_line)" /etc/hosts || hosts_line >>/etc/hosts
}

remove_hosts() {
  # /etc/hosts is often bind-mounted in containers: rewrite it in place, never rename over it.
  if grep -qxF "$(hosts_line)" /etc/hosts; then
    local kept
    kept=$(grep -vxF "$(hosts_line)" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

up() {
  [ "$(id -u)" -eq 0 ] || { say "needs root (it starts slurmd and edits /etc/hosts)"; exit 2; }
  if alive "$STATE/run/slurmctld.ours" slurmctld && SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1; then
    say "already up ($CONF)"; env_hint; return 0
  fi
  # `up` wipes $STATE: only ever a folder this script made (or an empty / missing one).
  if [ -d "$STATE" ] && [ -n "$(ls -A "$STATE")" ] && ! grep -qs "Written by slurm/cluster.sh" "$CONF"; then
    say "$STATE exists and is not a cluster.sh state folder: not wiping it (set CLIP_SLURM_DIR)"; exit 2
  fi
  install_packages
  down_daemons quiet
  rm -rf "$STATE"
  mkdir -p "$STATE"/{ctld,spool,run,log}
  write_config
  add_hosts
  if [ ! -e "$ETC_CONF" ]; then
    mkdir -p /etc/slurm && ln -s "$CONF" "$ETC_CONF" && echo "$ETC_CONF" >"$STATE/run/etc-link.ours"
  fi
  start_munge
  export SLURM_CONF=$CONF
  setsid slurmctld -D -i -f "$CONF" >>"$STATE/log/slurmctld.out" 2>&1 &
  echo $! >"$STATE/run/slurmctld.ours"
  local n
  for n in $(node_names); do
    setsid slurmd -D -N "$n" -f "$CONF" >>"$STATE/log/slurmd-$n.out" 2>&1 &
    echo $! >"$STATE/run/slurmd-$n.ours"
  done
  # Up means: every node registered and idle.
  for _ in $(seq 300); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle')" -eq "$NODES" ]; then
      say "up: $NODES nodes, config $CONF"; env_hint; return 0
    fi
    sleep 0.1
  done
  say "nodes did not become idle; logs in $STATE/log"; sinfo -N >&2 || true; exit 1
}

env_hint() { echo "export SLURM_CONF=$CONF"; }

daemon_program() {
  case $(basename "$1") in slurmd-*) echo slurmd ;; slurmctld.ours) echo slurmctld ;; munged.ours) echo munged ;; esac
}

down_daemons() {
  local f prog pids=()
  # Each daemon takes ~2 s to shut down: signal all of them first, then wait for all.
  for f in "$STATE"/run/slurmd-*.ours "$STATE"/run/slurmctld.ours "$STATE"/run/munged.ours; do
    [ -e "$f" ] || continue
    prog=$(daemon_program "$f")
    if alive "$f" "$prog"; then
      kill -TERM "$(cat "$f")" 2>/dev/null || true
      pids+=("$f")
    else
      rm -f "$f"
    fi
  done
  for f in "${pids[@]}"; do
    prog=$(daemon_program "$f")
    for _ in $(seq 100); do alive "$f" "$prog" || break; sleep 0.1; done
    if alive "$f" "$prog"; then kill -KILL "$(cat "$f")" 2>/dev/null || true; fi
    [ "${1:-}" = quiet ] || say "stopped $prog ($(cat "$f"))"
    rm -f "$f"
  done
}

down() {
  if alive "$STATE/run/slurmctld.ours" slurmctld; then
    # Job steps outlive slurmd: cancel the jobs first so that no training process is orphaned.
    SLURM_CONF=$CONF scancel --full --quiet --state=RUNNING,PENDING,SUSPENDED,REQUEUED $(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break; sleep 0.2
    done
  fi
  down_daemons
  if [ -e "$STATE/run/etc-link.ours" ] && [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
    rm -f "$ETC_CONF"
  fi
  rm -f "$STATE/run/etc-link.ours"
  remove_hosts
  say "down (logs kept in $STATE/log)"
}

status() {
  local f ok=0
  for f in "$STATE"/run/*.ours; do
    [ -e "$f" ] || continue
    case $(basename "$f") in
      slurmd-*) alive "$f" slurmd && echo "$(basename "$f" .ours): pid $(cat "$f")" || ok=1 ;;
      slurmctld.ours) alive "$f" slurmctld && echo "slurmctld: pid $(cat "$f")" || ok=1 ;;
      munged.ours) alive "$f" munged && echo "munged: pid $(cat "$f")" || ok=1 ;;
    esac
  done
  alive "$STATE/run/slurmctld.ours" slurmctld || { echo "cluster: down"; return 1; }
  SLURM_CONF=$CONF sinfo -N
  return $ok
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (state in \$CLIP_SLURM_DIR, default /tmp/clip-slurm)" >&2; exit 64 ;;
esac
