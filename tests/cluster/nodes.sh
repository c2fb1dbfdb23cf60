#!/usr/bin/env bash
# Two hosts on this machine, for the multi-node tests: network namespaces <prefix>-node0 and <prefix>-node1,
# joined by a bridge in the root namespace (10.77.0.0/24), each with its own address and, for processes
# started through `run`, its own hostname. Names resolve through /etc/hosts. Traffic goes only to loopback
# and to these namespaces; `down` removes everything `up` made (namespaces, links, /etc/hosts lines), and
# `up` twice is `up` once. Needs root, iproute2 and util-linux.
#
#   tests/cluster/nodes.sh up            # create
#   tests/cluster/nodes.sh run N CMD...  # run CMD on node N (its network namespace, hostname <prefix>-nodeN)
#   tests/cluster/nodes.sh addr N        # node N's address (bridge_addr: this host's, on the bridge)
#   tests/cluster/nodes.sh down          # remove
#
# MMOLRE_NODES_PREFIX (default mmolre) and MMOLRE_NODES_NET (default 10.77.0) make another, separate pair.
set -euo pipefail
PREFIX=${MMOLRE_NODES_PREFIX:-mmolre}
NET=${MMOLRE_NODES_NET:-10.77.0}
BRIDGE=$PREFIX-br
MARK="# $PREFIX test node"

addr() { echo "$NET.$(( $1 + 1 ))"; }
bridge_addr() { echo "$NET.254"; }   # the root namespace's address on the bridge (e.g. for slurmctld)

up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge
    ip addr add "$(bridge_addr)/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  }
  for n in 0 1; do
    local ns=$PREFIX-node$n
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
      ip link add "$PREFIX-h$n" type veth peer name "$PREFIX-n$n"
      ip link set "$PREFIX-n$n" netns "$ns"
      ip link set "$PREFIX-h$n" master "$BRIDGE"
      ip link set "$PREFIX-h$n" up
      ip netns exec "$ns" ip addr add "$(addr "$n")/24" dev "$PREFIX-n$n"
      ip netns exec "$ns" ip link set "$PREFIX-n$n" up
      ip netns exec "$ns" ip link set lo up
    fi
    local line="$(addr "$n") $ns $MARK"
    grep -qxF "$line" /etc/hosts || echo "$line" >> /etc/hosts
  done
}

run() {
  # nsenter, not `ip netns exec`: that remounts /sys for the namespace, hiding the cgroup mounts slurmd needs
  local n=$1; shift
  exec nsenter --net="/run/netns/$PREFIX-node$n" unshare --uts sh -c "hostname $PREFIX-node$n && exec \"\$@\"" \
    sh "$@"
}

down() {
  for n in 0 1; do
    ip netns pids "$PREFIX-node$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$PREFIX-node$n" 2>/dev/null || true
    ip link del "$PREFIX-h$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  sed -i "\|$MARK\$|d" /etc/hosts
}

"$@"
