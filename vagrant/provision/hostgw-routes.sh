#!/usr/bin/env bash
# host-gw networking between nodes, flannel's host-gw without flannel: every other node's pod
# /24 is routed via that node's address on the shared private network, and pod traffic leaving
# the cluster CIDR is masqueraded. Installed as a systemd unit by node.sh (routes do not survive a
# reboot); run in a network namespace by tests/unit/test_deploy.py. Idempotent.
#   NODE_IP       this node's address on the private network
#   PEERS         "ip=podcidr ip=podcidr ..." for every node, this one included
#   CLUSTER_CIDR  all pod CIDRs; empty: no masquerade rule
set -euo pipefail
: "${NODE_IP:?}" "${PEERS:?}"

dev=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')
if [ -z "$dev" ]; then
  echo "hostgw-routes: no interface has $NODE_IP" >&2
  exit 1
fi

for peer in $PEERS; do
  peer_ip=${peer%%=*}
  peer_cidr=${peer#*=}
  [ "$peer_ip" = "$NODE_IP" ] && continue
  ip route replace "$peer_cidr" via "$peer_ip" dev "$dev"
done

if [ -n "${CLUSTER_CIDR:-}" ]; then
  rule=(POSTROUTING -s "$CLUSTER_CIDR" ! -d "$CLUSTER_CIDR" ! -o cni0 -j MASQUERADE)
  iptables -w -t nat -C "${rule[@]}" 2>/dev/null || iptables -w -t nat -A "${rule[@]}"
fi
echo "hostgw-routes: $PEERS via $dev"
