#!/usr/bin/env bash
# A Slurm cluster on this machine (as root; proctrack/linuxproc, no cgroups), for the Slurm tests and for
# trying the slurm/ scripts locally: partition `debug` (default) is this host; partition `two` is two more
# hosts, the network namespaces of tests/cluster/nodes.sh (own addresses and hostnames), each with a slurmd
# of its own under the one slurmctld.
#
#   tests/slurm/cluster.sh install   # apt-get the packages (Debian: munge, slurmctld, slurmd, slurm-client)
#   tests/slurm/cluster.sh start     # munged, the two hosts, slurmctld, 3 slurmds; waits until all are idle
#   tests/slurm/cluster.sh status
#   tests/slurm/cluster.sh stop      # stops munged, slurmctld and every slurmd, removes the two hosts, and fails
#                                    # naming any daemon still running
set -euo pipefail
STATE=/run/mmolre-slurm
mkdir -p "$STATE"

install() {
  apt-get update -qq
  # iproute2 and util-linux: the namespaces of tests/cluster/nodes.sh (two hosts on one machine)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client iproute2 util-linux \
    >/dev/null
}

start() {
  command -v slurmctld >/dev/null || { echo "Slurm is not installed: run '$0 install' first" >&2; exit 1; }
  mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge /var/spool/slurmctld /var/spool/slurmd /etc/slurm
  [ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    munged --force
    pgrep -x munged > "$STATE/munged.pid"
  fi
  local nodes
  nodes="$(dirname "$0")/../cluster/nodes.sh"
  "$nodes" up
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc --all)   # the hardware's count: plain nproc honours OMP_NUM_THREADS, often 1 on clusters
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mmolre
SlurmctldHost=$host($("$nodes" bridge_addr))
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd-%n.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=mmolre-node0 NodeAddr=$("$nodes" addr 0) CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=mmolre-node1 NodeAddr=$("$nodes" addr 1) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
PartitionName=two Nodes=mmolre-node0,mmolre-node1 MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  mkdir -p /var/spool/slurmd/$host /var/spool/slurmd/mmolre-node0 /var/spool/slurmd/mmolre-node1
  if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; else slurmctld; fi   # a running one reads the new config
  [ -f "$STATE/slurmd-$host.pid" ] && kill -0 "$(cat "$STATE/slurmd-$host.pid")" 2>/dev/null || slurmd -N "$host"
  for n in 0 1; do   # each in its host's namespace, under its hostname
    [ -f "$STATE/slurmd-mmolre-node$n.pid" ] && kill -0 "$(cat "$STATE/slurmd-mmolre-node$n.pid")" 2>/dev/null ||
      "$nodes" run "$n" slurmd -N "mmolre-node$n"
  done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$')" -eq 3 ]; then sinfo; return 0; fi
    sleep 1
  done
  sinfo -N >&2 || true
  echo "the Slurm nodes did not come up; see /var/log/slurmctld.log and /var/log/slurmd-*.log" >&2
  exit 1
}

daemons_running() {   # one name per pgrep: its -x pattern is matched against names of at most 15 characters
  local daemon
  for daemon in slurmd slurmctld munged; do pgrep -l -x "$daemon" || true; done
}

stop() {
  for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # Also the daemons this script did not start itself: a munged that the package's install started (seen:
  # it outlived a stop that only killed the munged it had started), a slurmd whose pid file is gone.
  for daemon in slurmd slurmctld munged; do pkill -x "$daemon" 2>/dev/null || true; done
  local left=""
  for _ in $(seq 50); do
    left=$(daemons_running)
    [ -z "$left" ] && break
    sleep 0.2
  done
  if [ -n "$left" ]; then   # still there after 10 s: no mercy, then say what could not be stopped
    for daemon in slurmd slurmctld munged; do pkill -9 -x "$daemon" 2>/dev/null || true; done
    sleep 0.5
    left=$(daemons_running)
  fi
  "$(dirname "$0")/../cluster/nodes.sh" down
  if [ -n "$left" ]; then
    echo "cluster.sh stop: still running: $left" >&2
    exit 1
  fi
}

status() { sinfo && squeue; }

"${1:-status}"
