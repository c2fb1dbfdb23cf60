#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (as root; proctrack/linuxproc, no cgroups), for the Slurm tests
# and for trying the slurm/ scripts locally.
#
#   tests/slurm/cluster.sh install   # apt-get the packages (Debian: munge, slurmctld, slurmd, slurm-client)
#   tests/slurm/cluster.sh start     # munged + slurmctld + slurmd; waits until the node is idle
#   tests/slurm/cluster.sh status
#   tests/slurm/cluster.sh stop      # stops every daemon this script started
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
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc --all)   # the hardware's count: plain nproc honours OMP_NUM_THREADS, often 1 on clusters
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=mmolre
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurmctld.log
SlurmdLogFile=/var/log/slurmd.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then sinfo; return 0; fi
    sleep 1
  done
  echo "the Slurm node did not come up; see /var/log/slurmctld.log and /var/log/slurmd.log" >&2
  exit 1
}

stop() {
  for d in slurmd slurmctld; do
    [ -f "$STATE/$d.pid" ] && kill "$(cat "$STATE/$d.pid")" 2>/dev/null || true
    rm -f "$STATE/$d.pid"
  done
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  if [ -f "$STATE/munged.pid" ]; then kill "$(cat "$STATE/munged.pid")" 2>/dev/null || true; rm -f "$STATE/munged.pid"; fi
}

status() { sinfo && squeue; }

"${1:-status}"
