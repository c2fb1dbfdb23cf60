#!/usr/bin/env bash
# Two hosts on this machine, for the multi-node tests: network namespaces mmolre-node0 and mmolre-node1,
# joined by a bridge in the root namespace (10.77.0.0/24), each with its own address and, for processes
# started through `run`, its own hostname. Names resolve through /etc/hosts. Traffic goes only to loopback
# and to these namespaces; `down` removes everything `up` made. Needs root and iproute2.
#
#   tests/cluster/nodes.sh up            # create (idempotent)
#   tests/cluster/nodes.sh run N CMD...  # run CMD on node N (its namespace, hostname mmolre-nodeN)
#   tests/cluster/nodes.sh addr N        # node N's address (bridge_addr: this host's, on the bridge)
#   tests/cluster/nodes.sh down          # remove namespaces, bridge, /etc/hosts lines
set -euo pipefail
BRIDGE=mmolre-br
NET=10.77.0
MARK="# mmolre test node"

addr() { echo "$NET.$(( $1 + 1 ))"; }
bridge_addr() { echo "$NET.254"; }   # the root namespace's address on the bridge (e.g. for slurmctld)

up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.254/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  }
  for n in 0 1; do
    local ns=mmolre-node$n
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
      ip link add "mmolre-h$n" type veth peer name "mmolre-n$n"
      ip link set "mmolre-n$n" netns "$ns"
      ip link set "mmolre-h$n" master "$BRIDGE"
      ip link set "mmolre-h$n" up
      ip netns exec "$ns" ip addr add "$(addr "$n")/24" dev "mmolre-n$n"
      ip netns exec "$ns" ip link set "mmolre-n$n" up
      ip netns exec "$ns" ip link set lo up
    fi
    grep -q "mmolre-node$n\$" /etc/hosts || echo "$(addr "$n") mmolre-node$n $MARK" >> /etc/hosts
  done
  # a bridge does not forward between its ports when bridge-nf sends it through iptables; keep it plain
  [ -w /proc/sys/net/bridge/bridge-nf-call-iptables ] && echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables || true
}

run() {
  # nsenter, not `ip netns exec`: that remounts /sys for the namespace, hiding the cgroup mounts slurmd needs
  local n=$1; shift
  exec nsenter --net="/run/netns/mmolre-node$n" unshare --uts sh -c "hostname mmolre-node$n && exec \"\$@\"" sh "$@"
}

down() {
  for n in 0 1; do
    ip netns pids "mmolre-node$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "mmolre-node$n" 2>/dev/null || true
    ip link del "mmolre-h$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  sed -i "/$MARK\$/d" /etc/hosts
}

"$@"
